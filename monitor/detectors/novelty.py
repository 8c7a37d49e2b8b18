"""Drift test on the share of window texts that lie far from every training text."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp
from scipy.stats import nhypergeom

from monitor.detectors.base import (
    STATUS_OK,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    require_fitted,
    top_examples,
    validate_alpha,
    validate_example_count,
    validate_min_samples,
)
from monitor.errors import ConfigError, DataError, InsufficientSamplesError
from monitor.reference import ReferenceProfile

# The test is exact for any pool size, but a smaller pool leaves it almost no power.
MIN_POOL_TEXTS = 20


def _unit_rows(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return points / np.where(norms > 0, norms, 1.0)


class NoveltyDetector:
    """Conformal test for a surge of texts unlike any training text.

    Parameters
    ----------
    alpha : float
        Significance level. The window drifts when the p-value is below it.
    quantile : float
        Quantile of the held-out novelty scores above which a text counts as novel.
    min_samples : int
        Smallest number of sampled texts that is tested.
    typical_examples : int
        Number of window texts with the highest scores quoted in the result.

    Notes
    -----
    Score of a text: ``1 - max cos(e, r)`` over the reference embeddings r, the
    cosine distance to its nearest training text. A new topic, out-of-scope
    requests or mangled text score high.

    Statistic: X, the number of window texts whose score exceeds the k-th largest
    score of the N held-out calibration-pool texts (validation texts the
    reference never saw), with ``k = ceil((1 - quantile) N)``.

    Null distribution: when window and pool texts are exchangeable, the N + n
    scores are in uniformly random order, and X, the window texts ranked above
    the k-th pool text, is negative hypergeometric: ``P(X = x) = C(x + k - 1, x)
    C(n - x + N - k, n - x) / C(N + n, n)``, with mean ``n k / (N + 1)``. This is
    exact for any pool size: it accounts for the pool's own sampling error in
    placing the quantile, which a binomial test with rate ``1 - quantile``
    ignores.

    Decision rule: drifted when ``p = P(X >= x_observed) < alpha``.

    A few percent of novel texts move a whole-window statistic such as MMD very
    little. They move X by their full count, so this test detects small mixtures
    of a new domain far sooner.

    Reference: Bates, Candès, Lei, Romano and Sesia (2023), "Testing for outliers
    with conformal p-values", Annals of Statistics 51(1), 149-178, for scores
    ranked against a held-out calibration set.
    """

    signal = "novelty"

    def __init__(self, alpha: float = 0.01, quantile: float = 0.95, min_samples: int = 30,
                 typical_examples: int = 5):
        self.alpha = validate_alpha(alpha)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.5 <= quantile < 1.0:
            raise ConfigError(f"quantile must be in [0.5, 1), got {quantile!r}")
        self.quantile = float(quantile)
        self.min_samples = validate_min_samples(min_samples)
        self.typical_examples = validate_example_count(typical_examples)

    def fit(self, profile: ReferenceProfile) -> "NoveltyDetector":
        """Score the calibration pool against the reference embeddings and place the quantile."""
        reference = np.asarray(profile.embeddings, dtype=np.float64)
        if reference.ndim != 2 or reference.shape[0] < 2:
            raise InsufficientSamplesError(
                f"the reference profile has embeddings of shape {reference.shape}; at least 2 rows are needed"
            )
        if profile.pool_embeddings is None:
            raise InsufficientSamplesError(
                "the reference profile has no calibration pool (it was saved by an older driftloop); "
                "rebuild the profile so the novelty signal can place its quantile"
            )
        pool = np.asarray(profile.pool_embeddings, dtype=np.float64)
        if pool.shape[0] < MIN_POOL_TEXTS:
            raise InsufficientSamplesError(
                f"the calibration pool has {pool.shape[0]} texts; the novelty signal needs at least {MIN_POOL_TEXTS}"
            )
        self.reference_unit_ = _unit_rows(reference)
        pool_scores = self.scores(pool)
        self.pool_size_ = int(pool_scores.shape[0])
        # Rounding first keeps float error from lifting 50.000000000000004 to 51.
        self.rank_ = max(1, math.ceil(round((1.0 - self.quantile) * self.pool_size_, 9)))
        self.score_threshold_ = float(np.sort(pool_scores)[::-1][self.rank_ - 1])
        return self

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Return the cosine distance of each row to its nearest reference embedding."""
        require_fitted(self, "reference_unit_")
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.shape[1] != self.reference_unit_.shape[1]:
            raise DataError(
                f"window embeddings have dimension {embeddings.shape[1]}, "
                f"reference embeddings {self.reference_unit_.shape[1]}; use the same embedding model"
            )
        return 1.0 - (_unit_rows(embeddings) @ self.reference_unit_.T).max(axis=1)

    def p_value(self, exceed: int, n: int) -> float:
        """Return P(X >= exceed) for a window of ``n`` texts under the negative hypergeometric null."""
        require_fitted(self, "rank_")
        if exceed <= 0:
            return 1.0
        # Summing the pmf in log space keeps far-tail p-values accurate, where nhypergeom.sf loses them.
        counts = np.arange(exceed, n + 1)
        return float(np.exp(logsumexp(nhypergeom.logpmf(counts, self.pool_size_ + n, n, self.rank_))))

    def test(self, window: WindowFeatures) -> DriftResult:
        """Count the window's novel texts and test the count against the pool."""
        require_fitted(self, "rank_")
        sample = np.asarray(window.embeddings, dtype=np.float64)
        n = int(sample.shape[0]) if sample.ndim == 2 and sample.shape[1] > 0 else 0
        threshold_details = {"score_threshold": self.score_threshold_, "quantile": self.quantile,
                             "pool_size": self.pool_size_}
        if n < self.min_samples:
            return insufficient_result(self.signal, n, self.min_samples, self.alpha, threshold_details)

        scores = self.scores(sample)
        novel = scores > self.score_threshold_
        exceed = int(novel.sum())
        p_value = self.p_value(exceed, n)

        details = {
            **threshold_details,
            "null": "negative_hypergeometric",
            "novel_count": exceed,
            "novel_share": exceed / n,
            "expected_share": self.rank_ / (self.pool_size_ + 1),
            "typical_examples": top_examples(scores, window.texts, self.typical_examples, above=self.score_threshold_),
        }
        return DriftResult(
            signal=self.signal,
            status=STATUS_OK,
            drifted=p_value < self.alpha,
            statistic=exceed / n,
            p_value=p_value,
            threshold=self.alpha,
            n=n,
            details=details,
        )
