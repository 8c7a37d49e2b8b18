"""Drift signal on the distribution of the classifier's predicted labels."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from scipy.stats import chi2_contingency, fisher_exact

from monitor.detectors.base import (
    STATUS_OK,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    require_fitted,
    validate_alpha,
    validate_min_samples,
    validate_positive_int,
)
from monitor.errors import ConfigError, InsufficientSamplesError
from monitor.reference import ReferenceProfile

OTHER_CELL = "<other>"


class LabelShiftDetector:
    """G-test of homogeneity between the window's and the reference's predicted labels.

    Parameters
    ----------
    alpha : float
        Significance level of the test, in (0, 1).
    min_samples : int
        Smallest number of sampled predictions that is tested.
    min_expected : float
        Smallest expected count allowed in a cell of the tested table. The usual
        rule of thumb for the chi-square approximation is 5.
    top_label_shifts : int
        Number of labels with the largest share change listed in the details.

    Notes
    -----
    Table: a 2 x K contingency table whose rows are the reference (the predicted
    labels of the validation split) and the window, and whose columns are the
    union of the labels predicted in either. A label never predicted on the
    validation split, or absent from the window, is a column with a zero cell.

    Pooling: the expected count of a cell is ``row total * column total / N``,
    so every cell of a column reaches ``min_expected`` exactly when the column
    total is at least ``min_expected * N / (smaller row total)``. Columns below
    that total are pooled into one ``"<other>"`` column. If that column is still
    below it, it is merged into the smallest remaining column. If one column
    would remain, the table keeps the ``"<other>"`` column and has a cell whose
    expected count is below ``min_expected``.

    Statistic: the G statistic ``2 * sum(O * ln(O / E))`` of the pooled table,
    without continuity correction (``scipy.stats.chi2_contingency`` with
    ``lambda_="log-likelihood"``).

    Null distribution: under equal label distributions, G is asymptotically
    chi-square with ``K' - 1`` degrees of freedom, where K' is the number of
    pooled columns. A pooled 2 x 2 table with an expected count below
    ``min_expected`` gets the two-sided p-value of Fisher's exact test, which
    needs no large-sample approximation. A table with a single column, which
    happens when both samples predict one and the same label, has G = 0, zero
    degrees of freedom and p-value 1.

    Decision rule: drifted when the p-value is below ``alpha``.

    Reference: the G statistic is the log-likelihood member (lambda = 0) of the
    Cressie-Read power-divergence family, as computed by
    ``scipy.stats.chi2_contingency(lambda_="log-likelihood")`` (SciPy documentation).
    """

    signal = "label_distribution"

    def __init__(
        self,
        alpha: float = 0.05,
        min_samples: int = 30,
        min_expected: float = 5.0,
        top_label_shifts: int = 5,
    ):
        if isinstance(min_expected, bool) or not isinstance(min_expected, (int, float)) or not min_expected > 0.0:
            raise ConfigError(f"min_expected must be a positive number, got {min_expected!r}")
        self.alpha = validate_alpha(alpha)
        self.min_samples = validate_min_samples(min_samples)
        self.min_expected = float(min_expected)
        self.top_label_shifts = validate_positive_int("top_label_shifts", top_label_shifts)

    def fit(self, profile: ReferenceProfile) -> "LabelShiftDetector":
        """Store the label counts of the validation predictions."""
        labels = [str(label) for label in profile.val_predicted_labels]
        if len(labels) < 2:
            raise InsufficientSamplesError(
                f"the reference profile has {len(labels)} validation predictions; at least 2 are needed"
            )
        self.reference_counts_ = Counter(labels)
        self.reference_n_ = len(labels)
        return self

    def test(self, window: WindowFeatures) -> DriftResult:
        """Test whether the window's predicted labels follow the reference distribution."""
        require_fitted(self, "reference_counts_")
        window_counts = Counter(str(label) for label in window.predicted_labels)
        n = len(window.predicted_labels)
        if n < self.min_samples:
            return insufficient_result(self.signal, n, self.min_samples, self.alpha)

        labels = sorted(set(self.reference_counts_) | set(window_counts))
        table = np.array(
            [
                [self.reference_counts_.get(label, 0) for label in labels],
                [window_counts.get(label, 0) for label in labels],
            ],
            dtype=np.float64,
        )
        pooled, cells, pooled_labels = self._pool(table, labels)
        statistic, p_value, dof, method = self._test_table(pooled)

        details = {
            "dof": dof,
            "method": method,
            "min_expected": self.min_expected,
            "cells": cells,
            "pooled_labels": pooled_labels,
            "unseen_labels": sorted(set(window_counts) - set(self.reference_counts_)),
            "label_shifts": self._label_shifts(labels, table),
        }
        return DriftResult(
            signal=self.signal,
            status=STATUS_OK,
            drifted=p_value < self.alpha,
            statistic=statistic,
            p_value=p_value,
            threshold=self.alpha,
            n=n,
            details=details,
        )

    def _pool(self, table: np.ndarray, labels: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
        """Pool small columns so that every expected count reaches ``min_expected`` where possible.

        Returns the pooled table, the name of each pooled column and the labels
        that went into ``"<other>"`` or into the column it was merged with.
        """
        column_totals = table.sum(axis=0)
        smaller_row = table.sum(axis=1).min()
        needed_total = self.min_expected * table.sum() / smaller_row

        order = np.argsort(-column_totals, kind="stable")
        kept = [int(j) for j in order if column_totals[j] >= needed_total]
        if not kept:
            # Every column is small when the window is small for the number of labels.
            # The largest column is kept so that a two-column test remains possible.
            # NOTE: such heavy pooling tests only "largest label versus the rest", so
            # windows far smaller than 5 * (number of labels) have little power.
            kept = [int(order[0])]
        small = [int(j) for j in order if int(j) not in kept]
        if not small:
            return table[:, kept], [labels[j] for j in kept], []

        other = table[:, small].sum(axis=1)
        pooled_labels = sorted(labels[j] for j in small)
        if other.sum() < needed_total and len(kept) >= 2:
            smallest = kept[-1]
            columns = [table[:, j] for j in kept[:-1]] + [table[:, smallest] + other]
            cells = [labels[j] for j in kept[:-1]] + [f"{labels[smallest]}+{OTHER_CELL}"]
            return np.column_stack(columns), cells, pooled_labels
        columns = [table[:, j] for j in kept] + [other]
        cells = [labels[j] for j in kept] + [OTHER_CELL]
        return np.column_stack(columns), cells, pooled_labels

    def _test_table(self, pooled: np.ndarray) -> tuple[float, float, int, str]:
        """Return the G statistic, p-value, degrees of freedom and method name of a pooled table."""
        if pooled.shape[1] < 2:
            return 0.0, 1.0, 0, "single_cell"

        outcome = chi2_contingency(pooled, correction=False, lambda_="log-likelihood")
        statistic = float(outcome.statistic)
        dof = int(outcome.dof)
        if pooled.shape[1] == 2 and float(outcome.expected_freq.min()) < self.min_expected:
            _, p_value = fisher_exact(pooled.astype(np.int64), alternative="two-sided")
            return statistic, float(p_value), dof, "fisher_exact"

        p_value = float(outcome.pvalue)
        return statistic, p_value if math.isfinite(p_value) else 1.0, dof, "g_test"

    def _label_shifts(self, labels: list[str], table: np.ndarray) -> list[dict]:
        """Return the labels whose predicted share changed most, largest absolute change first."""
        reference_shares = table[0] / table[0].sum()
        window_shares = table[1] / table[1].sum()
        shifts = [
            {
                "label": label,
                "reference_share": float(reference_share),
                "window_share": float(window_share),
            }
            for label, reference_share, window_share in zip(labels, reference_shares, window_shares)
        ]
        shifts.sort(key=lambda row: (-abs(row["window_share"] - row["reference_share"]), row["label"]))
        return shifts[: self.top_label_shifts]
