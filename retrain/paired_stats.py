"""Paired statistics for two classifiers scored on the same labelled items.

The canary compares a candidate adapter with the current one on identical texts, so
every statistic here keeps the pairing: McNemar tests use only the items on which
exactly one model is correct, and the bootstrap resamples items, never models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import binom, binomtest, bootstrap
from sklearn.metrics import precision_recall_fscore_support

# Coverage of the bootstrap intervals. The non-inferiority rule compares the lower bound
# of this two-sided interval with the margin, so it is a one-sided test at 2.5 percent.
CONFIDENCE_LEVEL = 0.95
# Resamples times items per call of the bootstrap statistic. It bounds the statistic's memory,
# a few arrays of this many 8-byte values.
_BOOTSTRAP_CELLS_PER_BATCH = 2_000_000


def mcnemar_exact_p(candidate_only_correct: int, current_only_correct: int) -> float:
    """Return the exact two-sided McNemar p-value: a binomial test of the discordant pairs at 0.5.

    Returns 1.0 when there are no discordant pairs.
    """
    discordant = candidate_only_correct + current_only_correct
    if discordant == 0:
        return 1.0
    return float(binomtest(candidate_only_correct, discordant, p=0.5, alternative="two-sided").pvalue)


def mcnemar_midp(candidate_only_correct: int, current_only_correct: int) -> float:
    """Return the two-sided mid-p McNemar p-value.

    With d discordant pairs and b the smaller of the two discordant counts, X ~ Binomial(d, 0.5)
    under the null of equal accuracy, and

        mid-p = 2 * P(X <= b) - P(X = b),  capped at 1.

    This is the exact two-sided p-value ``2 * P(X <= b)`` minus the point probability
    ``P(X = b)`` whenever the exact p-value is below 1. Leaving out half of the observed
    outcome's probability on each tail makes the test less conservative than the exact
    test, so its size stays closer to the nominal level. Returns 1.0 when d is 0.
    """
    discordant = candidate_only_correct + current_only_correct
    if discordant == 0:
        return 1.0
    smaller = min(candidate_only_correct, current_only_correct)
    midp = 2.0 * binom.cdf(smaller, discordant, 0.5) - binom.pmf(smaller, discordant, 0.5)
    return float(min(1.0, midp))


@dataclass(frozen=True)
class ClassF1:
    """F1 of both models on one gold label; ``delta`` is candidate minus current.

    ``lost`` and ``gained`` count the label's own items that the candidate gets wrong and the
    current model right, and the reverse (see ``per_class_f1``). ``p_value`` is the one-sided
    mid-p value that the candidate is worse on this label. ``adjusted_p`` is that value after
    Holm's correction over the labels tested together. Both are None for an untested label.
    """

    label: str
    support: int
    current_f1: float
    candidate_f1: float
    lost: int = 0
    gained: int = 0
    p_value: float | None = None
    adjusted_p: float | None = None

    @property
    def delta(self) -> float:
        return self.candidate_f1 - self.current_f1

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "support": self.support,
            "current_f1": self.current_f1,
            "candidate_f1": self.candidate_f1,
            "delta": self.delta,
            "lost": self.lost,
            "gained": self.gained,
            "p_value": self.p_value,
            "adjusted_p": self.adjusted_p,
        }


def one_sided_midp(lost: int, gained: int) -> float:
    """Return the one-sided mid-p value of ``lost`` or more losses among ``lost + gained`` discordant items.

    Under the null that both models are equally right on the label, the losses are
    X ~ Binomial(lost + gained, 0.5), and mid-p = P(X > lost) + P(X = lost) / 2. Returns 1.0
    without discordant items.
    """
    discordant = lost + gained
    if discordant == 0:
        return 1.0
    return float(binom.sf(lost, discordant, 0.5) + 0.5 * binom.pmf(lost, discordant, 0.5))


def per_class_f1(
    gold: list[str], current_pred: list[str], candidate_pred: list[str], labels: list[str]
) -> list[ClassF1]:
    """Return the F1 of both models and a paired test for each label in ``labels``, in that order.

    A label that a model never predicts correctly has F1 0 (sklearn ``zero_division=0``).

    The test covers the label's own items, those whose gold label is the label. ``lost``
    counts the items that the current model gets right and the candidate wrong, ``gained`` the
    reverse, and ``p_value`` is ``one_sided_midp(lost, gained)``. Each misclassified item thus
    counts once, at its gold label: a candidate that starts predicting this label for another
    label's items lowers this label's precision, and the other label's test shows the loss.
    Items of other labels are left out because they would let removed false alarms outweigh
    a collapse of the label's own recall. ``adjusted_p`` stays None here, because the family
    of labels tested together is chosen by ``find_regressed_classes``.
    """
    _, _, current_f1, support = precision_recall_fscore_support(
        gold, current_pred, labels=labels, average=None, zero_division=0
    )
    _, _, candidate_f1, _ = precision_recall_fscore_support(
        gold, candidate_pred, labels=labels, average=None, zero_division=0
    )
    gold_array = np.asarray(gold, dtype=object)
    current_array = np.asarray(current_pred, dtype=object)
    candidate_array = np.asarray(candidate_pred, dtype=object)
    result = []
    for label, count, current_score, candidate_score in zip(labels, support, current_f1, candidate_f1):
        is_gold = gold_array == label
        current_right = is_gold & (current_array == label)
        candidate_right = is_gold & (candidate_array == label)
        lost = int(np.sum(current_right & ~candidate_right))
        gained = int(np.sum(candidate_right & ~current_right))
        result.append(ClassF1(label, int(count), float(current_score), float(candidate_score), lost, gained,
                              one_sided_midp(lost, gained)))
    return result


def find_regressed_classes(
    classes: list[ClassF1], min_support: int, margin: float, alpha: float = 1.0
) -> tuple[list[str], list[ClassF1]]:
    """Return the regressed labels, worst first, and ``classes`` with Holm-adjusted p-values filled in.

    The labels with support >= ``min_support`` form the family tested together. A label of the
    family has regressed when its F1 fell by more than ``margin`` and its Holm-adjusted p-value
    is below ``alpha``. Holm's correction keeps the chance of naming any label on which both
    models are equally good at or below ``alpha`` across the family. ``alpha`` 1.0 leaves out
    the test, and the F1 margin alone decides.
    """
    from statsmodels.stats.multitest import multipletests

    family = [index for index, item in enumerate(classes) if item.support >= min_support]
    adjusted: dict[int, float] = {}
    if family:
        raw = [classes[index].p_value if classes[index].p_value is not None else 1.0 for index in family]
        adjusted = dict(zip(family, multipletests(raw, method="holm")[1].tolist()))
    updated = [replace(item, adjusted_p=adjusted.get(index)) for index, item in enumerate(classes)]
    regressed = [
        item for index, item in enumerate(updated)
        if index in adjusted and item.delta < -margin and (alpha >= 1.0 or adjusted[index] < alpha)
    ]
    regressed.sort(key=lambda item: (item.delta, item.label))
    return [item.label for item in regressed], updated


@dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile intervals of candidate-minus-current macro-F1 and accuracy, from the same resamples."""

    macro_f1_diff: tuple[float, float]
    accuracy_diff: tuple[float, float]


