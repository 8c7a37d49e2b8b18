"""Null distributions calibrated on held-out reference windows.

A two-sample test whose null is built from the reference alone can be off in
either direction in production: ties, a finite reference sample or a
data-dependent kernel bandwidth all move the real false-alarm rate away from
alpha. Calibration measures it instead. Windows of the production sample size
are drawn from held-out training texts, which the profile's reference
statistics never saw, and each detector's statistic on them forms the null.

Windows drawn without replacement from a pool of N texts vary less than
windows drawn from the population: the variance of a window mean shrinks by
the finite-population factor ``(N - n) / (N - 1)``, which halves it when a
window takes half the pool. Statistics driven by window means (the KS
distance, MMD) are therefore calibrated on windows of the effective size
``n_eff = n N / (N + n - 1)``, whose without-replacement variance equals that
of n population draws. The Jensen-Shannon divergence of token frequencies is
dominated by its small-sample bias, which depends on the window's own size,
so it is calibrated on windows of n texts.

The p-value of an observed statistic ``s`` against null statistics is

- empirical, ``(b + 1) / (N + 1)`` with b the null statistics >= s, while at
  least ``tail_size`` null statistics reach s;
- beyond that, an exponential tail fitted to the top ``tail_size`` excesses:
  with u the ``(tail_size + 1)``-th largest null statistic and β the mean excess
  of the top ``tail_size`` over u, ``p = (tail_size + 1) / (N + 1) * exp(-(s - u) / β)``.

The tail lets a family-wise level below ``1 / N`` be met without drawing
thousands of windows. It is the peaks-over-threshold method with a generalised
Pareto tail of shape 0 (Knijnenburg, Wessels, Reinders and Shmulevich 2009,
"Fewer permutations, more accurate P-values", Bioinformatics 25(12), i161-i168).
For statistics whose true tail is lighter than exponential, such as sums of
bounded terms, the fitted tail overstates p and the test stays conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from monitor.errors import ConfigError, InsufficientSamplesError

# Fewer null windows than this give a tail fit on too few points to trust.
MIN_CALIBRATION_WINDOWS = 50


@dataclass(frozen=True)
class NullCalibration:
    """Null statistics of one detector at one window sample size."""

    signal: str
    sample_size: int
    statistics: np.ndarray
    tail_size: int

    def __post_init__(self) -> None:
        statistics = np.sort(np.asarray(self.statistics, dtype=np.float64))
        finite = statistics[np.isfinite(statistics)]
        if finite.size < MIN_CALIBRATION_WINDOWS:
            raise InsufficientSamplesError(
                f"calibration of {self.signal} has {finite.size} finite null statistics; "
                f"at least {MIN_CALIBRATION_WINDOWS} are needed"
            )
        if not isinstance(self.tail_size, int) or not 5 <= self.tail_size < finite.size:
            raise ConfigError(
                f"tail_size must be an integer in [5, {finite.size - 1}] for {finite.size} null statistics, "
                f"got {self.tail_size!r}"
            )
        object.__setattr__(self, "statistics", finite)

    @property
    def n_windows(self) -> int:
        """Number N of null statistics."""
        return int(self.statistics.shape[0])

    @property
    def tail_start(self) -> float:
        """u: the ``(tail_size + 1)``-th largest null statistic, where the fitted tail begins."""
        return float(self.statistics[-(self.tail_size + 1)])

    @property
    def tail_scale(self) -> float:
        """β: the mean excess of the top ``tail_size`` null statistics over ``tail_start``; 0 when they tie."""
        top = self.statistics[-self.tail_size:]
        return float(np.mean(top - self.tail_start))

    def p_value(self, observed: float) -> float:
        """Return the calibrated p-value of ``observed`` (see the module docstring)."""
        if not math.isfinite(observed):
            return 1.0 / (self.n_windows + 1) if observed > 0 else 1.0
        n = self.n_windows
        exceed = n - int(np.searchsorted(self.statistics, observed, side="left"))
        if exceed >= self.tail_size or observed <= self.tail_start:
            return (exceed + 1) / (n + 1)
        scale = self.tail_scale
        anchor = (self.tail_size + 1) / (n + 1)
        if scale <= 0.0:
            # Tied top statistics give no scale: fall back to the empirical value.
            return (exceed + 1) / (n + 1)
        return anchor * math.exp(-(observed - self.tail_start) / scale)

    def threshold(self, level: float) -> float:
        """Return the statistic at which the calibrated p-value equals ``level``; larger statistics reject."""
        n = self.n_windows
        anchor = (self.tail_size + 1) / (n + 1)
        if level < anchor and self.tail_scale > 0.0:
            return self.tail_start + self.tail_scale * math.log(anchor / level)
        # Smallest null statistic whose empirical p-value is at most the level.
        exceed_allowed = int(math.floor(level * (n + 1))) - 1
        if exceed_allowed < 0:
            return float(self.statistics[-1])
        index = n - exceed_allowed
        return float(self.statistics[index]) if index < n else float(self.statistics[-1])

    def summary(self, level: float) -> dict:
        """Return the JSON fields that a drift result carries about its calibration."""
        return {
            "null": "heldout_windows",
            "null_windows": self.n_windows,
            "null_median": float(np.median(self.statistics)),
            "calibrated_threshold": self.threshold(level),
            "tail_start": self.tail_start,
            "tail_scale": self.tail_scale,
        }


SAMPLING_EFFECTIVE_SIZE = "effective_size"
SAMPLING_WINDOW_SIZE = "window_size"


def calibration_window_size(sample_size: int, pool_size: int, sampling: str) -> int:
    """Return the size of the held-out windows that calibrate windows of ``sample_size`` texts.

    ``sampling`` is ``effective_size`` (``n N / (N + n - 1)``, see the module
    docstring) or ``window_size`` (n itself).
    """
    if sampling == SAMPLING_WINDOW_SIZE:
        return int(sample_size)
    if sampling != SAMPLING_EFFECTIVE_SIZE:
        raise ConfigError(f"sampling must be {SAMPLING_EFFECTIVE_SIZE!r} or {SAMPLING_WINDOW_SIZE!r}, got {sampling!r}")
    return max(2, int(round(sample_size * pool_size / (pool_size + sample_size - 1))))


def heldout_window_indices(pool_size: int, sample_size: int, windows: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``windows`` rows of ``sample_size`` indices into a held-out pool of ``pool_size`` texts.

    Each row is drawn without replacement when the pool is large enough, and with
    replacement otherwise, so a small pool still gives windows of the right size.
    """
    if pool_size < 1:
        raise InsufficientSamplesError("the held-out pool is empty; calibration needs held-out texts")
    if sample_size <= pool_size:
        keys = rng.random((windows, pool_size))
        return np.argpartition(keys, sample_size - 1, axis=1)[:, :sample_size]
    return rng.integers(0, pool_size, size=(windows, sample_size))
