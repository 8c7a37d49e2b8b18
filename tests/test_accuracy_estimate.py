"""Tests of the label-free accuracy estimate on simulated confidences and correctness."""

import json

import numpy as np
import pytest

from monitor.accuracy_estimate import AccuracyEstimator, fit_temperature
from monitor.detectors.base import WindowFeatures
from monitor.errors import ConfigError, DataError, InsufficientSamplesError, NotFittedError
from monitor.reference import ReferenceProfile
from tests.test_detectors import make_profile as base_profile


def make_profile(confidences: np.ndarray, correct: np.ndarray | None) -> ReferenceProfile:
    """Profile whose validation predictions are all "a", with gold "a" where ``correct`` is True."""
    n = len(confidences)
    gold = None if correct is None else ["a" if flag else "b" for flag in correct]
    return base_profile(
        val_confidences=np.asarray(confidences, dtype=np.float64),
        val_predicted_labels=["a"] * n,
        label_distribution={"a": 1.0},
        val_gold_labels=gold,
    )


def simulate(rng: np.random.Generator, n: int, truth=lambda c: c) -> tuple[np.ndarray, np.ndarray]:
    """Draw confidences in [0.4, 1) and correctness with probability ``truth(confidence)``."""
    confidences = rng.beta(5.0, 1.5, size=n) * 0.6 + 0.4
    correct = rng.random(n) < truth(confidences)
    return confidences, correct


@pytest.mark.parametrize("method", ["isotonic", "temperature"])
def test_interval_covers_realized_accuracy(method):
    rng = np.random.default_rng(11)
    estimator = AccuracyEstimator(method=method, level=0.95).fit(make_profile(*simulate(rng, 20000)))
    repetitions = 400

    covered = 0
    for _ in range(repetitions):
        confidences, correct = simulate(rng, 300)
        result = estimator.estimate(confidences)
        covered += result.lower <= correct.mean() <= result.upper

    # With 400 repetitions at true coverage 0.95 the share has a standard deviation of about 0.011.
    assert 0.92 <= covered / repetitions <= 0.98


def test_isotonic_corrects_overconfidence():
    rng = np.random.default_rng(12)
    overconfident = lambda c: c**3
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 10000, overconfident)))

    confidences, correct = simulate(rng, 5000, overconfident)
    result = estimator.estimate(confidences)

    assert confidences.mean() - correct.mean() > 0.15
    assert result.estimate == pytest.approx(correct.mean(), abs=0.02)
    assert result.lower <= correct.mean() <= result.upper


def test_temperature_above_one_for_overconfident_model():
    rng = np.random.default_rng(13)
    confidences, correct = simulate(rng, 5000, lambda c: 1.0 / (1.0 + np.exp(-np.log(c / (1 - c)) / 2.0)))

    assert fit_temperature(confidences, correct) == pytest.approx(2.0, rel=0.15)


def test_estimate_accepts_window_features():
    rng = np.random.default_rng(14)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 2000)))
    confidences, _ = simulate(rng, 50)
    window = WindowFeatures(
        token_counts=np.full(50, 5), token_ids=[[1]] * 50, embeddings=np.zeros((50, 0)),
        confidences=confidences, predicted_labels=["a"] * 50, n_total=50,
    )

    from_window = estimator.estimate(window)
    from_array = estimator.estimate(confidences)

    assert from_window.estimate == from_array.estimate
    assert from_window.n == 50
    json.dumps(from_window.to_dict(), allow_nan=False)


def test_profile_without_gold_labels_is_unavailable():
    estimator = AccuracyEstimator().fit(make_profile(np.full(100, 0.9), None))

    result = estimator.estimate(np.full(50, 0.9))

    assert not estimator.available
    assert result.status == "unavailable"
    assert result.estimate is None
    assert result.lower is None
    assert result.upper is None
    assert "gold labels" in result.details["reason"]


def test_compare_without_gold_labels_raises():
    estimator = AccuracyEstimator().fit(make_profile(np.full(100, 0.9), None))

    with pytest.raises(NotFittedError, match="gold labels"):
        estimator.compare(np.full(5, 0.9), ["a"] * 5, ["a"] * 5)


def test_nan_confidence_names_field():
    rng = np.random.default_rng(15)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 500)))
    confidences = np.full(40, 0.8)
    confidences[7] = np.nan

    with pytest.raises(DataError, match=r"confidences contains 1 NaN .*index 7"):
        estimator.estimate(confidences)


def test_nan_validation_confidence_names_field():
    confidences = np.full(100, 0.8)
    confidences[3] = np.nan

    with pytest.raises(DataError, match="val_confidences"):
        AccuracyEstimator().fit(make_profile(confidences, np.ones(100, dtype=bool)))


def test_confidence_outside_unit_interval_rejected():
    rng = np.random.default_rng(16)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 500)))

    with pytest.raises(DataError, match=r"within \[0, 1\]"):
        estimator.estimate(np.full(40, 1.2))


def test_empty_window_is_insufficient():
    rng = np.random.default_rng(17)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 500)))

    result = estimator.estimate(np.zeros(0))

    assert result.status == "insufficient_data"
    assert result.n == 0
    assert result.estimate is None


def test_window_below_min_samples_is_insufficient():
    rng = np.random.default_rng(18)
    estimator = AccuracyEstimator(min_samples=30).fit(make_profile(*simulate(rng, 500)))

    result = estimator.estimate(np.full(29, 0.9))

    assert result.status == "insufficient_data"
    assert result.details["min_samples"] == 30


def test_compare_reports_gap_on_labelled_part():
    rng = np.random.default_rng(19)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 5000)))
    confidences = np.full(6, 0.9)
    predicted = ["a", "a", "b", "b", "a", "a"]
    gold = ["a", "b", "b", None, None, "a"]

    comparison = estimator.compare(confidences, predicted, gold)

    assert comparison.n_labelled == 4
    assert comparison.realized == pytest.approx(0.75)
    assert comparison.estimate == pytest.approx(float(estimator.calibrate([0.9])[0]))
    assert comparison.gap == pytest.approx(comparison.estimate - 0.75)


def test_compare_without_labelled_text_raises():
    rng = np.random.default_rng(20)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 500)))

    with pytest.raises(InsufficientSamplesError, match="no labelled text"):
        estimator.compare(np.full(3, 0.9), ["a"] * 3, [None] * 3)


def test_compare_length_mismatch_raises():
    rng = np.random.default_rng(21)
    estimator = AccuracyEstimator().fit(make_profile(*simulate(rng, 500)))

    with pytest.raises(DataError, match="equal lengths"):
        estimator.compare(np.full(3, 0.9), ["a"] * 3, ["a"] * 2)


def test_unfitted_estimator_raises():
    with pytest.raises(NotFittedError, match="fit"):
        AccuracyEstimator().estimate(np.full(40, 0.9))


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"method": "platt"}, "method"),
        ({"level": 1.0}, "level"),
        ({"level": 0}, "level"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_invalid_parameters_raise(arguments, name):
    with pytest.raises(ConfigError, match=name):
        AccuracyEstimator(**arguments)
