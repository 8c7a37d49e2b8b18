"""Canary evaluation: compare a candidate adapter with the current one and decide on promotion."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from scipy.stats import binomtest
from sklearn.metrics import f1_score

from monitor.errors import ConfigError, DataError

if TYPE_CHECKING:
    from retrain.model import Classifier

PASSED = "passed"
FAILED = "failed"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class SliceComparison:
    """Accuracy, macro-F1 and McNemar test of current vs candidate predictions on one labelled slice.

    ``mcnemar_p`` is None only for an empty slice, and 1.0 when the two models never disagree
    on correctness. ``candidate_only_correct`` and ``current_only_correct`` are the discordant pairs.
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

    @property
    def accuracy_gain(self) -> float:
        """Candidate accuracy minus current accuracy."""
        return self.candidate_accuracy - self.current_accuracy

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mcnemar_exact_p(candidate_only_correct: int, current_only_correct: int) -> float:
    """Return the exact two-sided McNemar p-value: a binomial test of the discordant pairs at 0.5."""
    discordant = candidate_only_correct + current_only_correct
    if discordant == 0:
        return 1.0
    return float(binomtest(candidate_only_correct, discordant, p=0.5, alternative="two-sided").pvalue)


def compare_predictions(
    name: str,
    gold: Sequence[str],
    current_pred: Sequence[str],
    candidate_pred: Sequence[str],
) -> SliceComparison:
    """Compare two prediction lists against gold labels.

    Macro-F1 averages over the labels present in ``gold``, so a predicted label that never
    occurs in the gold labels lowers precision elsewhere but adds no class of its own.
    An empty slice returns zeros with ``mcnemar_p`` None. Raises DataError on length mismatch.
    """
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
    return SliceComparison(
        name=name,
        n=n,
        current_accuracy=sum(current_correct) / n,
        candidate_accuracy=sum(candidate_correct) / n,
        current_macro_f1=float(f1_score(gold, current_pred, labels=gold_labels, average="macro", zero_division=0)),
        candidate_macro_f1=float(f1_score(gold, candidate_pred, labels=gold_labels, average="macro", zero_division=0)),
        mcnemar_p=mcnemar_exact_p(candidate_only, current_only),
        candidate_only_correct=candidate_only,
        current_only_correct=current_only,
    )


def compare_on_slice(
    name: str,
    texts: list[str],
    labels: list[str],
    current: Classifier,
    candidate: Classifier,
) -> SliceComparison:
    """Run both classifiers on a labelled slice and compare them with ``compare_predictions``."""
    if len(texts) != len(labels):
        raise DataError(f"slice {name!r}: got {len(texts)} texts but {len(labels)} labels")
    current_pred = [label for label, _ in current.predict(texts)] if texts else []
    candidate_pred = [label for label, _ in candidate.predict(texts)] if texts else []
    return compare_predictions(name, labels, current_pred, candidate_pred)


def shadow_compare(texts: list[str], current: Classifier, candidate: Classifier) -> dict:
    """Compare both classifiers on unlabelled traffic.

    Returns n, agreement (share of texts with the same top label) and the mean top-label
    probability of each model. The three rates are None when ``texts`` is empty.
    """
    if not texts:
        return {"n": 0, "agreement": None, "current_mean_confidence": None, "candidate_mean_confidence": None}

    current_top = current.predict(texts)
    candidate_top = candidate.predict(texts)
    n = len(texts)
    agreement = sum(cur[0] == cand[0] for cur, cand in zip(current_top, candidate_top)) / n
    return {
        "n": n,
        "agreement": agreement,
        "current_mean_confidence": sum(confidence for _, confidence in current_top) / n,
        "candidate_mean_confidence": sum(confidence for _, confidence in candidate_top) / n,
    }


