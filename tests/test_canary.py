"""Tests for retrain.canary: slice metrics, McNemar test, shadow comparison and gate decisions."""

from __future__ import annotations

import json

import pytest
from sklearn.metrics import f1_score

from monitor.errors import ConfigError, DataError
from retrain.canary import (
    CanaryDecision,
    CanaryGates,
    SliceComparison,
    compare_on_slice,
    compare_predictions,
    decide,
    shadow_compare,
)


class FixedClassifier:
    """Stand-in for Classifier that returns a fixed (label, probability) per text."""

    def __init__(self, answers: dict[str, tuple[str, float]]) -> None:
        self.answers = answers
        self.calls = 0

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        self.calls += 1
        return [self.answers[text] for text in texts]


def make_slice(name: str, n: int, current_accuracy: float, candidate_accuracy: float, p: float | None = 0.5) -> SliceComparison:
    return SliceComparison(
        name=name,
        n=n,
        current_accuracy=current_accuracy,
        candidate_accuracy=candidate_accuracy,
        current_macro_f1=current_accuracy,
        candidate_macro_f1=candidate_accuracy,
        mcnemar_p=p,
        candidate_only_correct=0,
        current_only_correct=0,
    )


def gate_by_name(decision: CanaryDecision, name: str) -> dict:
    matches = [gate for gate in decision.gates if gate["name"] == name]
    assert len(matches) == 1, f"expected one gate named {name!r}, got {[gate['name'] for gate in decision.gates]}"
    return matches[0]


def test_mcnemar_ten_to_zero_discordant():
    gold = ["a"] * 10 + ["b"] * 10
    current = ["b"] * 10 + ["b"] * 10  # wrong on the first 10
    candidate = list(gold)

    comparison = compare_predictions("production", gold, current, candidate)

    assert comparison.n == 20
    assert comparison.candidate_only_correct == 10
    assert comparison.current_only_correct == 0
    assert comparison.current_accuracy == 0.5
    assert comparison.candidate_accuracy == 1.0
    assert comparison.mcnemar_p == pytest.approx(2 * 0.5**10)
    assert comparison.candidate_macro_f1 == 1.0


def test_mcnemar_balanced_discordant_is_one():
    gold = ["a", "a", "b", "b"]
    current = ["a", "b", "b", "a"]  # right on 0 and 2
    candidate = ["b", "a", "a", "b"]  # right on 1 and 3

    comparison = compare_predictions("test", gold, current, candidate)

    assert comparison.candidate_only_correct == 2
    assert comparison.current_only_correct == 2
    assert comparison.mcnemar_p == pytest.approx(1.0)


def test_mcnemar_without_discordant_pairs():
    gold = ["a", "b", "c"]

    comparison = compare_predictions("test", gold, ["a", "b", "a"], ["a", "b", "a"])

    assert comparison.mcnemar_p == 1.0
    assert comparison.candidate_only_correct == 0
    assert comparison.current_only_correct == 0


def test_macro_f1_uses_gold_labels_only():
    gold = ["a", "a", "b", "b"]
    current = ["a", "a", "b", "z"]  # "z" never occurs in gold

    comparison = compare_predictions("test", gold, current, gold)

    expected = f1_score(gold, current, labels=["a", "b"], average="macro", zero_division=0)
    assert comparison.current_macro_f1 == pytest.approx(expected)
    # Counting "z" as a class with F1 0 would give about 0.55 instead.
    assert comparison.current_macro_f1 == pytest.approx((1.0 + 2 / 3) / 2)


def test_compare_predictions_length_mismatch():
    with pytest.raises(DataError, match="same length"):
        compare_predictions("test", ["a", "b"], ["a"], ["a", "b"])


def test_compare_predictions_empty_slice():
    comparison = compare_predictions("production", [], [], [])

    assert comparison.n == 0
    assert comparison.mcnemar_p is None


def test_slice_to_dict_is_json():
    comparison = compare_predictions("test", ["a", "b"], ["a", "a"], ["a", "b"])

    payload = json.loads(json.dumps(comparison.to_dict()))
    assert payload["name"] == "test"
    assert payload["candidate_only_correct"] == 1


