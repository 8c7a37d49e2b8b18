"""Tests for retrain.canary and retrain.paired_stats: slice statistics, shadow report, latency and gates."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from monitor.config import parse_config
from monitor.errors import ConfigError, DataError
from retrain.canary import (
    CanaryDecision,
    CanaryGates,
    ComparisonSettings,
    SliceComparison,
    compare_on_slice,
    compare_predictions,
    decide,
    measure_latency,
    shadow_compare,
)
from retrain.paired_stats import (
    ClassF1,
    ResampledDifferences,
    find_regressed_classes,
    mcnemar_exact_p,
    mcnemar_midp,
    one_sided_midp,
    paired_bootstrap,
)

GATE_NAMES = ["production_gain", "production_significance", "test_noninferiority", "test_class_regressions"]


class FixedClassifier:
    """Stand-in for Classifier that returns a fixed (label, probability) per text and logs its calls."""

    def __init__(self, answers: dict[str, tuple[str, float]], name: str = "", log: list | None = None) -> None:
        self.answers = answers
        self.name = name
        self.log = log if log is not None else []
        self.calls = 0

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        self.calls += 1
        self.log.append((self.name, tuple(texts)))
        return [self.answers[text] for text in texts]


def make_slice(
    name: str,
    n: int,
    current_accuracy: float,
    candidate_accuracy: float,
    midp: float | None = 0.01,
    accuracy_ci: tuple[float, float] | None = (-0.001, 0.02),
    per_class: tuple[ClassF1, ...] = (),
    regressed: tuple[str, ...] = (),
) -> SliceComparison:
    return SliceComparison(
        name=name,
        n=n,
        current_accuracy=current_accuracy,
        candidate_accuracy=candidate_accuracy,
        current_macro_f1=current_accuracy,
        candidate_macro_f1=candidate_accuracy,
        mcnemar_p=midp,
        candidate_only_correct=0,
        current_only_correct=0,
        mcnemar_midp=midp,
        macro_f1_diff_ci=accuracy_ci,
        accuracy_diff_ci=accuracy_ci,
        per_class=per_class,
        regressed_classes=regressed,
    )


def good_production() -> SliceComparison:
    return make_slice("production", 100, 0.70, 0.85, midp=0.001)


def good_test() -> SliceComparison:
    return make_slice("test", 500, 0.86, 0.86, accuracy_ci=(-0.004, 0.004))


def gate_by_name(decision: CanaryDecision, name: str) -> dict:
    matches = [gate for gate in decision.gates if gate["name"] == name]
    assert len(matches) == 1, f"expected one gate named {name!r}, got {[gate['name'] for gate in decision.gates]}"
    return matches[0]


def paired_predictions(n: int, seed: int, current_rate: float = 0.80, candidate_rate: float = 0.85):
    """Gold labels over three classes and two prediction lists with the given expected accuracies."""
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b", "c"])
    gold = labels[rng.integers(0, 3, n)]
    # One shared uniform per item makes the two models' errors correlated, as for two adapters of one model.
    uniform = rng.random(n)
    wrong = labels[(np.searchsorted(labels, gold) + 1) % 3]
    current = np.where(uniform < current_rate, gold, wrong)
    candidate = np.where(uniform < candidate_rate, gold, wrong)
    return list(gold), list(current), list(candidate)


# McNemar tests


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
    # Exact p minus the point probability P(X = 0) = 0.5**10.
    assert comparison.mcnemar_midp == pytest.approx(0.5**10)
    assert comparison.candidate_macro_f1 == 1.0


def test_midp_by_hand():
    # Discordant 4 : 1, so d = 5 and b = 1. P(X <= 1) = 6/32 and P(X = 1) = 5/32 for X ~ Binomial(5, 0.5).
    exact = mcnemar_exact_p(4, 1)
    midp = mcnemar_midp(4, 1)

    assert exact == pytest.approx(12 / 32)
    assert midp == pytest.approx(2 * 6 / 32 - 5 / 32)
    assert midp < exact
    assert mcnemar_midp(1, 4) == midp


def test_midp_below_exact_across_counts():
    for candidate_only, current_only in [(3, 0), (7, 2), (20, 11), (40, 25)]:
        assert mcnemar_midp(candidate_only, current_only) < mcnemar_exact_p(candidate_only, current_only)


def test_midp_without_evidence_is_one():
    assert mcnemar_midp(0, 0) == 1.0
    assert mcnemar_midp(3, 3) == pytest.approx(1.0)


def test_mcnemar_balanced_discordant_is_one():
    gold = ["a", "a", "b", "b"]
    current = ["a", "b", "b", "a"]  # right on 0 and 2
    candidate = ["b", "a", "a", "b"]  # right on 1 and 3

    comparison = compare_predictions("test", gold, current, candidate)

    assert comparison.candidate_only_correct == 2
    assert comparison.current_only_correct == 2
    assert comparison.mcnemar_p == pytest.approx(1.0)
    assert comparison.mcnemar_midp == pytest.approx(1.0)


def test_mcnemar_without_discordant_pairs():
    gold = ["a", "b", "c"]

    comparison = compare_predictions("test", gold, ["a", "b", "a"], ["a", "b", "a"])

    assert comparison.mcnemar_p == 1.0
    assert comparison.mcnemar_midp == 1.0
    assert comparison.candidate_only_correct == 0
    assert comparison.current_only_correct == 0


# Macro-F1 and per-class F1


def test_macro_f1_uses_gold_labels_only():
    gold = ["a", "a", "b", "b"]
    current = ["a", "a", "b", "z"]  # "z" never occurs in gold

    comparison = compare_predictions("test", gold, current, gold)

    expected = f1_score(gold, current, labels=["a", "b"], average="macro", zero_division=0)
    assert comparison.current_macro_f1 == pytest.approx(expected)
    # Counting "z" as a class with F1 0 would give about 0.55 instead.
    assert comparison.current_macro_f1 == pytest.approx((1.0 + 2 / 3) / 2)
    assert comparison.macro_f1_diff == pytest.approx(1.0 - (1.0 + 2 / 3) / 2)


def test_per_class_deltas_and_regressed_classes():
    # "a": 6 items, the candidate misses 3 of them. "b": 6 items, both perfect apart from the
    # candidate's extra "b" predictions. "c": 2 items, the candidate misses both (support below 5).
    gold = ["a"] * 6 + ["b"] * 6 + ["c"] * 2
    current = list(gold)
    candidate = ["a"] * 3 + ["b"] * 3 + ["b"] * 6 + ["a"] * 2

    settings = ComparisonSettings(class_min_support=5, class_alpha=1.0)
    comparison = compare_predictions("test", gold, current, candidate, settings)
    rows = {row["label"]: row for row in comparison.to_dict()["per_class"]}

    assert [row["label"] for row in comparison.to_dict()["per_class"]] == ["a", "b", "c"]
    assert rows["a"]["support"] == 6
    assert rows["a"]["current_f1"] == 1.0
    # "a": tp 3, predicted 5, gold 6, so F1 = 6 / 11.
    assert rows["a"]["candidate_f1"] == pytest.approx(6 / 11)
    assert rows["a"]["delta"] == pytest.approx(6 / 11 - 1.0)
    # "b": tp 6, predicted 9, gold 6, so F1 = 12 / 15.
    assert rows["b"]["candidate_f1"] == pytest.approx(0.8)
    assert rows["c"]["candidate_f1"] == 0.0
    assert rows["c"]["delta"] == -1.0
    # "c" fell furthest but has support 2; "b" fell by 0.2.
    assert comparison.regressed_classes == ("a", "b")
    # The test counts each class's own items: "a" lost 3 of its 6, "b" (whose F1 fell through
    # false alarms) lost none of its own, and "c" lost both, which shows in its row alone.
    assert (rows["a"]["lost"], rows["a"]["gained"]) == (3, 0)
    assert (rows["b"]["lost"], rows["b"]["gained"]) == (0, 0)
    assert (rows["c"]["lost"], rows["c"]["gained"]) == (2, 0)
    assert rows["a"]["p_value"] == pytest.approx(0.5 ** 3 / 2)
    assert rows["b"]["p_value"] == 1.0
    # Holm over the two classes with support 5 or more; "c" is outside the family.
    assert rows["a"]["adjusted_p"] == pytest.approx(2 * 0.5 ** 3 / 2)
    assert rows["b"]["adjusted_p"] == 1.0
    assert rows["c"]["adjusted_p"] is None

    # With the test at 5 percent, three lost items of six are too few to name "a".
    tested = compare_predictions("test", gold, current, candidate, ComparisonSettings(class_min_support=5))
    assert tested.regressed_classes == ()


def test_class_whose_recall_collapses_is_regressed():
    """A candidate that stops predicting a class, removing its false alarms too, still regresses on it."""
    gold, current, candidate = [], [], []
    for index in range(10):
        label = f"intent_{index}"
        gold += [label] * 30
        current += [label] * 30
        candidate += [label] * 30
    # The current model gets 20 of intent_0's items and takes 60 items of other classes as intent_0.
    current[20:30] = ["intent_1"] * 10
    for start in range(30, 300, 30):
        current[start:start + 7] = ["intent_0"] * 7
    # The candidate never predicts intent_0 and gets every other item right.
    candidate[0:30] = ["intent_1"] * 30

    comparison = compare_predictions("test", gold, current, candidate)
    rows = {item.label: item for item in comparison.per_class}

    assert rows["intent_0"].candidate_f1 == 0.0
    assert (rows["intent_0"].lost, rows["intent_0"].gained) == (20, 0)
    assert "intent_0" in comparison.regressed_classes


def test_regressed_classes_worst_first_and_margin():
    classes = [
        ClassF1("small", 4, 1.0, 0.0),
        ClassF1("mild", 30, 0.90, 0.85),
        ClassF1("bad", 30, 0.90, 0.60),
        ClassF1("worse", 30, 0.90, 0.40),
        ClassF1("edge", 30, 0.90, 0.80),
    ]

    assert find_regressed_classes(classes, min_support=5, margin=0.1)[0] == ["worse", "bad"]
    assert find_regressed_classes(classes, min_support=1, margin=0.0)[0] == ["small", "worse", "bad", "edge", "mild"]


def test_one_sided_midp():
    assert one_sided_midp(0, 0) == 1.0
    assert one_sided_midp(4, 0) == pytest.approx(1 / 32)
    assert one_sided_midp(0, 4) == pytest.approx(1 - 1 / 32)
    # Balanced discordance: the mid-p value of the middle outcome is one half.
    assert one_sided_midp(3, 3) == pytest.approx(0.5)


def _thirty_classes(losses: dict[int, int]) -> tuple[list[str], list[str], list[str]]:
    """30 classes of 30 items, both models perfect except ``losses[class]`` items the candidate misses."""
    gold, current, candidate = [], [], []
    for index in range(30):
        label = f"intent_{index:02d}"
        for item in range(30):
            gold.append(label)
            current.append(label)
            candidate.append("oos" if item < losses.get(index, 0) else label)
    return gold, current, candidate


def test_chance_sized_class_drops_are_not_regressions():
    """Drops of 4 correct items in 30 on a few of 30 classes, F1 down by about 0.07 to 0.13: noise after Holm."""
    gold, current, candidate = _thirty_classes({3: 4, 11: 4, 20: 4, 27: 3})

    tested = compare_predictions("test", gold, current, candidate, ComparisonSettings(class_regression_margin=0.05))
    untested = compare_predictions("test", gold, current, candidate,
                                   ComparisonSettings(class_regression_margin=0.05, class_alpha=1.0))

    assert tested.regressed_classes == ()
    assert set(untested.regressed_classes) == {"intent_03", "intent_11", "intent_20", "intent_27"}


def test_large_class_drop_is_a_regression_after_holm():
    gold, current, candidate = _thirty_classes({5: 20, 11: 4})

    comparison = compare_predictions("test", gold, current, candidate)
    rows = {item.label: item for item in comparison.per_class}

    assert comparison.regressed_classes == ("intent_05",)
    assert rows["intent_05"].adjusted_p < 1e-4
    assert rows["intent_11"].adjusted_p > 0.05


# Paired bootstrap


def test_resampled_differences_match_sklearn():
    gold, current, candidate = paired_predictions(60, seed=3)
    candidate[0] = "z"  # a label outside gold only counts as a miss
    labels = sorted(set(gold))
    indices = np.random.default_rng(11).integers(0, 60, size=(4, 60))

    differences = ResampledDifferences(gold, current, candidate, labels)(indices)

    assert differences.shape == (2, 4)
    for row, resample in enumerate(indices):
        sub_gold = [gold[i] for i in resample]
        sub_current = [current[i] for i in resample]
        sub_candidate = [candidate[i] for i in resample]
        present = sorted(set(sub_gold))
        f1_diff = (f1_score(sub_gold, sub_candidate, labels=present, average="macro", zero_division=0)
                   - f1_score(sub_gold, sub_current, labels=present, average="macro", zero_division=0))
        accuracy_diff = accuracy_score(sub_gold, sub_candidate) - accuracy_score(sub_gold, sub_current)
        assert differences[0, row] == pytest.approx(f1_diff)
        assert differences[1, row] == pytest.approx(accuracy_diff)


def test_bootstrap_interval_contains_true_difference():
    gold, current, candidate = paired_predictions(2000, seed=5)

    comparison = compare_predictions("test", gold, current, candidate)
    low, high = comparison.accuracy_diff_ci

    # The items were drawn with expected accuracies 0.80 and 0.85.
    assert low < 0.05 < high
    assert low <= comparison.accuracy_gain <= high
    f1_low, f1_high = comparison.macro_f1_diff_ci
    assert f1_low <= comparison.macro_f1_diff <= f1_high
    assert f1_low > 0.0


def test_bootstrap_interval_shrinks_with_n():
    gold, current, candidate = paired_predictions(200, seed=2)
    labels = sorted(set(gold))

    small = paired_bootstrap(gold, current, candidate, labels, n_resamples=1000, seed=0)
    large = paired_bootstrap(gold * 16, current * 16, candidate * 16, labels, n_resamples=1000, seed=0)

    small_width = small.accuracy_diff[1] - small.accuracy_diff[0]
    large_width = large.accuracy_diff[1] - large.accuracy_diff[0]
    # Sixteen times the items should give about a quarter of the width.
    assert large_width < small_width / 2
    assert large.macro_f1_diff[1] - large.macro_f1_diff[0] < (small.macro_f1_diff[1] - small.macro_f1_diff[0]) / 2


def test_bootstrap_reproducible_with_seed():
    gold, current, candidate = paired_predictions(300, seed=4)
    labels = sorted(set(gold))

    first = paired_bootstrap(gold, current, candidate, labels, n_resamples=500, seed=7)
    again = paired_bootstrap(gold, current, candidate, labels, n_resamples=500, seed=7)
    other = paired_bootstrap(gold, current, candidate, labels, n_resamples=500, seed=8)

    assert first == again
    assert first != other


def test_bootstrap_of_identical_models_is_zero():
    gold, current, _ = paired_predictions(100, seed=1)

    comparison = compare_predictions("test", gold, current, current)

    assert comparison.accuracy_diff_ci == (0.0, 0.0)
    assert comparison.macro_f1_diff_ci == (0.0, 0.0)


def test_bootstrap_needs_two_items():
    with pytest.raises(ValueError, match="at least 2 items, got 1"):
        paired_bootstrap(["a"], ["a"], ["a"], ["a"], n_resamples=100, seed=0)

    comparison = compare_predictions("test", ["a"], ["a"], ["b"])
    assert comparison.accuracy_diff_ci is None
    assert comparison.macro_f1_diff_ci is None


# Slices


def test_compare_predictions_length_mismatch():
    with pytest.raises(DataError, match="same length"):
        compare_predictions("test", ["a", "b"], ["a"], ["a", "b"])


def test_compare_predictions_empty_slice():
    comparison = compare_predictions("production", [], [], [])

    assert comparison.n == 0
    assert comparison.mcnemar_p is None
    assert comparison.mcnemar_midp is None
    assert comparison.accuracy_diff_ci is None
    assert comparison.per_class == ()


def test_slice_to_dict_is_json():
    gold, current, candidate = paired_predictions(50, seed=6)
    comparison = compare_predictions("test", gold, current, candidate)

    payload = json.loads(json.dumps(comparison.to_dict()))

    assert payload["name"] == "test"
    assert payload["candidate_only_correct"] == comparison.candidate_only_correct
    assert payload["mcnemar_midp"] == comparison.mcnemar_midp
    assert payload["accuracy_diff"] == pytest.approx(comparison.accuracy_gain)
    assert payload["accuracy_diff_ci"] == list(comparison.accuracy_diff_ci)
    assert payload["macro_f1_diff_ci"] == list(comparison.macro_f1_diff_ci)
    assert [row["label"] for row in payload["per_class"]] == ["a", "b", "c"]
    assert set(payload["per_class"][0]) == {"label", "support", "current_f1", "candidate_f1", "delta", "lost", "gained",
                                            "p_value", "adjusted_p"}
    assert payload["regressed_classes"] == list(comparison.regressed_classes)


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


# Shadow traffic


def test_shadow_compare_agreement_and_confidence():
    current = FixedClassifier({"t1": ("a", 0.9), "t2": ("a", 0.5), "t3": ("b", 0.7), "t4": ("c", 0.3)})
    candidate = FixedClassifier({"t1": ("a", 0.8), "t2": ("b", 0.6), "t3": ("b", 0.9), "t4": ("c", 0.5)})

    report = shadow_compare(["t1", "t2", "t3", "t4"], current, candidate)

    assert report["n"] == 4
    assert report["agreement"] == pytest.approx(0.75)
    assert report["current_mean_confidence"] == pytest.approx(0.6)
    assert report["candidate_mean_confidence"] == pytest.approx(0.7)


def test_shadow_flips_counts_and_samples():
    # a -> b three times, b -> c twice, c -> a once, and two texts unchanged.
    pairs = [("a", "b")] * 3 + [("b", "c")] * 2 + [("c", "a"), ("a", "a"), ("b", "b")]
    texts = [f"text {index} " + "x" * 300 for index in range(len(pairs))]
    current = FixedClassifier({text: (pair[0], 0.6) for text, pair in zip(texts, pairs)})
    candidate = FixedClassifier({text: (pair[1], 0.7) for text, pair in zip(texts, pairs)})

    report = shadow_compare(texts, current, candidate)

    assert report["agreement"] == pytest.approx(2 / 8)
    assert report["flips"] == [
        {"current": "a", "candidate": "b", "count": 3},
        {"current": "b", "candidate": "c", "count": 2},
        {"current": "c", "candidate": "a", "count": 1},
    ]
    assert report["flips_by_class"] == {
        "a": {"to_other": 3, "from_other": 1},
        "b": {"to_other": 2, "from_other": 3},
        "c": {"to_other": 1, "from_other": 2},
    }
    assert len(report["samples"]) == 6
    first = report["samples"][0]
    assert first["text"] == texts[0][:200]
    assert len(first["text"]) == 200
    assert (first["current"], first["candidate"]) == ("a", "b")
    assert first["current_confidence"] == 0.6
    assert first["candidate_confidence"] == 0.7


def test_shadow_flips_capped():
    # 30 distinct label changes, one input each.
    texts = [f"t{index}" for index in range(30)]
    current = FixedClassifier({text: (f"old{index:02d}", 0.5) for index, text in enumerate(texts)})
    candidate = FixedClassifier({text: (f"new{index:02d}", 0.5) for index, text in enumerate(texts)})

    report = shadow_compare(texts, current, candidate)

    assert len(report["flips"]) == 20
    assert len(report["samples"]) == 10
    assert len(report["flips_by_class"]) == 60
    assert report["samples"][0]["text"] == "t0"


def test_shadow_compare_empty():
    classifier = FixedClassifier({})

    report = shadow_compare([], classifier, classifier)

    assert report["n"] == 0
    assert report["agreement"] is None
    assert report["flips"] == []
    assert report["flips_by_class"] == {}
    assert report["samples"] == []
    assert classifier.calls == 0


# Latency


def test_latency_alternates_single_text_calls():
    log: list = []
    texts = ["t1", "t2", "t3", "t4"]
    answers = {text: ("a", 0.5) for text in texts}
    current = FixedClassifier(answers, "current", log)
    candidate = FixedClassifier(answers, "candidate", log)

    latency = measure_latency(texts, current, candidate, max_samples=3)

    assert latency["n"] == 3
    # One untimed warm-up call each, then one text at a time with the first model alternating.
    assert log == [
        ("current", ("t1",)), ("candidate", ("t1",)),
        ("current", ("t1",)), ("candidate", ("t1",)),
        ("candidate", ("t2",)), ("current", ("t2",)),
        ("current", ("t3",)), ("candidate", ("t3",)),
    ]
    for role in ("current", "candidate"):
        assert isinstance(latency[f"{role}_p50_ms"], float)
        assert 0.0 <= latency[f"{role}_p50_ms"] <= latency[f"{role}_p99_ms"]


def test_latency_without_texts():
    classifier = FixedClassifier({"t1": ("a", 0.5)})

    for texts, max_samples in (([], 100), (["t1"], 0)):
        latency = measure_latency(texts, classifier, classifier, max_samples)
        assert latency == {"n": 0, "current_p50_ms": None, "current_p99_ms": None,
                           "candidate_p50_ms": None, "candidate_p99_ms": None}
    assert classifier.calls == 0


# Gates and decisions


def test_decide_passes_when_all_gates_pass():
    shadow = {"n": 10, "agreement": 0.9, "current_mean_confidence": 0.6, "candidate_mean_confidence": 0.7}

    decision = decide(good_production(), good_test(), shadow, CanaryGates())

    assert decision.status == "passed"
    assert decision.passed is True
    assert decision.deciding_gate is None
    assert [gate["name"] for gate in decision.gates] == GATE_NAMES
    assert all(gate["passed"] and gate["evaluated"] for gate in decision.gates)
    assert gate_by_name(decision, "production_gain")["value"] == pytest.approx(0.15)
    assert gate_by_name(decision, "production_significance")["value"] == 0.001
    assert gate_by_name(decision, "test_noninferiority")["value"] == -0.004
    assert gate_by_name(decision, "test_noninferiority")["threshold"] == -0.005
    assert decision.shadow == shadow


def test_decide_fails_without_production_gain():
    production = make_slice("production", 100, 0.80, 0.80, midp=0.001)

    decision = decide(production, good_test(), None, CanaryGates())

    assert decision.status == "failed"
    assert decision.passed is False
    assert decision.deciding_gate == "production_gain"
    gain_gate = gate_by_name(decision, "production_gain")
    assert gain_gate["passed"] is False
    assert gain_gate["threshold"] == 0.0
    assert "+0.0000" in gain_gate["message"]
    assert gate_by_name(decision, "test_noninferiority")["passed"] is True


@pytest.mark.parametrize(("midp", "status"), [(0.01, "passed"), (0.05, "failed"), (0.2, "failed")])
def test_decide_production_significance(midp, status):
    production = make_slice("production", 100, 0.70, 0.75, midp=midp)

    decision = decide(production, good_test(), None, CanaryGates(production_alpha=0.05))

    assert decision.status == status
    significance_gate = gate_by_name(decision, "production_significance")
    assert significance_gate["value"] == midp
    assert significance_gate["threshold"] == 0.05
    assert significance_gate["passed"] is (status == "passed")
    assert decision.deciding_gate == (None if status == "passed" else "production_significance")


def test_decide_inconclusive_with_few_production_samples():
    production = make_slice("production", 12, 0.50, 1.00, midp=0.001)

    decision = decide(production, good_test(), None, CanaryGates(min_production_samples=30))

    assert decision.status == "inconclusive"
    assert decision.passed is False
    assert decision.deciding_gate == "production_gain"
    for name in ("production_gain", "production_significance"):
        gate = gate_by_name(decision, name)
        assert gate["evaluated"] is False
        assert gate["passed"] is False
        assert "12 labelled production samples, need at least 30" in gate["message"]


def test_decide_inconclusive_without_production_slice():
    decision = decide(None, good_test(), None, CanaryGates())

    assert decision.status == "inconclusive"
    assert decision.deciding_gate == "production_gain"
    assert gate_by_name(decision, "production_gain")["value"] is None
    assert gate_by_name(decision, "production_significance")["value"] is None


@pytest.mark.parametrize(("candidate", "lower", "status"), [
    (0.86, -0.005, "passed"),
    (0.86, 0.01, "passed"),
    # Worse by more than the margin: failed.
    (0.85, -0.02, "failed"),
    # Within the margin, but the interval is too wide to show it: not decided.
    (0.86, -0.0051, "inconclusive"),
    (0.857, -0.03, "inconclusive"),
])
def test_decide_noninferiority(candidate, lower, status):
    test = make_slice("test", 500, 0.86, candidate, accuracy_ci=(lower, lower + 0.02))

    decision = decide(good_production(), test, None, CanaryGates(noninferiority_margin=0.005))

    assert decision.status == status
    gate = gate_by_name(decision, "test_noninferiority")
    assert gate["value"] == lower
    assert gate["passed"] is (status == "passed")
    assert gate["evaluated"] is (status != "inconclusive")


def test_decide_inconclusive_with_few_test_samples():
    test = make_slice("test", 99, 0.86, 0.86)

    decision = decide(good_production(), test, None, CanaryGates(min_test_samples=100))

    assert decision.status == "inconclusive"
    assert decision.deciding_gate == "test_noninferiority"
    for name in ("test_noninferiority", "test_class_regressions"):
        gate = gate_by_name(decision, name)
        assert gate["evaluated"] is False
        assert "99 test samples, need at least 100" in gate["message"]


def test_decide_inconclusive_with_empty_test_slice():
    decision = decide(good_production(), compare_predictions("test", [], [], []), None, CanaryGates())

    assert decision.status == "inconclusive"
    assert gate_by_name(decision, "test_noninferiority")["evaluated"] is False


def test_decide_failure_beats_inconclusive():
    """A candidate that is inferior on the test slice is rejected even while production data is short."""
    production = make_slice("production", 5, 0.60, 0.80)
    test = make_slice("test", 500, 0.86, 0.70, accuracy_ci=(-0.2, -0.12))

    decision = decide(production, test, None, CanaryGates())

    assert decision.status == "failed"
    assert decision.passed is False
    assert decision.deciding_gate == "test_noninferiority"


def test_decide_class_regressions_named():
    labels = [f"intent_{index:02d}" for index in range(13)]
    per_class = tuple(ClassF1(label, 30, 0.9, 0.9 - 0.2 - index / 100) for index, label in enumerate(labels))
    worst_first = tuple(reversed(labels))
    test = make_slice("test", 500, 0.86, 0.86, per_class=per_class, regressed=worst_first)

    decision = decide(good_production(), test, None, CanaryGates(max_regressed_classes=2))

    assert decision.status == "failed"
    assert decision.deciding_gate == "test_class_regressions"
    gate = gate_by_name(decision, "test_class_regressions")
    assert gate["value"] == 13
    assert gate["threshold"] == 2
    assert "13 test classes regressed, at most 2 allowed" in gate["message"]
    assert "intent_12 (-0.320)" in gate["message"]
    assert "intent_03" in gate["message"]
    assert "intent_02" not in gate["message"]
    assert gate["message"].endswith("and 3 more")


def test_decide_class_regressions_within_allowance():
    test = make_slice("test", 500, 0.86, 0.86, regressed=("a", "b"))

    decision = decide(good_production(), test, None, CanaryGates(max_regressed_classes=2))

    assert decision.status == "passed"
    assert gate_by_name(decision, "test_class_regressions")["passed"] is True


def test_decision_to_dict_is_json():
    production = compare_predictions("production", ["a", "b"] * 20, ["b", "b"] * 20, ["a", "b"] * 20)
    gold, current, candidate = paired_predictions(200, seed=8, current_rate=0.8, candidate_rate=0.8)
    test = compare_predictions("test", gold, current, candidate)
    shadow = shadow_compare(
        ["t1", "t2"], FixedClassifier({"t1": ("a", 0.5), "t2": ("b", 0.5)}),
        FixedClassifier({"t1": ("b", 0.6), "t2": ("b", 0.6)}),
    )
    latency = {"n": 2, "current_p50_ms": 1.0, "current_p99_ms": 2.0, "candidate_p50_ms": 1.5, "candidate_p99_ms": 3.0}

    decision = decide(production, test, shadow, CanaryGates(), latency)
    text = json.dumps(decision.to_dict(), allow_nan=False)
    payload = json.loads(text)

    assert list(payload) == ["passed", "status", "deciding_gate", "gates", "production", "test", "shadow", "latency"]
    assert payload["status"] == "passed"
    assert payload["deciding_gate"] is None
    assert payload["production"]["n"] == 40
    assert payload["test"]["accuracy_diff_ci"] == list(test.accuracy_diff_ci)
    assert payload["shadow"]["flips"] == [{"current": "a", "candidate": "b", "count": 1}]
    assert payload["latency"] == latency
    assert [gate["name"] for gate in payload["gates"]] == GATE_NAMES
    for gate in payload["gates"]:
        assert set(gate) == {"name", "passed", "evaluated", "value", "threshold", "message"}


# Settings and config validation


@pytest.mark.parametrize(
    ("settings_class", "field_name", "value"),
    [
        (CanaryGates, "min_production_samples", 0),
        (CanaryGates, "min_production_samples", 2.5),
        (CanaryGates, "min_production_gain", 3.0),
        (CanaryGates, "production_alpha", 0.0),
        (CanaryGates, "production_alpha", 1.5),
        (CanaryGates, "production_alpha", "0.05"),
        (CanaryGates, "min_test_samples", 1),
        (CanaryGates, "noninferiority_margin", -0.01),
        (CanaryGates, "noninferiority_margin", float("nan")),
        (CanaryGates, "max_regressed_classes", -1),
        (ComparisonSettings, "bootstrap_samples", 0),
        (ComparisonSettings, "bootstrap_samples", True),
        (ComparisonSettings, "seed", -1),
        (ComparisonSettings, "class_min_support", 0),
        (ComparisonSettings, "class_regression_margin", -0.1),
        (ComparisonSettings, "class_alpha", 0.0),
        (ComparisonSettings, "class_alpha", 1.5),
    ],
)
def test_settings_validation_names_field(settings_class, field_name, value):
    with pytest.raises(ConfigError) as raised:
        settings_class(**{field_name: value})

    assert f"{settings_class.__name__}.{field_name}" in str(raised.value)
    assert repr(value) in str(raised.value)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("bootstrap_samples", 0), ("production_alpha", 0.0), ("production_alpha", 1.5), ("noninferiority_margin", -0.01),
     ("class_alpha", 0.0)],
)
def test_config_rejects_bad_canary_value(field_name, value):
    with pytest.raises(ConfigError) as raised:
        parse_config({"canary": {field_name: value}})

    assert f"canary.{field_name}: invalid value {value!r}" in str(raised.value)


def test_config_names_replacement_of_removed_key():
    with pytest.raises(ConfigError) as raised:
        parse_config({"canary": {"max_test_regression": 0.01}})

    message = str(raised.value)
    assert "canary.max_test_regression: this key was removed" in message
    assert "canary.noninferiority_margin" in message


def test_gates_and_settings_from_config():
    canary = parse_config({"canary": {"noninferiority_margin": 0.01, "bootstrap_samples": 200, "seed": 3}}).canary

    gates = CanaryGates.from_config(canary)
    settings = ComparisonSettings.from_config(canary)

    assert gates.noninferiority_margin == 0.01
    assert gates.production_alpha == 0.05
    assert settings.bootstrap_samples == 200
    assert settings.seed == 3


# Real classifiers


def test_compare_on_slice_with_real_classifiers(tiny_model_dir, tmp_path):
    """Two adapters of the tiny model run through compare_on_slice, shadow_compare, measure_latency and decide."""
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
    latency = measure_latency(texts, current, candidate, max_samples=5)
    gates = CanaryGates(min_test_samples=2, noninferiority_margin=0.0)
    decision = decide(production, production, shadow, gates, latency)

    assert production.n == 45
    assert production.candidate_accuracy > production.current_accuracy
    assert production.accuracy_diff_ci[0] <= production.accuracy_gain <= production.accuracy_diff_ci[1]
    assert len(production.per_class) == len(TOY_LABELS)
    assert shadow["n"] == 45
    assert 0.0 <= shadow["agreement"] <= 1.0
    assert sum(flip["count"] for flip in shadow["flips"]) == round(45 * (1 - shadow["agreement"]))
    assert latency["n"] == 5
    assert decision.status == "passed", decision.gates
    json.dumps(decision.to_dict(), allow_nan=False)


def _paired_outcomes(n: int, both_right: int, candidate_only: int, current_only: int):
    gold = ["a"] * n
    current = ["a"] * both_right + ["b"] * candidate_only + ["a"] * current_only
    candidate = ["a"] * both_right + ["a"] * candidate_only + ["b"] * current_only
    rest = n - len(current)
    return gold, current + ["b"] * rest, candidate + ["b"] * rest


def test_undecided_gate_names_needed_items():
    # 900 items, the models disagree on 60 (6.7 percent), the candidate one item behind.
    gold, current, candidate = _paired_outcomes(900, 800, 29, 30)
    test = compare_predictions("test", gold, current, candidate)

    decision = decide(good_production(), test, None, CanaryGates(noninferiority_margin=0.005))

    gate = gate_by_name(decision, "test_noninferiority")
    assert decision.status == "inconclusive"
    match = re.search(r"disagreeing on ([0-9.]+)% of the items, about ([0-9,]+) test items would decide",
                      gate["message"])
    assert match, gate["message"]
    needed = int(match.group(2).replace(",", ""))
    assert match.group(1) == "6.6"
    # z^2 * d / (difference + margin)^2 = 1.96^2 * 0.0656 / (0.0039)^2, about 16,600.
    assert 15_000 < needed < 18_000

    # The same proportions at that size decide: the lower bound clears the margin.
    scale = math.ceil(needed / 900) + 1
    gold, current, candidate = _paired_outcomes(900 * scale, 800 * scale, 29 * scale, 30 * scale)
    larger = compare_predictions("test", gold, current, candidate, ComparisonSettings(bootstrap_samples=300))
    assert decide(good_production(), larger, None, CanaryGates(noninferiority_margin=0.005)).status == "passed"


def test_undecided_message_without_headroom_names_no_size():
    gold, current, candidate = _paired_outcomes(200, 150, 10, 11)
    test = compare_predictions("test", gold, current, candidate)

    gate = gate_by_name(decide(good_production(), test, None, CanaryGates(noninferiority_margin=0.005)),
                        "test_noninferiority")

    # A difference of exactly -0.005 leaves no room: more items cannot show non-inferiority.
    assert "would decide" not in gate["message"]
