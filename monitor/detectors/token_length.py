"""Drift test on the number of tokens per text."""

from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp

from monitor.detectors.base import (
    STATUS_OK,
    CalibratedNull,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    require_fitted,
    validate_alpha,
    validate_min_samples,
)
from monitor.errors import InsufficientSamplesError
from monitor.reference import ReferenceProfile


def ks_distances(reference_cdf: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Return the KS distance of each row of integer ``windows`` to ``reference_cdf``.

    ``reference_cdf[k]`` is the share of reference counts <= k. Counts beyond the
    end of ``reference_cdf`` fall where the reference CDF is 1. On integer data the
    supremum of the CDF difference is reached on the integer grid, so this equals
    the statistic of ``scipy.stats.ks_2samp``.
    """
    windows = np.atleast_2d(np.asarray(windows, dtype=np.int64))
    n_rows, n = windows.shape
    grid = max(reference_cdf.shape[0], int(windows.max()) + 1 if windows.size else 0)
    reference = np.concatenate([reference_cdf, np.ones(grid - reference_cdf.shape[0])])
    flat = (np.arange(n_rows)[:, None] * grid + np.clip(windows, 0, None)).ravel()
    histogram = np.bincount(flat, minlength=n_rows * grid).reshape(n_rows, grid)
    window_cdf = np.cumsum(histogram, axis=1) / n
    return np.abs(window_cdf - reference[None, :]).max(axis=1)


class TokenLengthDetector(CalibratedNull):
    """Two-sample Kolmogorov-Smirnov test on tokens per text.

    Parameters
    ----------
    alpha : float
        Significance level. The window drifts when the p-value is below it.
    min_samples : int
        Smallest number of sampled texts that is tested.

    Notes
    -----
    Statistic: the KS distance ``D = sup_x |F_window(x) - F_reference(x)|``
    between the empirical distribution functions of token counts (special
    tokens included, untruncated) in the window and in the training texts.

    Null distribution: both samples come from the same continuous distribution.
    ``scipy.stats.ks_2samp`` with ``method="auto"`` uses the exact distribution of
    D for small samples and the asymptotic one for large samples. Token counts
    are integers, and ties make the test conservative, so the false-alarm rate
    is at most ``alpha``.

    When held-out reference windows calibrated the null (see
    monitor.calibration), the p-value is the calibrated one instead.

    Decision rule: drifted when ``p < alpha``.

    Reference: the two-sample Kolmogorov-Smirnov (Smirnov) test as documented
    for ``scipy.stats.ks_2samp`` in the SciPy reference guide.
    """

    signal = "token_length"

    def __init__(self, alpha: float = 0.01, min_samples: int = 30):
        self.alpha = validate_alpha(alpha)
        self.min_samples = validate_min_samples(min_samples)

    def fit(self, profile: ReferenceProfile) -> "TokenLengthDetector":
        """Store the reference token counts and truncation figures."""
        counts = np.asarray(profile.token_counts, dtype=np.int64)
        if counts.size < 2:
            raise InsufficientSamplesError(f"the reference profile has {counts.size} token counts; at least 2 are needed")
        self.reference_counts_ = counts
        self.reference_cdf_ = np.cumsum(np.bincount(np.clip(counts, 0, None))) / counts.size
        self.max_length_ = int(profile.max_length)
        self.reference_mean_length_ = float(counts.mean())
        self.reference_truncation_rate_ = float(profile.truncation_rate)
        return self

    def test(self, window: WindowFeatures) -> DriftResult:
        """Compare the window's token counts with the reference."""
        require_fitted(self, "reference_counts_")
        counts = np.asarray(window.token_counts, dtype=np.int64)
        n = int(counts.shape[0])
        reference_details = {
            "reference_mean_length": self.reference_mean_length_,
            "reference_truncation_rate": self.reference_truncation_rate_,
            "max_length": self.max_length_,
        }
        if n < self.min_samples:
            return insufficient_result(self.signal, n, self.min_samples, self.alpha, reference_details)

        statistic = float(ks_distances(self.reference_cdf_, counts)[0])
        details = {
            "window_mean_length": float(counts.mean()),
            "window_truncation_rate": float(np.mean(counts > self.max_length_)),
            **reference_details,
        }
        calibration = self.calibration_for(n)
        if calibration is not None:
            p_value = calibration.p_value(statistic)
            details.update(calibration.summary(self.alpha))
        else:
            p_value = float(ks_2samp(counts, self.reference_counts_).pvalue)
            details["null"] = "asymptotic"
        return DriftResult(
            signal=self.signal,
            status=STATUS_OK,
            drifted=p_value < self.alpha,
            statistic=statistic,
            p_value=p_value,
            threshold=self.alpha,
            n=n,
            details=details,
        )

    def calibration_statistics(self, pool: WindowFeatures, windows: np.ndarray, sample_size: int) -> np.ndarray:
        """Return the KS distance of each window of pool texts to the reference."""
        require_fitted(self, "reference_counts_")
        return ks_distances(self.reference_cdf_, pool.token_counts[windows])