def test_compare_on_slice_uses_both_classifiers():
    texts = ["t1", "t2", "t3"]
    current = FixedClassifier({"t1": ("a", 0.9), "t2": ("a", 0.8), "t3": ("b", 0.7)})
    candidate = FixedClassifier({"t1": ("a", 0.9), "t2": ("b", 0.6), "t3": ("b", 0.7)})

    comparison = compare_on_slice("production", texts, ["a", "b", "b"], current, candidate)

    assert comparison.current_accuracy == pytest.approx(2 / 3)
    assert comparison.candidate_accuracy == 1.0
    assert comparison.candidate_only_correct == 1
    assert current.calls == 1
    assert candidate.calls == 1


def test_compare_on_slice_length_mismatch():
    classifier = FixedClassifier({"t1": ("a", 1.0)})

    with pytest.raises(DataError, match="1 texts but 2 labels"):
        compare_on_slice("production", ["t1"], ["a", "b"], classifier, classifier)


def test_shadow_compare_agreement_and_confidence():
    current = FixedClassifier({"t1": ("a", 0.9), "t2": ("a", 0.5), "t3": ("b", 0.7), "t4": ("c", 0.3)})
    candidate = FixedClassifier({"t1": ("a", 0.8), "t2": ("b", 0.6), "t3": ("b", 0.9), "t4": ("c", 0.5)})

    report = shadow_compare(["t1", "t2", "t3", "t4"], current, candidate)

    assert report["n"] == 4
    assert report["agreement"] == pytest.approx(0.75)
    assert report["current_mean_confidence"] == pytest.approx(0.6)
    assert report["candidate_mean_confidence"] == pytest.approx(0.7)


def test_shadow_compare_empty():
    classifier = FixedClassifier({})

    report = shadow_compare([], classifier, classifier)

    assert report == {"n": 0, "agreement": None, "current_mean_confidence": None, "candidate_mean_confidence": None}
    assert classifier.calls == 0


def test_decide_passes_when_all_gates_pass():
    production = make_slice("production", 100, 0.70, 0.85)
    test = make_slice("test", 500, 0.86, 0.855)
    shadow = {"n": 10, "agreement": 0.9, "current_mean_confidence": 0.6, "candidate_mean_confidence": 0.7}

    decision = decide(production, test, shadow, CanaryGates())

    assert decision.status == "passed"
    assert decision.passed is True
    assert [gate["name"] for gate in decision.gates] == ["production_samples", "production_gain", "test_regression"]
    assert all(gate["passed"] for gate in decision.gates)
    assert gate_by_name(decision, "production_gain")["value"] == pytest.approx(0.15)
    assert gate_by_name(decision, "test_regression")["value"] == pytest.approx(0.005)
    assert decision.shadow == shadow


def test_decide_fails_without_production_gain():
    production = make_slice("production", 100, 0.80, 0.80)
    test = make_slice("test", 500, 0.86, 0.86)

    decision = decide(production, test, None, CanaryGates())

    assert decision.status == "failed"
    assert decision.passed is False
    gain_gate = gate_by_name(decision, "production_gain")
    assert gain_gate["passed"] is False
    assert gain_gate["threshold"] == 0.0
    assert "+0.0000" in gain_gate["message"]
    assert gate_by_name(decision, "test_regression")["passed"] is True


def test_decide_fails_on_test_regression():
    production = make_slice("production", 100, 0.70, 0.90)
    test = make_slice("test", 500, 0.86, 0.84)

    decision = decide(production, test, None, CanaryGates(max_test_regression=0.01))

    assert decision.status == "failed"
    regression_gate = gate_by_name(decision, "test_regression")
    assert regression_gate["passed"] is False
    assert regression_gate["value"] == pytest.approx(0.02)
    assert regression_gate["threshold"] == 0.01
    assert gate_by_name(decision, "production_gain")["passed"] is True


def test_decide_inconclusive_with_few_samples():
    production = make_slice("production", 12, 0.50, 1.00)
    test = make_slice("test", 500, 0.86, 0.86)

    decision = decide(production, test, None, CanaryGates(min_production_samples=30))

    assert decision.status == "inconclusive"
    assert decision.passed is False
    samples_gate = gate_by_name(decision, "production_samples")
    assert samples_gate["passed"] is False
    assert samples_gate["value"] == 12
    assert samples_gate["threshold"] == 30
    gain_gate = gate_by_name(decision, "production_gain")
    assert gain_gate["evaluated"] is False
    assert gain_gate["passed"] is False