@dataclass(frozen=True)
class CanaryGates:
    """Thresholds a candidate must meet to replace the current adapter.

    min_production_samples: labelled production samples needed before any decision.
    min_production_gain: candidate minus current accuracy on production must exceed this.
    max_test_regression: current minus candidate accuracy on the original test slice must be <= this.
    max_mcnemar_p: when set, the production McNemar p-value must also be below it.
    """

    min_production_samples: int = 30
    min_production_gain: float = 0.0
    max_test_regression: float = 0.01
    max_mcnemar_p: float | None = None

    def __post_init__(self) -> None:
        samples = self.min_production_samples
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ConfigError(f"CanaryGates.min_production_samples must be an integer >= 1, got {samples!r}")
        for field_name in ("min_production_gain", "max_test_regression"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= value <= 1.0:
                raise ConfigError(f"CanaryGates.{field_name} must be a number in [-1, 1], got {value!r}")
        p_limit = self.max_mcnemar_p
        if p_limit is not None and (
            not isinstance(p_limit, (int, float)) or isinstance(p_limit, bool) or not 0.0 < p_limit <= 1.0
        ):
            raise ConfigError(f"CanaryGates.max_mcnemar_p must be None or a number in (0, 1], got {p_limit!r}")


@dataclass(frozen=True)
class CanaryDecision:
    """Outcome of ``decide``: overall status and one entry per gate.

    Each gate dict has name, passed, evaluated, value, threshold and message. A gate that could
    not be evaluated (too little data) has evaluated False and passed False.
    """

    passed: bool
    status: str
    gates: list[dict]
    production: SliceComparison | None
    test: SliceComparison
    shadow: dict | None

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "status": self.status,
            "gates": [dict(gate) for gate in self.gates],
            "production": self.production.to_dict() if self.production is not None else None,
            "test": self.test.to_dict(),
            "shadow": dict(self.shadow) if self.shadow is not None else None,
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
    n = production.n if production is not None else 0
    enough = n >= gates.min_production_samples
    result = [
        _gate(
            "production_samples",
            enough,
            n,
            gates.min_production_samples,
            f"{n} labelled production samples, need at least {gates.min_production_samples}",
            evaluated=True,
        )
    ]
    skipped_reason = f"not evaluated: only {n} labelled production samples"

    gain = production.accuracy_gain if production is not None and n > 0 else None
    if enough:
        gain_passed = gain > gates.min_production_gain
        gain_message = (
            f"production accuracy gain {gain:+.4f} "
            f"({'>' if gain_passed else '<='} {gates.min_production_gain:+.4f})"
        )
    else:
        gain_passed, gain_message = False, skipped_reason
    result.append(
        _gate("production_gain", gain_passed, gain, gates.min_production_gain, gain_message, evaluated=enough)
    )

    if gates.max_mcnemar_p is not None:
        p_value = production.mcnemar_p if production is not None else None
        if enough:
            p_passed = p_value is not None and p_value < gates.max_mcnemar_p
            p_message = f"McNemar p {p_value:.4g} ({'<' if p_passed else '>='} {gates.max_mcnemar_p:.4g})"
        else:
            p_passed, p_message = False, skipped_reason
        result.append(
            _gate("production_mcnemar", p_passed, p_value, gates.max_mcnemar_p, p_message, evaluated=enough)
        )
    return result


def _test_gate(test: SliceComparison, gates: CanaryGates) -> dict:
    if test.n == 0:
        return _gate(
            "test_regression", False, None, gates.max_test_regression,
            "not evaluated: the test slice is empty", evaluated=False,
        )
    regression = test.current_accuracy - test.candidate_accuracy
    passed = regression <= gates.max_test_regression
    return _gate(
        "test_regression",
        passed,
        regression,
        gates.max_test_regression,
        f"test accuracy drop {regression:+.4f} ({'<=' if passed else '>'} {gates.max_test_regression:+.4f})",
    )


def decide(
    production: SliceComparison | None,
    test: SliceComparison,
    shadow: dict | None,
    gates: CanaryGates,
) -> CanaryDecision:
    """Apply ``gates`` to the slice comparisons and return the promotion decision.

    Status is "failed" when an evaluated gate fails, such as a test regression, even when
    production data is short. Otherwise it is "inconclusive" when a gate could not be evaluated
    (too few production samples, no production slice, an empty test slice). It is "passed" only
    when every gate was evaluated and passed. ``shadow`` is reported but gates nothing.
    """
    gate_results = _production_gates(production, gates)
    gate_results.append(_test_gate(test, gates))

    # Too few production samples makes the run inconclusive, not a candidate failure.
    candidate_failed = any(
        gate["evaluated"] and not gate["passed"]
        for gate in gate_results
        if gate["name"] != "production_samples"
    )
    if candidate_failed:
        status = FAILED
    elif all(gate["passed"] for gate in gate_results):
        status = PASSED
    else:
        status = INCONCLUSIVE

    return CanaryDecision(
        passed=status == PASSED,
        status=status,
        gates=gate_results,
        production=production,
        test=test,
        shadow=shadow,
    )

