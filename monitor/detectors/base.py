"""Shared types of the drift detectors: window features, test results and the detector protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from monitor.calibration import SAMPLING_EFFECTIVE_SIZE
from monitor.errors import ConfigError, DataError, NotFittedError
from monitor.reference import ReferenceProfile

STATUS_OK = "ok"
STATUS_INSUFFICIENT = "insufficient_data"


def to_json_value(value):
    """Convert numpy scalars and arrays, tuples and non-finite floats into plain JSON values.

    nan and infinities become None, because strict JSON has no representation for them.
    """
    if isinstance(value, dict):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, np.ndarray):
        return [to_json_value(item) for item in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


@dataclass(frozen=True)
class DriftResult:
    """Outcome of one detector on one window.

    ``threshold`` is the value the decision compared against: the (possibly
    Bonferroni-adjusted) significance level for p-value signals, or the effect
    size for the confidence signal. ``n`` is the number of sampled texts tested.
    With status ``"insufficient_data"``, ``statistic`` and ``p_value`` are None
    and ``drifted`` is False.
    """

    signal: str
    status: str
    drifted: bool
    statistic: float | None
    p_value: float | None
    threshold: float
    n: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the result as a JSON-serialisable dict."""
        return {
            "signal": self.signal,
            "status": self.status,
            "drifted": bool(self.drifted),
            "statistic": to_json_value(self.statistic),
            "p_value": to_json_value(self.p_value),
            "threshold": to_json_value(self.threshold),
            "n": int(self.n),
            "details": to_json_value(self.details),
        }


@dataclass
class WindowFeatures:
    """Features of a window's sampled texts, computed once and shared by all detectors.

    All per-text fields have one entry per sampled text, in the same order.
    ``embeddings`` has zero columns, and then any number of rows, when the
    embedding signal is disabled.
    ``n_total`` counts every event in the window, including those not sampled.
    ``texts`` are the sampled texts, for detectors that quote examples; it may be
    empty when a caller has only features.
    """

    token_counts: np.ndarray
    token_ids: list[list[int]]
    embeddings: np.ndarray
    confidences: np.ndarray
    predicted_labels: list[str]
    n_total: int
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_counts = np.asarray(self.token_counts, dtype=np.int64)
        self.confidences = np.asarray(self.confidences, dtype=np.float64)
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        n = self.token_counts.shape[0]
        sizes = {
            "token_ids": len(self.token_ids),
            "confidences": self.confidences.shape[0],
            "predicted_labels": len(self.predicted_labels),
        }
        if self.embeddings.ndim != 2:
            raise DataError(f"WindowFeatures.embeddings must be 2-D, got shape {self.embeddings.shape}")
        if self.embeddings.shape[1] > 0:
            sizes["embeddings"] = self.embeddings.shape[0]
        if self.texts:
            sizes["texts"] = len(self.texts)
        for name, size in sizes.items():
            if size != n:
                raise DataError(f"WindowFeatures.{name} has {size} entries but token_counts has {n}")

    @property
    def n_sampled(self) -> int:
        """Number of sampled texts."""
        return int(self.token_counts.shape[0])


@runtime_checkable
class Detector(Protocol):
    """A two-sample drift test between a reference profile and one window."""

    signal: str

    def fit(self, profile: ReferenceProfile) -> "Detector": ...

    def test(self, window: WindowFeatures) -> DriftResult: ...


def validate_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, raising ConfigError unless it is in (0, 1)."""
    if not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def validate_min_samples(min_samples: int) -> int:
    """Return ``min_samples``, raising ConfigError unless it is an integer >= 2."""
    if not isinstance(min_samples, int) or min_samples < 2:
        raise ConfigError(f"min_samples must be an integer >= 2, got {min_samples!r}")
    return min_samples


def validate_positive_int(name: str, value: int) -> int:
    """Return ``value``, raising ConfigError naming ``name`` unless it is an integer >= 1."""
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def validate_example_count(value: int) -> int:
    """Return ``value``, raising ConfigError unless it is an integer >= 0 (a number of quoted texts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"typical_examples must be an integer >= 0, got {value!r}")
    return value


