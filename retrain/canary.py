"""Canary evaluation: compare a candidate adapter with the current one and decide on promotion.

Both adapters score the same labelled slices: held-out production events, where the candidate
must be better, and the original test split, where it must be no worse than a margin. Recent
unlabelled traffic shows where their predictions differ, and single-text latency of both is
measured. ``decide`` turns the slice comparisons into gate results and one status.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy.stats import norm

from monitor.errors import ConfigError, DataError
from retrain.paired_stats import (
    CONFIDENCE_LEVEL,
    ClassF1,
    find_regressed_classes,
    mcnemar_exact_p,
    mcnemar_midp,
    paired_bootstrap,
    per_class_f1,
)

if TYPE_CHECKING:
    from retrain.model import Classifier

PASSED = "passed"
FAILED = "failed"
INCONCLUSIVE = "inconclusive"

# Sizes of the shadow report, which is read by people and gates nothing.
SHADOW_TOP_FLIPS = 20
SHADOW_SAMPLES = 10
SHADOW_SAMPLE_CHARS = 200
# Regressed classes named in a gate message before the rest are only counted.
NAMED_CLASSES = 10


def _require_int(owner: str, field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}.{field_name} must be an integer >= {minimum}, got {value!r}")


def _require_number(owner: str, field_name: str, value: Any, low: float, high: float, *,
                    low_exclusive: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number in [low, high], or (low, high] when ``low_exclusive``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above_low = number and (value > low if low_exclusive else value >= low)
    if not (above_low and value <= high):
        interval = f"{'(' if low_exclusive else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{owner}.{field_name} must be a number in {interval}, got {value!r}")


class _FromCanaryConfig:
    """Mixin for dataclasses whose fields are a subset of ``CanaryConfig``'s."""

    @classmethod
    def from_config(cls, section: Any):
        """Build an instance from the same-named fields of a ``CanaryConfig``."""
        return cls(**{field.name: getattr(section, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class ComparisonSettings(_FromCanaryConfig):
    """Settings of the paired comparison on one slice.

    bootstrap_samples: resamples behind each bootstrap interval.
    seed: seed of the bootstrap's random generator, so a rerun gives the same intervals.
    class_min_support: gold examples a class needs before its F1 change counts as a regression.
    class_regression_margin: F1 drop (current minus candidate) above which a class has regressed.
    class_alpha: a class has regressed only when, besides the F1 drop, its paired test is
        significant at this level after Holm's correction over the classes tested (1.0: no test).
    """

    bootstrap_samples: int = 1000
    seed: int = 0
    class_min_support: int = 5
    class_regression_margin: float = 0.1
    class_alpha: float = 0.05

    def __post_init__(self) -> None:
        owner = "ComparisonSettings"
        for field_name, minimum in (("bootstrap_samples", 100), ("seed", 0), ("class_min_support", 1)):
            _require_int(owner, field_name, getattr(self, field_name), minimum)
        _require_number(owner, "class_regression_margin", self.class_regression_margin, 0.0, 1.0)
        _require_number(owner, "class_alpha", self.class_alpha, 0.0, 1.0, low_exclusive=True)


@dataclass(frozen=True)
class SliceComparison:
    """Paired comparison of current and candidate predictions on one labelled slice.

    ``mcnemar_p`` is the exact McNemar p-value and ``mcnemar_midp`` its mid-p version. Both are
    None only for an empty slice, and 1.0 when the two models never disagree on correctness.
    ``candidate_only_correct`` and ``current_only_correct`` are the discordant pairs. The two
    intervals are paired percentile bootstrap intervals of candidate minus current, None for
    fewer than two items. ``per_class`` has one entry per gold label, sorted by label, and
    ``regressed_classes`` lists the labels whose F1 fell beyond the margin, worst first.
    """

    name: str
    n: int
    current_accuracy: float
    candidate_accuracy: float
    current_macro_f1: float
    candidate_macro_f1: float
    mcnemar_p: float | None
    candidate_only_correct: int
    current_only_correct: int
    mcnemar_midp: float | None = None
    macro_f1_diff_ci: tuple[float, float] | None = None
    accuracy_diff_ci: tuple[float, float] | None = None
    per_class: tuple[ClassF1, ...] = ()
    regressed_classes: tuple[str, ...] = ()

    @property
    def accuracy_gain(self) -> float:
        """Candidate accuracy minus current accuracy."""
        return self.candidate_accuracy - self.current_accuracy

    @property
    def macro_f1_diff(self) -> float:
        """Candidate macro-F1 minus current macro-F1."""
        return self.candidate_macro_f1 - self.current_macro_f1

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n": self.n,
            "current_accuracy": self.current_accuracy,
            "candidate_accuracy": self.candidate_accuracy,
            "accuracy_diff": self.accuracy_gain,
            "accuracy_diff_ci": list(self.accuracy_diff_ci) if self.accuracy_diff_ci is not None else None,
            "current_macro_f1": self.current_macro_f1,
            "candidate_macro_f1": self.candidate_macro_f1,
            "macro_f1_diff": self.macro_f1_diff,
            "macro_f1_diff_ci": list(self.macro_f1_diff_ci) if self.macro_f1_diff_ci is not None else None,
            "mcnemar_p": self.mcnemar_p,
            "mcnemar_midp": self.mcnemar_midp,
            "candidate_only_correct": self.candidate_only_correct,
            "current_only_correct": self.current_only_correct,
            "per_class": [item.to_dict() for item in self.per_class],
            "regressed_classes": list(self.regressed_classes),
        }


def compare_predictions(
    name: str,
    gold: Sequence[str],
    current_pred: Sequence[str],
    candidate_pred: Sequence[str],
    settings: ComparisonSettings | None = None,
) -> SliceComparison:
    """Compare two prediction lists against gold labels.

    Macro-F1 averages over the labels present in ``gold``, so a predicted label that never
    occurs in the gold labels lowers precision elsewhere but adds no class of its own.
    An empty slice returns zeros with both p-values and both intervals None.
    Raises DataError on length mismatch.
    """
    settings = settings or ComparisonSettings()
    gold = list(gold)
    current_pred = list(current_pred)
    candidate_pred = list(candidate_pred)
    if not len(gold) == len(current_pred) == len(candidate_pred):
        raise DataError(
            f"slice {name!r}: gold, current and candidate predictions must have the same length, "
            f"got {len(gold)}, {len(current_pred)} and {len(candidate_pred)}"
        )

    n = len(gold)
    if n == 0:
        return SliceComparison(name, 0, 0.0, 0.0, 0.0, 0.0, None, 0, 0)

    current_correct = [prediction == label for prediction, label in zip(current_pred, gold)]
    candidate_correct = [prediction == label for prediction, label in zip(candidate_pred, gold)]
    candidate_only = sum(cand and not cur for cand, cur in zip(candidate_correct, current_correct))
    current_only = sum(cur and not cand for cand, cur in zip(candidate_correct, current_correct))

    gold_labels = sorted(set(gold))
    regressed, classes = find_regressed_classes(
        per_class_f1(gold, current_pred, candidate_pred, gold_labels),
        settings.class_min_support, settings.class_regression_margin, settings.class_alpha,
    )
    intervals = None
    if n >= 2:
        intervals = paired_bootstrap(gold, current_pred, candidate_pred, gold_labels,
                                     settings.bootstrap_samples, settings.seed)
    return SliceComparison(
        name=name,
        n=n,
        current_accuracy=sum(current_correct) / n,
        candidate_accuracy=sum(candidate_correct) / n,
        # The mean of the per-class F1 over the gold labels is sklearn's macro-F1.
        current_macro_f1=float(np.mean([item.current_f1 for item in classes])),
        candidate_macro_f1=float(np.mean([item.candidate_f1 for item in classes])),
        mcnemar_p=mcnemar_exact_p(candidate_only, current_only),
        candidate_only_correct=candidate_only,
        current_only_correct=current_only,
        mcnemar_midp=mcnemar_midp(candidate_only, current_only),
        macro_f1_diff_ci=intervals.macro_f1_diff if intervals is not None else None,
        accuracy_diff_ci=intervals.accuracy_diff if intervals is not None else None,
        per_class=tuple(classes),
        regressed_classes=tuple(regressed),
    )


def compare_on_slice(
    name: str,
    texts: list[str],
    labels: list[str],
    current: Classifier,
    candidate: Classifier,
    settings: ComparisonSettings | None = None,
) -> SliceComparison:
    """Run both classifiers on a labelled slice and compare them with ``compare_predictions``."""
    if len(texts) != len(labels):
        raise DataError(f"slice {name!r}: got {len(texts)} texts but {len(labels)} labels")
    current_pred = [label for label, _ in current.predict(texts)] if texts else []
    candidate_pred = [label for label, _ in candidate.predict(texts)] if texts else []
    return compare_predictions(name, labels, current_pred, candidate_pred, settings)


def shadow_compare(texts: list[str], current: Classifier, candidate: Classifier) -> dict:
    """Compare both classifiers on unlabelled traffic.

    Returns n, agreement (share of texts with the same top label), the mean top-label
    probability of each model, and where the top labels differ:

    - ``flips``: {current, candidate, count} per label change, most frequent first, at most 20.
    - ``flips_by_class``: per label involved in a change, ``to_other`` counts inputs the current
      model gives that label and the candidate does not, ``from_other`` the reverse.
    - ``samples``: the first 10 changed inputs in input order, text cut to 200 characters.

    The rates are None and the lists empty when ``texts`` is empty.
    """
    if not texts:
        return {"n": 0, "agreement": None, "current_mean_confidence": None, "candidate_mean_confidence": None,
                "flips": [], "flips_by_class": {}, "samples": []}

    current_top = current.predict(texts)
    candidate_top = candidate.predict(texts)
    n = len(texts)
    changed = [
        (text, current_prediction, candidate_prediction)
        for text, current_prediction, candidate_prediction in zip(texts, current_top, candidate_top)
        if current_prediction[0] != candidate_prediction[0]
    ]
    pair_counts = Counter(
        (current_prediction[0], candidate_prediction[0]) for _, current_prediction, candidate_prediction in changed
    )
    # Most frequent first; ties in label order so the report does not depend on input order.
    top_pairs = sorted(pair_counts.items(), key=lambda item: (-item[1], item[0]))[:SHADOW_TOP_FLIPS]

    by_class: dict[str, dict[str, int]] = {}
    for (current_label, candidate_label), count in pair_counts.items():
        by_class.setdefault(current_label, {"to_other": 0, "from_other": 0})["to_other"] += count
        by_class.setdefault(candidate_label, {"to_other": 0, "from_other": 0})["from_other"] += count

    return {
        "n": n,
        "agreement": (n - len(changed)) / n,
        "current_mean_confidence": sum(confidence for _, confidence in current_top) / n,
        "candidate_mean_confidence": sum(confidence for _, confidence in candidate_top) / n,
        "flips": [{"current": pair[0], "candidate": pair[1], "count": count} for pair, count in top_pairs],
        "flips_by_class": {label: by_class[label] for label in sorted(by_class)},
        "samples": [
            {
                "text": text[:SHADOW_SAMPLE_CHARS],
                "current": current_label,
                "candidate": candidate_label,
                "current_confidence": float(current_confidence),
                "candidate_confidence": float(candidate_confidence),
            }
            for text, (current_label, current_confidence), (candidate_label, candidate_confidence)
            in changed[:SHADOW_SAMPLES]
        ],
    }


def measure_latency(texts: list[str], current: Classifier, candidate: Classifier, max_samples: int) -> dict:
    """Time single-text ``predict`` calls of both classifiers on up to ``max_samples`` of ``texts``.

    Each model first gets one untimed call, so one-time setup is not counted. Then the two models
    take turns on every text, and the one going first alternates from text to text, so background
    load and cache effects hit both alike. Returns n and the median (p50) and 99th percentile
    (p99) in milliseconds per model, None when no text was timed. The numbers are wall-clock
    time on this process's device and threads, not the serving path.
    """
    sample = list(texts[:max_samples]) if max_samples > 0 else []
    if not sample:
        return {"n": 0, "current_p50_ms": None, "current_p99_ms": None,
                "candidate_p50_ms": None, "candidate_p99_ms": None}

    current.predict(sample[:1])
    candidate.predict(sample[:1])
    timings: dict[str, list[float]] = {"current": [], "candidate": []}
    for index, text in enumerate(sample):
        order = (("current", current), ("candidate", candidate))
        for role, classifier in order if index % 2 == 0 else reversed(order):
            started = time.perf_counter()
            classifier.predict([text])
            timings[role].append((time.perf_counter() - started) * 1000.0)

    result: dict[str, Any] = {"n": len(sample)}
    for role, values in timings.items():
        p50, p99 = np.percentile(values, [50, 99])
        result[f"{role}_p50_ms"] = float(p50)
        result[f"{role}_p99_ms"] = float(p99)
    return result


@dataclass(frozen=True)
class CanaryGates(_FromCanaryConfig):
    """Thresholds a candidate must meet to replace the current adapter.

    min_production_samples: held-out production events needed to evaluate the production gates.
    min_production_gain: candidate minus current accuracy on production must exceed this.
    production_alpha: the production McNemar mid-p value must be below this.
    min_test_samples: test-split items needed to evaluate the test gates.
    noninferiority_margin: the lower bound of the bootstrap interval of candidate minus current
        test accuracy must be at least minus this margin.
    max_regressed_classes: test-split classes allowed to regress (see ``ComparisonSettings``).
    """

    min_production_samples: int = 30
    min_production_gain: float = 0.0
    production_alpha: float = 0.05
    min_test_samples: int = 100
    noninferiority_margin: float = 0.005
    max_regressed_classes: int = 0

    def __post_init__(self) -> None:
        owner = "CanaryGates"
        # The bootstrap interval behind the test gates needs at least two items.
        for field_name, minimum in (("min_production_samples", 1), ("min_test_samples", 2),
                                    ("max_regressed_classes", 0)):
            _require_int(owner, field_name, getattr(self, field_name), minimum)
        _require_number(owner, "min_production_gain", self.min_production_gain, -1.0, 1.0)
        _require_number(owner, "production_alpha", self.production_alpha, 0.0, 1.0, low_exclusive=True)
        _require_number(owner, "noninferiority_margin", self.noninferiority_margin, 0.0, 1.0)


@dataclass(frozen=True)
class CanaryDecision:
    """Outcome of ``decide``: overall status, the gate that settled it, and one entry per gate.

    Each gate dict has name, passed, evaluated, value, threshold and message. A gate that could
    not be evaluated (too little data) has evaluated False and passed False. ``deciding_gate``
    is the first failed gate, else the first gate not evaluated, else None.
    """

    passed: bool
    status: str
    gates: list[dict]
    production: SliceComparison | None
    test: SliceComparison
    shadow: dict | None
    deciding_gate: str | None = None
    latency: dict | None = None

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "status": self.status,
            "deciding_gate": self.deciding_gate,
            "gates": [dict(gate) for gate in self.gates],
            "production": self.production.to_dict() if self.production is not None else None,
            "test": self.test.to_dict(),
            "shadow": dict(self.shadow) if self.shadow is not None else None,
            "latency": dict(self.latency) if self.latency is not None else None,
        }


def _gate(name: str, passed: bool, value, threshold, message: str, evaluated: bool = True) -> dict:
    return {
        "name": name,
        "passed": passed,
        "evaluated": evaluated,
        "value": value,
        "threshold": threshold,
        "message": message,
    }


def _production_gates(production: SliceComparison | None, gates: CanaryGates) -> list[dict]:
    """Gate that the candidate is better on held-out production events: a gain and a significant one."""
    n = production.n if production is not None else 0
    gain = production.accuracy_gain if production is not None and n > 0 else None
    midp = production.mcnemar_midp if production is not None else None
    if n < gates.min_production_samples:
        skipped = f"not evaluated: {n} labelled production samples, need at least {gates.min_production_samples}"
        return [
            _gate("production_gain", False, gain, gates.min_production_gain, skipped, evaluated=False),
            _gate("production_significance", False, midp, gates.production_alpha, skipped, evaluated=False),
        ]

    gain_passed = gain > gates.min_production_gain
    gain_message = (
        f"production accuracy gain {gain:+.4f} ({'>' if gain_passed else '<='} {gates.min_production_gain:+.4f})"
    )
    result = [_gate("production_gain", gain_passed, gain, gates.min_production_gain, gain_message)]
    if midp is None:
        result.append(_gate("production_significance", False, None, gates.production_alpha,
                            "not evaluated: the production slice has no McNemar mid-p value", evaluated=False))
        return result
    p_passed = midp < gates.production_alpha
    p_message = f"McNemar mid-p {midp:.4g} ({'<' if p_passed else '>='} {gates.production_alpha:.4g})"
    result.append(_gate("production_significance", p_passed, midp, gates.production_alpha, p_message))
    return result


def _describe_regressions(test: SliceComparison) -> str:
    rows = {item.label: item for item in test.per_class}

    def describe(label: str) -> str:
        row = rows.get(label)
        if row is None:
            return label
        if row.adjusted_p is None:
            return f"{label} ({row.delta:+.3f})"
        return f"{label} ({row.delta:+.3f}, Holm p {row.adjusted_p:.2g})"

    named = [describe(label) for label in test.regressed_classes[:NAMED_CLASSES]]
    rest = len(test.regressed_classes) - len(named)
    return ", ".join(named) + (f" and {rest} more" if rest > 0 else "")


def _items_needed(test: SliceComparison, margin: float) -> str:
    """Return ", about N test items would decide ..." for an undecided non-inferiority gate, or "".

    With d the share of items on which exactly one model is right, the accuracy difference has a
    standard error of about sqrt(d / n), so its lower bound reaches -margin once
    n >= (z / (difference + margin))^2 * d, z being the normal quantile of the interval.
    """
    discordance = (test.candidate_only_correct + test.current_only_correct) / test.n
    headroom = test.accuracy_gain + margin
    if headroom <= 0 or discordance == 0:
        return ""
    z = float(norm.ppf(0.5 + CONFIDENCE_LEVEL / 2))
    needed = math.ceil((z / headroom) ** 2 * discordance)
    return (f"; at this difference, with the models disagreeing on {discordance:.1%} of the items, about "
            f"{needed:,} test items would decide")


def _test_gates(test: SliceComparison, gates: CanaryGates) -> list[dict]:
    """Gate that the candidate is non-inferior on the original test split, overall and per class."""
    lowest_allowed = -gates.noninferiority_margin
    regressed = len(test.regressed_classes)
    if test.n < gates.min_test_samples or test.accuracy_diff_ci is None:
        skipped = f"not evaluated: {test.n} test samples, need at least {gates.min_test_samples}"
        return [
            _gate("test_noninferiority", False, None, lowest_allowed, skipped, evaluated=False),
            _gate("test_class_regressions", False, regressed, gates.max_regressed_classes, skipped, evaluated=False),
        ]

    lower = test.accuracy_diff_ci[0]
    difference = test.accuracy_gain
    # Three outcomes: shown non-inferior, worse by more than the margin, or too few items to tell.
    lower_passed = lower >= lowest_allowed
    lower_decided = lower_passed or difference < lowest_allowed
    if lower_passed:
        lower_message = (f"lower {CONFIDENCE_LEVEL:.0%} bound of the test accuracy difference {lower:+.4f} "
                         f">= {lowest_allowed:+.4f}")
    elif lower_decided:
        lower_message = (f"test accuracy difference {difference:+.4f} < {lowest_allowed:+.4f} "
                         f"(lower {CONFIDENCE_LEVEL:.0%} bound {lower:+.4f})")
    else:
        lower_message = (
            f"not decided: the test accuracy difference {difference:+.4f} is within the margin, but its lower "
            f"{CONFIDENCE_LEVEL:.0%} bound {lower:+.4f} is below {lowest_allowed:+.4f}; {test.n} test items are "
            f"too few to show non-inferiority at this margin{_items_needed(test, gates.noninferiority_margin)} "
            "(more production labels do not change this; a person decides, or widen canary.noninferiority_margin)"
        )
    classes_passed = regressed <= gates.max_regressed_classes
    if regressed:
        classes_message = (
            f"{regressed} test classes regressed, at most {gates.max_regressed_classes} allowed: "
            f"{_describe_regressions(test)}"
        )
    else:
        classes_message = "no test class regressed"
    return [
        _gate("test_noninferiority", lower_passed, lower, lowest_allowed, lower_message, evaluated=lower_decided),
        _gate("test_class_regressions", classes_passed, regressed, gates.max_regressed_classes, classes_message),
    ]


def decide(
    production: SliceComparison | None,
    test: SliceComparison,
    shadow: dict | None,
    gates: CanaryGates,
    latency: dict | None = None,
) -> CanaryDecision:
    """Apply ``gates`` to the slice comparisons and return the promotion decision.

    Gates, in order: production_gain and production_significance (better on production events),
    test_noninferiority and test_class_regressions (no worse on the test split). Status is
    "failed" when an evaluated gate fails, even when another could not be evaluated. Otherwise
    it is "inconclusive" when a gate could not be evaluated (too few production or test
    samples, no production slice), and "passed" only when every gate was evaluated and passed.
    ``shadow`` and ``latency`` are reported but gate nothing.
    """
    gate_results = _production_gates(production, gates) + _test_gates(test, gates)

    failed = [gate["name"] for gate in gate_results if gate["evaluated"] and not gate["passed"]]
    unevaluated = [gate["name"] for gate in gate_results if not gate["evaluated"]]
    if failed:
        status, deciding_gate = FAILED, failed[0]
    elif unevaluated:
        status, deciding_gate = INCONCLUSIVE, unevaluated[0]
    else:
        status, deciding_gate = PASSED, None

    return CanaryDecision(
        passed=status == PASSED,
        status=status,
        gates=gate_results,
        production=production,
        test=test,
        shadow=shadow,
        deciding_gate=deciding_gate,
        latency=latency,
    )
