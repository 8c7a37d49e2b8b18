"""Drift signal on the classifier's max-softmax confidence."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
from scipy.stats import ttest_ind

from monitor.detectors.base import (
    STATUS_OK,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    require_fitted,
    validate_min_samples,
    validate_positive_int,
)
from monitor.errors import ConfigError, InsufficientSamplesError
from monitor.reference import ReferenceProfile


class ConfidenceDetector:
    """Effect-size rule on the drop of mean max-softmax confidence.

    Parameters
    ----------
    max_drop : float
        Largest tolerated drop of mean confidence, in probability units.
    low_confidence_threshold : float
        A prediction with confidence below this value counts as low-confidence.
    min_samples : int
        Smallest number of sampled predictions that is tested.
    top_label_shifts : int
        Number of labels with the largest share change listed in the details.

    Notes
    -----
    Statistic: ``reference mean confidence - window mean confidence``, where the
    reference is the validation split of the active adapter version.

    Null distribution: none is used for the decision. For information the
    result carries the p-value of a one-sided Welch t-test (unequal variances)
    of "window mean < reference mean", whose null is equal means with the t
    distribution and Welch-Satterthwaite degrees of freedom.

    Decision rule: drifted when the drop is >= ``max_drop``. An effect-size rule
    is used because with large windows a t-test flags drops too small to act on.

    Reference: Welch (1947), "The generalization of 'Student's' problem when
    several different population variances are involved", Biometrika 34(1/2),
    28-35.
    """

    signal = "confidence"

    def __init__(
        self,
        max_drop: float = 0.1,
        low_confidence_threshold: float = 0.5,
        min_samples: int = 30,
        top_label_shifts: int = 5,
    ):
        if not isinstance(max_drop, (int, float)) or not 0.0 < max_drop <= 1.0:
            raise ConfigError(f"max_drop must be in (0, 1], got {max_drop!r}")
        if not isinstance(low_confidence_threshold, (int, float)) or not 0.0 <= low_confidence_threshold <= 1.0:
            raise ConfigError(f"low_confidence_threshold must be in [0, 1], got {low_confidence_threshold!r}")
        self.max_drop = float(max_drop)
        self.low_confidence_threshold = float(low_confidence_threshold)
        self.min_samples = validate_min_samples(min_samples)
        self.top_label_shifts = validate_positive_int("top_label_shifts", top_label_shifts)

    def fit(self, profile: ReferenceProfile) -> "ConfidenceDetector":
        """Store the validation confidences and predicted-label shares."""
        confidences = np.asarray(profile.val_confidences, dtype=np.float64)
        if confidences.size < 2:
            raise InsufficientSamplesError(
                f"the reference profile has {confidences.size} validation confidences; at least 2 are needed"
            )
        self.reference_confidences_ = confidences
        self.reference_mean_ = float(confidences.mean())
        self.reference_low_confidence_share_ = float(np.mean(confidences < self.low_confidence_threshold))
        self.reference_label_distribution_ = dict(profile.label_distribution)
        return self

    def test(self, window: WindowFeatures) -> DriftResult:
        """Compare the window's mean confidence with the reference."""
        require_fitted(self, "reference_confidences_")
        confidences = np.asarray(window.confidences, dtype=np.float64)
        n = int(confidences.shape[0])
        reference_details = {
            "reference_mean": self.reference_mean_,
            "reference_low_confidence_share": self.reference_low_confidence_share_,
        }
        if n < self.min_samples:
            return insufficient_result(self.signal, n, self.min_samples, self.max_drop, reference_details)

        window_mean = float(confidences.mean())
        drop = self.reference_mean_ - window_mean
        with warnings.catch_warnings():
            # A window of identical confidences (all 1.0, say) makes scipy warn about
            # precision loss. The p-value is informational, so the warning is dropped.
            warnings.simplefilter("ignore", RuntimeWarning)
            outcome = ttest_ind(confidences, self.reference_confidences_, equal_var=False, alternative="less")
        p_value = float(outcome.pvalue)

        details = {
            "window_mean": window_mean,
            **reference_details,
            "window_low_confidence_share": float(np.mean(confidences < self.low_confidence_threshold)),
            "low_confidence_threshold": self.low_confidence_threshold,
            "label_shifts": self._label_shifts(window.predicted_labels),
        }
        return DriftResult(
            signal=self.signal,
            status=STATUS_OK,
            # The tolerance absorbs rounding, so a drop of exactly max_drop counts.
            drifted=drop >= self.max_drop - 1e-12,
            statistic=drop,
            p_value=p_value if math.isfinite(p_value) else None,
            threshold=self.max_drop,
            n=n,
            details=details,
        )

    def _label_shifts(self, predicted_labels: list[str]) -> list[dict]:
        """Return the labels whose predicted share changed most, largest absolute change first."""
        if not predicted_labels:
            return []
        counts = Counter(str(label) for label in predicted_labels)
        total = len(predicted_labels)
        labels = set(counts) | set(self.reference_label_distribution_)
        shifts = [
            {
                "label": label,
                "window_share": counts.get(label, 0) / total,
                "reference_share": float(self.reference_label_distribution_.get(label, 0.0)),
            }
            for label in labels
        ]
        shifts.sort(key=lambda row: (-abs(row["window_share"] - row["reference_share"]), row["label"]))
        return shifts[: self.top_label_shifts]
