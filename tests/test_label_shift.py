"""Tests of the predicted-label distribution detector on synthetic label samples."""

import json

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from monitor.detectors.base import WindowFeatures
from monitor.detectors.label_shift import LabelShiftDetector
from monitor.errors import ConfigError, InsufficientSamplesError, NotFittedError
from monitor.reference import ReferenceProfile
from tests.test_detectors import make_profile as base_profile


def make_profile(labels: list[str]) -> ReferenceProfile:
    n = len(labels)
    shares = {label: labels.count(label) / n for label in set(labels)}
    return base_profile(val_confidences=np.full(n, 0.9), val_predicted_labels=labels, label_distribution=shares)


def make_window(labels: list[str]) -> WindowFeatures:
    n = len(labels)
    return WindowFeatures(
        token_counts=np.full(n, 5),
        token_ids=[[1]] * n,
        embeddings=np.zeros((n, 0), dtype=np.float32),
        confidences=np.full(n, 0.9),
        predicted_labels=labels,
        n_total=n,
    )


BALANCED = ["balance"] * 250 + ["transfer"] * 250


def test_label_shift_same_distribution_not_drifted():
    detector = LabelShiftDetector().fit(make_profile(BALANCED))

    result = detector.test(make_window(["balance"] * 52 + ["transfer"] * 48))

    assert result.status == "ok"
    assert result.signal == "label_distribution"
    assert not result.drifted
    assert result.p_value > 0.5
    assert result.details["dof"] == 1
    assert result.details["method"] == "g_test"


def test_label_shift_flags_changed_shares():
    detector = LabelShiftDetector(alpha=0.01).fit(make_profile(BALANCED))

    result = detector.test(make_window(["balance"] * 85 + ["transfer"] * 15))

    assert result.drifted
    assert result.p_value < 1e-6
    top = result.details["label_shifts"][0]
    assert top["reference_share"] == pytest.approx(0.5)
    assert top["window_share"] in (pytest.approx(0.85), pytest.approx(0.15))


def test_label_shift_matches_scipy_g_test():
    reference = ["a"] * 200 + ["b"] * 150 + ["c"] * 150
    window = ["a"] * 30 + ["b"] * 40 + ["c"] * 30
    table = np.array([[200, 150, 150], [30, 40, 30]])
    expected = chi2_contingency(table, correction=False, lambda_="log-likelihood")

    result = LabelShiftDetector().fit(make_profile(reference)).test(make_window(window))

    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.details["dof"] == 2
    assert result.details["pooled_labels"] == []


def test_label_shift_pools_rare_labels():
    reference = ["a"] * 240 + ["b"] * 240 + ["c"] * 10 + ["d"] * 10
    window = ["a"] * 50 + ["b"] * 48 + ["c"] * 1 + ["d"] * 1

    result = LabelShiftDetector().fit(make_profile(reference)).test(make_window(window))

    # Column totals 11 for c and d fall below 5 * 600 / 100 = 30. Pooled they make 22,
    # still below, so "<other>" joins the smaller of a and b.
    assert result.details["pooled_labels"] == ["c", "d"]
    assert result.details["cells"] == ["a", "b+<other>"]
    assert result.details["dof"] == 1
    assert not result.drifted


def test_label_shift_single_class_in_both():
    detector = LabelShiftDetector().fit(make_profile(["balance"] * 100))

    result = detector.test(make_window(["balance"] * 40))

    assert result.status == "ok"
    assert not result.drifted
    assert result.statistic == 0.0
    assert result.p_value == 1.0
    assert result.details["dof"] == 0
    assert result.details["method"] == "single_cell"


def test_label_shift_window_of_unseen_label():
    detector = LabelShiftDetector().fit(make_profile(BALANCED))

    result = detector.test(make_window(["refund"] * 50))

    assert result.drifted
    assert result.p_value < 1e-10
    assert result.details["unseen_labels"] == ["refund"]
    top = result.details["label_shifts"][0]
    assert top == {"label": "refund", "reference_share": 0.0, "window_share": 1.0}


def test_label_shift_unseen_label_against_single_reference_class():
    # With one reference class the pooled table keeps two columns and a small
    # expected count, so the exact test decides.
    detector = LabelShiftDetector().fit(make_profile(["balance"] * 500))

    result = detector.test(make_window(["refund"] * 30))

    assert result.details["method"] == "fisher_exact"
    assert result.details["cells"] == ["balance", "<other>"]
    assert result.drifted
    assert result.p_value < 1e-10


def test_label_shift_label_absent_from_window():
    reference = ["a"] * 200 + ["b"] * 200 + ["c"] * 100
    detector = LabelShiftDetector().fit(make_profile(reference))

    result = detector.test(make_window(["a"] * 50 + ["b"] * 50))

    assert result.drifted
    assert result.details["dof"] == 2
    shifts = {row["label"]: row for row in result.details["label_shifts"]}
    assert shifts["c"]["window_share"] == 0.0
    assert shifts["c"]["reference_share"] == pytest.approx(0.2)


def test_label_shift_empty_window_is_insufficient():
    detector = LabelShiftDetector().fit(make_profile(BALANCED))

    result = detector.test(make_window([]))

    assert result.status == "insufficient_data"
    assert result.n == 0
    assert result.p_value is None
    assert result.statistic is None
    assert result.drifted is False


def test_label_shift_below_min_samples_is_insufficient():
    detector = LabelShiftDetector(min_samples=30).fit(make_profile(BALANCED))

    result = detector.test(make_window(["balance"] * 29))

    assert result.status == "insufficient_data"
    assert result.n == 29
    assert result.details["min_samples"] == 30


def test_label_shift_null_calibrated():
    rng = np.random.default_rng(3)
    labels = np.array(["a", "b", "c", "d"])
    shares = [0.4, 0.3, 0.2, 0.1]
    detector = LabelShiftDetector().fit(make_profile(list(rng.choice(labels, size=2000, p=shares))))

    p_values = [detector.test(make_window(list(rng.choice(labels, size=200, p=shares)))).p_value for _ in range(200)]

    # Under the null about 10 of 200 p-values fall below 0.05, and 20 or more has probability below 0.01.
    assert sum(p < 0.05 for p in p_values) < 20


def test_label_shift_result_is_json_serialisable():
    detector = LabelShiftDetector().fit(make_profile(BALANCED))

    result = detector.test(make_window(["balance"] * 30 + ["refund"] * 10))

    json.dumps(result.to_dict(), allow_nan=False)


def test_label_shift_unfitted_raises():
    with pytest.raises(NotFittedError, match="fit"):
        LabelShiftDetector().test(make_window(["a"] * 40))


def test_label_shift_fit_needs_two_predictions():
    with pytest.raises(InsufficientSamplesError, match="1 validation predictions"):
        LabelShiftDetector().fit(make_profile(["a"]))


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"min_samples": 1}, "min_samples"),
        ({"min_expected": 0}, "min_expected"),
        ({"min_expected": "5"}, "min_expected"),
        ({"top_label_shifts": 0}, "top_label_shifts"),
    ],
)
def test_label_shift_invalid_parameters(arguments, name):
    with pytest.raises(ConfigError, match=name):
        LabelShiftDetector(**arguments)