def test_decide_inconclusive_without_production_slice():
    decision = decide(None, make_slice("test", 500, 0.86, 0.86), None, CanaryGates())

    assert decision.status == "inconclusive"
    assert decision.passed is False
    assert gate_by_name(decision, "production_samples")["value"] == 0
    assert gate_by_name(decision, "production_gain")["value"] is None


def test_decide_test_regression_beats_inconclusive():
    """A candidate that regresses on the test slice is rejected even while production data is short."""
    production = make_slice("production", 5, 0.60, 0.80)
    test = make_slice("test", 500, 0.86, 0.70)

    decision = decide(production, test, None, CanaryGates())

    assert decision.status == "failed"
    assert decision.passed is False


def test_decide_inconclusive_with_empty_test_slice():
    production = make_slice("production", 100, 0.70, 0.90)

    decision = decide(production, make_slice("test", 0, 0.0, 0.0, p=None), None, CanaryGates())

    assert decision.status == "inconclusive"
    assert gate_by_name(decision, "test_regression")["evaluated"] is False


@pytest.mark.parametrize(("p_value", "status"), [(0.01, "passed"), (0.2, "failed")])
def test_decide_mcnemar_gate(p_value, status):
    production = make_slice("production", 100, 0.70, 0.75, p=p_value)
    test = make_slice("test", 500, 0.86, 0.86)

    decision = decide(production, test, None, CanaryGates(max_mcnemar_p=0.05))

    assert decision.status == status
    mcnemar_gate = gate_by_name(decision, "production_mcnemar")
    assert mcnemar_gate["value"] == p_value
    assert mcnemar_gate["threshold"] == 0.05
    assert mcnemar_gate["passed"] is (status == "passed")


def test_decision_to_dict_is_json():
    production = compare_predictions("production", ["a"] * 40, ["b"] * 40, ["a"] * 40)
    test = compare_predictions("test", ["a", "b"], ["a", "b"], ["a", "b"])

    decision = decide(production, test, {"n": 0, "agreement": None}, CanaryGates(max_mcnemar_p=0.05))
    payload = json.loads(json.dumps(decision.to_dict()))

    assert payload["status"] == "passed"
    assert payload["production"]["n"] == 40
    assert payload["test"]["name"] == "test"
    assert {gate["name"] for gate in payload["gates"]} == {
        "production_samples", "production_gain", "production_mcnemar", "test_regression",
    }


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("min_production_samples", 0),
        ("min_production_samples", 2.5),
        ("min_production_gain", 3.0),
        ("max_test_regression", "0.01"),
        ("max_mcnemar_p", 0.0),
        ("max_mcnemar_p", 1.5),
    ],
)
def test_gates_validation_names_field(field_name, value):
    with pytest.raises(ConfigError) as raised:
        CanaryGates(**{field_name: value})

    assert f"CanaryGates.{field_name}" in str(raised.value)
    assert repr(value) in str(raised.value)


def test_compare_on_slice_with_real_classifiers(tiny_model_dir, tmp_path):
    """Two adapters of the tiny model run through compare_on_slice, shadow_compare and decide."""
    from retrain.model import Classifier
    from retrain.trainer import TrainSettings, train_adapter
    from tests.test_trainer import TOY_LABELS, TOY_SETTINGS, toy_examples

    weak_settings = TrainSettings(epochs=1, batch_size=8, max_steps=1, seed=1)
    weak = train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", weak_settings)
    strong = train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v2", TOY_SETTINGS)
    current = Classifier.load(str(tiny_model_dir), weak.adapter_dir, version="v1", device="cpu")
    candidate = Classifier.load(str(tiny_model_dir), strong.adapter_dir, version="v2", device="cpu")

    held_out = toy_examples(per_label=15, seed=7)
    texts = [text for text, _ in held_out]
    gold = [label for _, label in held_out]
    production = compare_on_slice("production", texts, gold, current, candidate)
    shadow = shadow_compare(texts, current, candidate)
    decision = decide(production, production, shadow, CanaryGates(max_test_regression=0.0))

    assert production.n == 45
    assert production.candidate_accuracy > production.current_accuracy
    assert shadow["n"] == 45
    assert 0.0 <= shadow["agreement"] <= 1.0
    assert decision.status == "passed"
