"""Drift test on sentence embeddings: kernel two-sample test with maximum mean discrepancy."""

from __future__ import annotations

import numpy as np

from monitor.detectors.base import (
    STATUS_OK,
    CalibratedNull,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    permutation_p_value,
    require_fitted,
    validate_alpha,
    validate_min_samples,
    validate_positive_int,
    validate_resample_count,
)
from monitor.errors import DataError, InsufficientSamplesError
from monitor.reference import ReferenceProfile


def squared_distances(points: np.ndarray) -> np.ndarray:
    """Return the matrix of squared Euclidean distances between the rows of ``points``."""
    points = np.asarray(points, dtype=np.float64)
    norms = np.einsum("ij,ij->i", points, points)
    distances = norms[:, None] + norms[None, :] - 2.0 * points @ points.T
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances


def median_bandwidth(distances_squared: np.ndarray) -> float:
    """Return the median pairwise Euclidean distance, or 1.0 when all points coincide."""
    upper = distances_squared[np.triu_indices_from(distances_squared, k=1)]
    median = float(np.sqrt(np.median(upper))) if upper.size else 0.0
    return median if median > 0 else 1.0


def unbiased_mmd2(kernel_no_diagonal: np.ndarray, memberships: np.ndarray) -> np.ndarray:
    """Return the unbiased MMD² estimate for each split of the pooled sample.

    ``kernel_no_diagonal`` is the pooled kernel matrix with a zero diagonal.
    ``memberships`` has shape (splits, N) with 1.0 for points of the first sample
    and 0.0 for the second, and every row has the same group sizes. One matrix
    product evaluates all splits at once.
    """
    first = memberships
    second = 1.0 - memberships
    m = first[0].sum()
    n = second[0].sum()
    projected = first @ kernel_no_diagonal
    within_first = np.einsum("ij,ij->i", projected, first)
    between = np.einsum("ij,ij->i", projected, second)
    total = kernel_no_diagonal.sum()
    within_second = total - within_first - 2.0 * between
    return within_first / (m * (m - 1)) + within_second / (n * (n - 1)) - 2.0 * between / (m * n)


