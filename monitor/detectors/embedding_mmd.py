"""Drift test on sentence embeddings: kernel two-sample test with maximum mean discrepancy."""

from __future__ import annotations

import numpy as np

from monitor.detectors.base import (
    STATUS_OK,
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


class EmbeddingMMDDetector:
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

    Notes
    -----
    Statistic: the unbiased estimate of the squared maximum mean discrepancy,
    ``MMD²_u = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)``,
    with the Gaussian RBF kernel ``k(a, b) = exp(-|a - b|² / (2 σ²))``. The
    bandwidth σ is the median pairwise distance of the pooled sample (median
    heuristic), computed once per window.

    Null distribution: under equal distributions the pooled points are
    exchangeable, so MMD²_u is recomputed for B random splits of the pooled
    sample into groups of the original sizes. All splits reuse one kernel matrix.

    Decision rule: drifted when ``p < alpha``, with ``p = (b + 1) / (B + 1)`` and b
    the number of permuted MMD²_u >= the observed one.

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
    ):
        self.alpha = validate_alpha(alpha)
        self.permutations = validate_resample_count("permutations", permutations, self.alpha)
        self.reference_sample = validate_positive_int("reference_sample", reference_sample)
        self.min_samples = validate_min_samples(min_samples)
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
        return self

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

        pooled = np.vstack([self.reference_embeddings_, sample])
        distances = squared_distances(pooled)
        bandwidth = median_bandwidth(distances)
        kernel = np.exp(-distances / (2.0 * bandwidth**2))
        np.fill_diagonal(kernel, 0.0)

        total = m + n
        observed_membership = np.zeros((1, total))
        observed_membership[0, :m] = 1.0
        # Each row of `shuffled` is a random permutation of 0..N-1, and its first m entries form the first group.
        shuffled = self._rng.permuted(np.tile(np.arange(total), (self.permutations, 1)), axis=1)
        permuted_membership = np.zeros((self.permutations, total))
        np.put_along_axis(permuted_membership, shuffled[:, :m], 1.0, axis=1)

        statistics = unbiased_mmd2(kernel, np.vstack([observed_membership, permuted_membership]))
        observed = float(statistics[0])
        null = statistics[1:]
        p_value = permutation_p_value(null, observed)

        details = {
            "reference_sample": m,
            "permutations": self.permutations,
            "bandwidth": bandwidth,
            "null_mean": float(null.mean()),
            "null_max": float(null.max()),
        }
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