def top_examples(scores: np.ndarray, texts: list[str] | None, count: int, above: float = -np.inf) -> list[dict]:
    """Return up to ``count`` window texts with the highest ``scores`` above ``above``, highest first.

    A stable sort on the negated scores keeps the window order among equal
    scores. Each entry has the text's window index, the text (None without
    texts) and its score.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")[:count]
    return [
        {"index": int(index), "text": texts[index] if texts else None, "score": float(scores[index])}
        for index in order
        if scores[index] > above
    ]


def validate_resample_count(name: str, value: int, alpha: float) -> int:
    """Return ``value``, raising ConfigError unless ``1 / (value + 1) < alpha``.

    A resampling p-value ``(b + 1) / (B + 1)`` is at least ``1 / (B + 1)``, so with
    fewer resamples the test could never reject at level ``alpha``.
    """
    validate_positive_int(name, value)
    if 1.0 / (value + 1) >= alpha:
        needed = math.floor(1.0 / alpha)
        raise ConfigError(
            f"{name}={value} gives a smallest p-value of 1/{value + 1}, which is not below alpha={alpha:g}; "
            f"use at least {needed}"
        )
    return value


def require_fitted(detector, attribute: str) -> None:
    """Raise NotFittedError unless ``detector`` has the fitted ``attribute``."""
    if not hasattr(detector, attribute):
        raise NotFittedError(f"{type(detector).__name__} is not fitted; call fit(profile) first")


def insufficient_result(signal: str, n: int, min_samples: int, threshold: float, details: dict | None = None) -> DriftResult:
    """Return the result for a window with fewer than ``min_samples`` sampled texts."""
    payload = {"min_samples": min_samples}
    payload.update(details or {})
    return DriftResult(
        signal=signal,
        status=STATUS_INSUFFICIENT,
        drifted=False,
        statistic=None,
        p_value=None,
        threshold=float(threshold),
        n=int(n),
        details=to_json_value(payload),
    )


def permutation_p_value(null_statistics: np.ndarray, observed: float) -> float:
    """Return ``(b + 1) / (B + 1)``, where b of the B null statistics are >= ``observed``.

    Counting the observed statistic as one of the null draws keeps the p-value
    above zero and makes the test exact (Phipson and Smyth 2010, "Permutation
    P-values should never be zero", Stat. Appl. Genet. Mol. Biol. 9(1)).
    """
    null_statistics = np.asarray(null_statistics, dtype=np.float64)
    exceed = int(np.count_nonzero(null_statistics >= observed))
    return (exceed + 1) / (null_statistics.shape[0] + 1)


class CalibratedNull:
    """Mixin for detectors whose p-value can come from held-out reference windows.

    A detector keeps one ``NullCalibration`` per window sample size. ``test``
    calls ``calibration_for(n)``. With a calibration the p-value is the
    calibrated one and the detector's own null is skipped. Without one the
    detector uses its own null. Subclasses implement ``calibration_statistics``,
    which must return for each row of window indices into the pool the same
    statistic that ``test`` computes on those texts.
    """

    # How held-out windows are sized for this statistic (see monitor.calibration).
    calibration_sampling = SAMPLING_EFFECTIVE_SIZE

    def set_calibration(self, calibration) -> None:
        """Use ``calibration`` (a monitor.calibration.NullCalibration) for windows of its sample size."""
        if not hasattr(self, "calibrations_"):
            self.calibrations_ = {}
        self.calibrations_[int(calibration.sample_size)] = calibration

    def calibration_for(self, n: int):
        """Return the calibration for windows of ``n`` sampled texts, or None."""
        return getattr(self, "calibrations_", {}).get(int(n))

    def calibration_statistics(self, pool: WindowFeatures, windows: np.ndarray, sample_size: int) -> np.ndarray:
        """Return the detector's statistic for each row of ``windows``, indices into ``pool``.

        ``sample_size`` is the size of the production windows being calibrated,
        which may differ from the row length.
        """
        raise NotImplementedError
