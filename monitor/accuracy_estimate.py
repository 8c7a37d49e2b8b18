"""Label-free estimate of a window's accuracy from calibrated max-softmax confidences.

The approach follows confidence-based performance estimation (CBPE): a
calibrator fitted on the validation split maps each prediction's confidence to
the probability that the prediction is correct, and the expected accuracy of a
window is the mean of those probabilities. The estimate is valid while the
relation between confidence and correctness stays as it was on the validation
split. Under concept drift that relation changes and the estimate is biased.

NOTE: texts of classes the model never saw are confidently wrong, so the
estimate runs high under that drift (by 5 points at a 10% mix of unseen
domains in the detection benchmark, as NannyML's CBPE does). Counting texts
flagged by the novelty signal as wrong closed most of that gap in a trial, but
over-corrected typo drift by 10 points, so the estimate does not do it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.isotonic import IsotonicRegression

from monitor.detectors.base import STATUS_INSUFFICIENT, STATUS_OK, WindowFeatures, to_json_value
from monitor.errors import ConfigError, DataError, InsufficientSamplesError, NotFittedError
from monitor.reference import ReferenceProfile

STATUS_UNAVAILABLE = "unavailable"
METHODS = ("isotonic", "temperature")
# Confidences are clipped this far inside (0, 1) before the logit of temperature scaling.
LOGIT_EPSILON = 1e-6


@dataclass(frozen=True)
class AccuracyEstimate:
    """Estimated accuracy of one window with its sampling interval.

    With status ``"unavailable"`` (the profile has no validation gold labels) or
    ``"insufficient_data"``, ``estimate``, ``lower`` and ``upper`` are None.
    """

    status: str
    estimate: float | None
    lower: float | None
    upper: float | None
    n: int
    level: float
    method: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the estimate as a JSON-serialisable dict."""
        return {
            "status": self.status,
            "estimate": to_json_value(self.estimate),
            "lower": to_json_value(self.lower),
            "upper": to_json_value(self.upper),
            "n": int(self.n),
            "level": float(self.level),
            "method": self.method,
            "details": to_json_value(self.details),
        }


@dataclass(frozen=True)
class RealizedAccuracy:
    """Comparison of the estimate with the accuracy on the labelled part of a window.

    ``estimate`` is the estimated accuracy of the same labelled texts, so that
    ``gap = estimate - realized`` compares like with like.
    """

    n_labelled: int
    realized: float
    estimate: float
    gap: float
    lower: float
    upper: float
    within_interval: bool