def random_fourier_map(dimension: int, bandwidth: float, n_features: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the weights W ~ N(0, I / bandwidth²) and offsets b ~ U(0, 2π) of a random Fourier feature map."""
    weights = rng.normal(0.0, 1.0 / bandwidth, size=(dimension, n_features))
    offsets = rng.uniform(0.0, 2.0 * np.pi, size=n_features)
    return weights, offsets


def random_fourier_features(points: np.ndarray, weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Map ``points`` to random Fourier features whose inner products approximate the RBF kernel.

    ``phi(x) = sqrt(2 / D) cos(W x + b)``, with W and b from ``random_fourier_map``,
    so that ``phi(x) . phi(y) ≈ exp(-|x - y|² / (2 bandwidth²))`` (Rahimi and Recht 2007,
    "Random features for large-scale kernel machines", NeurIPS).
    """
    return np.sqrt(2.0 / weights.shape[1]) * np.cos(np.asarray(points, dtype=np.float64) @ weights + offsets)


def rbf_kernel(first: np.ndarray, second: np.ndarray, bandwidth: float) -> np.ndarray:
    """Return the Gaussian RBF kernel matrix between the rows of ``first`` and ``second``."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    distances = (np.einsum("ij,ij->i", first, first)[:, None] + np.einsum("ij,ij->i", second, second)[None, :]
                 - 2.0 * first @ second.T)
    return np.exp(-np.maximum(distances, 0.0) / (2.0 * bandwidth**2))


def sampled_median_bandwidth(points: np.ndarray, max_points: int, rng: np.random.Generator) -> float:
    """Return the median heuristic on at most ``max_points`` rows, so its cost stays bounded."""
    if points.shape[0] > max_points:
        points = points[rng.choice(points.shape[0], size=max_points, replace=False)]
    return median_bandwidth(squared_distances(points))


class EmbeddingMMDDetector(CalibratedNull):
    """Permutation test of maximum mean discrepancy between reference and window embeddings.

    Parameters
    ----------
    alpha : float
        Significance level. The window drifts when the p-value is below it.
    permutations : int
        Number B of random relabelings of the pooled sample.
    reference_sample : int
        Maximum number of reference embeddings drawn (without replacement) at fit time.
    min_samples : int
        Smallest number of sampled texts that is tested.
    seed : int
        Seed of the detector's own ``numpy.random.Generator``.
    exact_max_points : int
        Largest pooled sample (reference plus window) tested with the exact kernel
        matrix. Larger samples use ``random_features`` random Fourier features,
        whose cost grows linearly with the sample instead of quadratically.
    random_features : int
        Number D of random Fourier features in the approximate path.

    Notes
    -----
    Statistic: the unbiased estimate of the squared maximum mean discrepancy,
    ``MMD²_u = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)``,
    with the Gaussian RBF kernel ``k(a, b) = exp(-|a - b|² / (2 σ²))``. The
    bandwidth σ is the median pairwise distance of the reference sample (median
    heuristic), fixed at fit time, so every window is measured on one scale.

    Null distribution: under equal distributions the pooled points are
    exchangeable, so MMD²_u is recomputed for B random splits of the pooled
    sample into groups of the original sizes. All splits reuse one kernel matrix.

    Decision rule: drifted when ``p < alpha``, with ``p = (b + 1) / (B + 1)`` and b
    the number of permuted MMD²_u >= the observed one. When held-out reference
    windows calibrated the null (see monitor.calibration), the p-value is the
    calibrated one and no permutations run.

    Above ``exact_max_points`` the statistic is the biased estimate
    ``|mean phi(x) - mean phi(y)|²`` on random Fourier features phi of the same
    kernel, drawn once at fit time. The permutation null is recomputed on the
    same features, so the p-value stays exact for this statistic. Only its power
    depends on how well D features approximate the kernel.

    Reference: Gretton, Borgwardt, Rasch, Schölkopf and Smola (2012), "A kernel
    two-sample test", Journal of Machine Learning Research 13, 723-773.
    """

    signal = "embedding"

    def __init__(
        self,
        alpha: float = 0.01,
        permutations: int = 200,
        reference_sample: int = 500,
        min_samples: int = 30,
        seed: int = 0,
        exact_max_points: int = 2000,
        random_features: int = 512,
    ):
        self.alpha = validate_alpha(alpha)
        self.permutations = validate_resample_count("permutations", permutations, self.alpha)
        self.reference_sample = validate_positive_int("reference_sample", reference_sample)
        self.min_samples = validate_min_samples(min_samples)
        self.exact_max_points = validate_positive_int("exact_max_points", exact_max_points)
        self.random_features = validate_positive_int("random_features", random_features)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def fit(self, profile: ReferenceProfile) -> "EmbeddingMMDDetector":
        """Draw the reference sample of embeddings."""
        embeddings = np.asarray(profile.embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise InsufficientSamplesError(
                f"the reference profile has embeddings of shape {embeddings.shape}; at least 2 rows are needed"
            )
        size = min(self.reference_sample, embeddings.shape[0])
        index = np.sort(self._rng.choice(embeddings.shape[0], size=size, replace=False))
        self.reference_embeddings_ = embeddings[index]
        self.bandwidth_ = sampled_median_bandwidth(self.reference_embeddings_, self.exact_max_points, self._rng)
        # Mean kernel over distinct reference pairs, needed only where the exact path can run.
        self.reference_within_ = None
        if size < self.exact_max_points:
            kernel = rbf_kernel(self.reference_embeddings_, self.reference_embeddings_, self.bandwidth_)
            np.fill_diagonal(kernel, 0.0)
            self.reference_within_ = float(kernel.sum() / (size * (size - 1)))
        self.feature_map_ = random_fourier_map(embeddings.shape[1], self.bandwidth_, self.random_features, self._rng)
        self.reference_feature_mean_ = random_fourier_features(self.reference_embeddings_, *self.feature_map_).mean(axis=0)
        return self

    def _method(self, n: int) -> str:
        return "exact" if self.reference_embeddings_.shape[0] + n <= self.exact_max_points else "random_features"

    def statistic(self, sample: np.ndarray) -> float:
        """Return the window's statistic: MMD²_u (exact) or the biased random-feature MMD²."""
        return float(self.calibration_statistics(sample, np.arange(sample.shape[0])[None, :], sample.shape[0])[0])

    def calibration_statistics(self, pool, windows: np.ndarray, sample_size: int) -> np.ndarray:
        """Return the statistic of each row of ``windows``, indices into ``pool`` (WindowFeatures or an array).

        The exact or random-feature estimator is the one a window of
        ``sample_size`` texts gets. Rows may repeat an index (windows drawn with
        replacement): repeated points count as distinct points at distance 0.
        """
        require_fitted(self, "reference_embeddings_")
        points = np.asarray(getattr(pool, "embeddings", pool), dtype=np.float64)
        windows = np.atleast_2d(windows)
        n_windows, n = windows.shape
        used, inverse = np.unique(windows, return_inverse=True)
        memberships = np.zeros((n_windows, used.size))
        np.add.at(memberships, (np.repeat(np.arange(n_windows), n), inverse.ravel()), 1.0)
        points = points[used]
        if self._method(sample_size) == "random_features":
            features = random_fourier_features(points, *self.feature_map_)
            differences = memberships @ features / n - self.reference_feature_mean_
            return np.einsum("ij,ij->i", differences, differences)
        within_kernel = rbf_kernel(points, points, self.bandwidth_)
        np.fill_diagonal(within_kernel, 0.0)
        within = np.einsum("ij,ij->i", memberships @ within_kernel, memberships)
        within += np.sum(memberships * (memberships - 1.0), axis=1)
        between = memberships @ rbf_kernel(points, self.reference_embeddings_, self.bandwidth_).sum(axis=1)
        m = self.reference_embeddings_.shape[0]
        return within / (n * (n - 1)) + self.reference_within_ - 2.0 * between / (n * m)

    def test(self, window: WindowFeatures) -> DriftResult:
        """Compare the window's embeddings with the reference sample."""
        require_fitted(self, "reference_embeddings_")
        sample = np.asarray(window.embeddings, dtype=np.float64)
        n = int(sample.shape[0]) if sample.ndim == 2 and sample.shape[1] > 0 else 0
        m = self.reference_embeddings_.shape[0]
        if n < self.min_samples:
            return insufficient_result(self.signal, n, self.min_samples, self.alpha, {"reference_sample": m})
        if sample.shape[1] != self.reference_embeddings_.shape[1]:
            raise DataError(
                f"window embeddings have dimension {sample.shape[1]}, "
                f"reference embeddings {self.reference_embeddings_.shape[1]}; use the same embedding model"
            )

        method = self._method(n)
        details = {"reference_sample": m, "method": method, "bandwidth": self.bandwidth_}
        calibration = self.calibration_for(n)
        if calibration is not None:
            observed = self.statistic(sample)
            p_value = calibration.p_value(observed)
            details.update(calibration.summary(self.alpha))
        else:
            pooled = np.vstack([self.reference_embeddings_, sample])
            # Each row of `shuffled` is a random permutation of 0..N-1, and its first m entries form the first group.
            shuffled = self._rng.permuted(np.tile(np.arange(m + n), (self.permutations, 1)), axis=1)
            if method == "exact":
                observed, null = self._exact_statistics(pooled, m, shuffled)
            else:
                observed, null = self._random_feature_statistics(pooled, m, shuffled)
            p_value = permutation_p_value(null, observed)
            details.update({"null": "permutations", "permutations": self.permutations,
                            "null_mean": float(null.mean()), "null_max": float(null.max())})
        return DriftResult(
            signal=self.signal,
            status=STATUS_OK,
            drifted=p_value < self.alpha,
            statistic=observed,
            p_value=p_value,
            threshold=self.alpha,
            n=n,
            details=details,
        )

    def _exact_statistics(self, pooled: np.ndarray, m: int, shuffled: np.ndarray) -> tuple[float, np.ndarray]:
        """Return (observed MMD²_u, permuted MMD²_u) from the full kernel matrix."""
        kernel = rbf_kernel(pooled, pooled, self.bandwidth_)
        np.fill_diagonal(kernel, 0.0)

        total = pooled.shape[0]
        memberships = np.zeros((shuffled.shape[0] + 1, total))
        memberships[0, :m] = 1.0
        np.put_along_axis(memberships[1:], shuffled[:, :m], 1.0, axis=1)
        statistics = unbiased_mmd2(kernel, memberships)
        return float(statistics[0]), statistics[1:]

    def _random_feature_statistics(self, pooled: np.ndarray, m: int,
                                   shuffled: np.ndarray) -> tuple[float, np.ndarray]:
        """Return (observed, permuted) biased MMD² on the fitted random Fourier features."""
        features = random_fourier_features(pooled, *self.feature_map_)

        total = pooled.shape[0]
        n = total - m
        # A row of `weights` gives 1/m to the first group and -1/n to the second, so
        # weights @ features is the difference of the two feature means.
        weights = np.full((shuffled.shape[0] + 1, total), -1.0 / n)
        weights[0, :m] = 1.0 / m
        np.put_along_axis(weights[1:], shuffled[:, :m], 1.0 / m, axis=1)
        differences = weights @ features
        statistics = np.einsum("ij,ij->i", differences, differences)
        return float(statistics[0]), statistics[1:]