class ResampledDifferences:
    """Candidate-minus-current macro-F1 and accuracy on resamples of one labelled slice.

    Macro-F1 in a resample averages over the ``labels`` that occur in that resample's gold
    labels, which matches ``f1_score`` with ``labels`` set to those gold labels. Predictions
    outside ``labels`` count only as misses. Instead of calling sklearn once per resample,
    ``__call__`` turns the resamples into per-item multiplicities and gets every class's true
    positives, gold count and predicted count from one matrix product with one-hot indicators.
    """

    def __init__(self, gold: list[str], current_pred: list[str], candidate_pred: list[str], labels: list[str]) -> None:
        label_index = {label: position for position, label in enumerate(labels)}
        self.n_labels = len(labels)
        # Predictions outside ``labels`` get the extra code n_labels, whose column is dropped.
        gold_codes = np.array([label_index[label] for label in gold], dtype=np.int64)
        current_codes = np.array([label_index.get(label, self.n_labels) for label in current_pred], dtype=np.int64)
        candidate_codes = np.array([label_index.get(label, self.n_labels) for label in candidate_pred], dtype=np.int64)

        identity = np.eye(self.n_labels + 1)[:, : self.n_labels]
        self.n = len(gold_codes)
        self.gold_onehot = identity[gold_codes]
        current_correct = current_codes == gold_codes
        candidate_correct = candidate_codes == gold_codes
        # Columns: predicted count per class, then true positives per class.
        self.current_counts = np.hstack([identity[current_codes], self.gold_onehot * current_correct[:, None]])
        self.candidate_counts = np.hstack([identity[candidate_codes], self.gold_onehot * candidate_correct[:, None]])
        self.correct_diff = candidate_correct.astype(float) - current_correct.astype(float)

    def __call__(self, indices: np.ndarray, axis: int = -1) -> np.ndarray:
        """Return an array of shape (2, resamples): macro-F1 differences, then accuracy differences.

        ``indices`` has one resample of item indices per row; ``axis`` must be the last axis.
        """
        indices = np.atleast_2d(indices)
        batch = indices.shape[0]
        # Row r of ``weights`` counts how often each item occurs in resample r.
        offsets = (np.arange(batch) * self.n)[:, None]
        weights = np.bincount((indices + offsets).ravel(), minlength=batch * self.n)
        weights = weights.reshape(batch, self.n).astype(float)

        gold_totals = weights @ self.gold_onehot
        present = gold_totals > 0
        f1_diff = self._macro_f1(weights, self.candidate_counts, gold_totals, present) - self._macro_f1(
            weights, self.current_counts, gold_totals, present
        )
        accuracy_diff = weights @ self.correct_diff / self.n
        return np.stack([f1_diff, accuracy_diff])

    def _macro_f1(self, weights: np.ndarray, counts: np.ndarray, gold_totals: np.ndarray,
                  present: np.ndarray) -> np.ndarray:
        totals = weights @ counts
        predicted, true_positives = totals[:, : self.n_labels], totals[:, self.n_labels :]
        denominator = gold_totals + predicted
        f1 = np.divide(2.0 * true_positives, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        return (f1 * present).sum(axis=1) / present.sum(axis=1)


def paired_bootstrap(
    gold: list[str],
    current_pred: list[str],
    candidate_pred: list[str],
    labels: list[str],
    n_resamples: int,
    seed: int,
) -> BootstrapIntervals:
    """Return paired percentile bootstrap intervals of the macro-F1 and accuracy differences.

    Each resample draws item indices with replacement, and both models are scored on the same
    indices, so the interval reflects the paired design. The same ``seed`` gives the same
    intervals. Raises ValueError for fewer than two items.
    """
    n = len(gold)
    if n < 2:
        raise ValueError(f"the paired bootstrap needs at least 2 items, got {n}")

    result = bootstrap(
        (np.arange(n),),
        ResampledDifferences(gold, current_pred, candidate_pred, labels),
        n_resamples=n_resamples,
        batch=max(1, _BOOTSTRAP_CELLS_PER_BATCH // n),
        vectorized=True,
        confidence_level=CONFIDENCE_LEVEL,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return BootstrapIntervals(
        macro_f1_diff=(float(low[0]), float(high[0])),
        accuracy_diff=(float(low[1]), float(high[1])),
    )