class AccuracyEstimator:
    """Label-free accuracy estimate of a window (CBPE).

    Parameters
    ----------
    method : str
        Calibrator: ``"isotonic"`` (default) or ``"temperature"``.
    level : float
        Coverage of the interval, in (0, 1).
    min_samples : int
        Smallest window for which an estimate is returned.

    Notes
    -----
    Calibrator: ``"isotonic"`` fits a non-decreasing step function from
    confidence to correctness on the validation split
    (``sklearn.isotonic.IsotonicRegression`` with ``out_of_bounds="clip"``).
    ``"temperature"`` fits ``P(correct) = sigmoid(logit(confidence) / T)`` by
    maximum likelihood on the correctness indicators.
    NOTE: this is a one-parameter binary form of temperature scaling, because
    the profile stores only the max-softmax confidence and not the logits that
    the multi-class form of Guo et al. rescales.

    Estimator: with calibrated probabilities ``p_i``, the expected accuracy of
    a window of n predictions is ``mean(p_i)``.

    Interval: if the predictions are correct independently with probabilities
    ``p_i``, the number correct is Poisson-binomial with variance
    ``sum(p_i * (1 - p_i))``. The interval is the normal approximation
    ``mean(p_i) +- z * sqrt(sum(p_i * (1 - p_i))) / n``, with z the
    ``(1 + level) / 2`` standard normal quantile, clipped to [0, 1]. It covers
    the window's realized accuracy, and leaves out the calibrator's own
    estimation error, which shrinks with the size of the validation split.

    References: Guo, Pleiss, Sun and Weinberger (2017), "On calibration of
    modern neural networks", ICML (temperature scaling); NannyML (2022), "Performance estimation: CBPE",
    https://github.com/NannyML/nannyml/blob/v0.8.5/docs/how_it_works/performance_estimation.rst
    (the CBPE method).
    """

    def __init__(self, method: str = "isotonic", level: float = 0.95, min_samples: int = 30):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
            raise ConfigError(f"level must be in (0, 1), got {level!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ConfigError(f"min_samples must be a positive integer, got {min_samples!r}")
        self.method = method
        self.level = float(level)
        self.min_samples = min_samples

    def fit(self, profile: ReferenceProfile) -> "AccuracyEstimator":
        """Fit the calibrator on the profile's validation confidences and correctness.

        A profile without validation gold labels leaves the estimator unavailable,
        and :meth:`estimate` then returns status ``"unavailable"``.
        """
        correct = profile.val_correct
        if correct is None:
            self.calibrator_ = None
            self.validation_accuracy_ = None
            return self
        return self.fit_arrays(profile.val_confidences, correct)

    def fit_arrays(self, confidences, correct) -> "AccuracyEstimator":
        """Fit the calibrator on validation confidences and booleans that mark correct predictions."""
        confidences = validate_confidences(confidences, "val_confidences")
        correct = np.asarray(correct, dtype=bool)
        if correct.shape != confidences.shape:
            raise DataError(
                f"correct must have one entry per confidence: got {correct.shape[0]} entries "
                f"for {confidences.shape[0]} confidences"
            )
        if confidences.size < 2:
            raise InsufficientSamplesError(
                f"the calibrator needs at least 2 validation predictions, got {confidences.size}"
            )

        if self.method == "isotonic":
            calibrator = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            calibrator.fit(confidences, correct.astype(np.float64))
            self.calibrator_ = calibrator.predict
        else:
            self.temperature_ = fit_temperature(confidences, correct)
            temperature = self.temperature_
            self.calibrator_ = lambda values: expit(_logit(values) / temperature)
        self.validation_accuracy_ = float(correct.mean())
        return self

    @property
    def available(self) -> bool:
        """Whether the fitted profile carried validation gold labels."""
        self._require_fitted()
        return self.calibrator_ is not None

    def calibrate(self, confidences) -> np.ndarray:
        """Return the calibrated probability that each prediction is correct."""
        self._require_available()
        confidences = validate_confidences(confidences, "confidences")
        return np.clip(np.asarray(self.calibrator_(confidences), dtype=np.float64), 0.0, 1.0)

    def estimate(self, window: WindowFeatures | np.ndarray) -> AccuracyEstimate:
        """Estimate the accuracy of a window, given as WindowFeatures or as its confidences."""
        self._require_fitted()
        raw = window.confidences if isinstance(window, WindowFeatures) else window
        confidences = validate_confidences(raw, "confidences")
        n = int(confidences.shape[0])
        if self.calibrator_ is None:
            return self._empty_result(
                STATUS_UNAVAILABLE, n,
                {"reason": "the reference profile has no validation gold labels; rebuild it to enable the estimate"},
            )
        if n < self.min_samples:
            return self._empty_result(STATUS_INSUFFICIENT, n, {"min_samples": self.min_samples})

        probabilities = self.calibrate(confidences)
        estimate, lower, upper = self._interval(probabilities)
        details = {
            "mean_confidence": float(confidences.mean()),
            "validation_accuracy": self.validation_accuracy_,
        }
        if self.method == "temperature":
            details["temperature"] = self.temperature_
        return AccuracyEstimate(STATUS_OK, estimate, lower, upper, n, self.level, self.method, details)

    def compare(self, confidences, predicted_labels, gold_labels) -> RealizedAccuracy:
        """Compare the estimate with the realized accuracy on the labelled texts of a window.

        ``gold_labels`` has one entry per prediction, None where the text has no
        label. Raises InsufficientSamplesError when no text is labelled.
        """
        self._require_available()
        confidences = validate_confidences(confidences, "confidences")
        predicted_labels = list(predicted_labels)
        gold_labels = list(gold_labels)
        if not len(predicted_labels) == len(gold_labels) == confidences.shape[0]:
            raise DataError(
                f"confidences, predicted_labels and gold_labels must have equal lengths, got "
                f"{confidences.shape[0]}, {len(predicted_labels)} and {len(gold_labels)}"
            )
        labelled = np.array([gold is not None for gold in gold_labels], dtype=bool)
        if not labelled.any():
            raise InsufficientSamplesError("gold_labels has no labelled text; realized accuracy is undefined")

        correct = np.array(
            [str(predicted) == str(gold) for predicted, gold, has in zip(predicted_labels, gold_labels, labelled) if has],
            dtype=np.float64,
        )
        realized = float(correct.mean())
        estimate, lower, upper = self._interval(self.calibrate(confidences[labelled]))
        return RealizedAccuracy(
            n_labelled=int(labelled.sum()),
            realized=realized,
            estimate=estimate,
            gap=estimate - realized,
            lower=lower,
            upper=upper,
            within_interval=lower <= realized <= upper,
        )

    def _interval(self, probabilities: np.ndarray) -> tuple[float, float, float]:
        n = probabilities.shape[0]
        estimate = float(probabilities.mean())
        standard_error = math.sqrt(float(np.sum(probabilities * (1.0 - probabilities)))) / n
        z = float(norm.ppf(0.5 + self.level / 2.0))
        return estimate, max(0.0, estimate - z * standard_error), min(1.0, estimate + z * standard_error)

    def _empty_result(self, status: str, n: int, details: dict) -> AccuracyEstimate:
        return AccuracyEstimate(status, None, None, None, n, self.level, self.method, details)

    def _require_fitted(self) -> None:
        if not hasattr(self, "calibrator_"):
            raise NotFittedError("AccuracyEstimator is not fitted; call fit(profile) first")

    def _require_available(self) -> None:
        if not self.available:
            raise NotFittedError(
                "AccuracyEstimator has no calibrator because the reference profile has no validation gold labels; "
                "rebuild the profile"
            )


def validate_confidences(values, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D float64 array, raising DataError naming ``name`` unless all are in [0, 1]."""
    confidences = np.asarray(values, dtype=np.float64)
    if confidences.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {confidences.shape}")
    not_finite = np.flatnonzero(~np.isfinite(confidences))
    if not_finite.size:
        raise DataError(
            f"{name} contains {not_finite.size} NaN or infinite values (first at index {not_finite[0]}); "
            "check the classifier output"
        )
    outside = np.flatnonzero((confidences < 0.0) | (confidences > 1.0))
    if outside.size:
        raise DataError(
            f"{name} must be within [0, 1], got {confidences[outside[0]]!r} at index {outside[0]}"
        )
    return confidences


def fit_temperature(confidences: np.ndarray, correct: np.ndarray) -> float:
    """Return the temperature T that maximises the likelihood of ``correct`` under ``sigmoid(logit(c) / T)``."""
    logits = _logit(confidences)
    outcomes = correct.astype(np.float64)

    def negative_log_likelihood(log_temperature: float) -> float:
        scaled = logits / math.exp(log_temperature)
        # log(1 + exp(s)) - y * s is the Bernoulli negative log-likelihood of sigmoid(s).
        return float(np.sum(np.logaddexp(0.0, scaled) - outcomes * scaled))

    # The search is bounded to T in [e^-5, e^5]. A fit at a bound means the confidences carry little signal.
    result = minimize_scalar(negative_log_likelihood, bounds=(-5.0, 5.0), method="bounded")
    return float(math.exp(result.x))


def _logit(confidences: np.ndarray) -> np.ndarray:
    return logit(np.clip(confidences, LOGIT_EPSILON, 1.0 - LOGIT_EPSILON))
