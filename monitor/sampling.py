"""Bounded-memory sampling of the prediction events in one monitoring window."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np

from monitor.errors import ConfigError, DataError


@dataclass(frozen=True)
class Observation:
    """One classified request as the monitor receives it.

    ``confidence`` is the classifier's max-softmax probability in [0, 1] and
    ``latency_ms`` the serving latency in milliseconds, when known.
    """

    event_id: str
    text: str
    predicted_label: str
    confidence: float
    latency_ms: float | None = None
    version: str | None = None
    # When the monitor received it (Unix seconds); None means when it is added to a window.
    received_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"event {self.event_id!r}: text must be a str, got {type(self.text).__name__}")
        confidence = self.confidence
        if not isinstance(confidence, (int, float)) or not 0.0 <= confidence <= 1.0:
            raise DataError(f"event {self.event_id!r}: confidence must be a number in [0, 1], got {confidence!r}")
        latency = self.latency_ms
        if latency is not None and (
            not isinstance(latency, (int, float)) or not math.isfinite(latency) or latency < 0
        ):
            raise DataError(
                f"event {self.event_id!r}: latency_ms must be a finite number >= 0 or None, got {latency!r}"
            )


class WindowSampler:
    """Uniform reservoir sample of a window's observations plus exact streaming figures.

    The sample is kept with Algorithm R (Vitter 1985, "Random sampling with a
    reservoir", ACM Transactions on Mathematical Software 11(1), 37-57). After
    ``count`` additions every observation is in the sample with probability
    ``min(1, sample_size / count)``. ``count`` and
    ``mean_confidence`` cover all observations. Latency quantiles come from a
    second reservoir over the observations that carry a latency, so they are
    exact until that reservoir fills and estimates afterwards.

    Parameters
    ----------
    sample_size : int
        Maximum number of observations kept for the drift tests.
    seed : int
        Seed of the sampler's own ``random.Random``. Algorithm R draws once per observation
        after the reservoir fills, and a draw from numpy's Generator costs ten times more.
    latency_sample_size : int, optional
        Maximum number of latencies kept. Defaults to ``sample_size``.
    """

    def __init__(self, sample_size: int, seed: int = 0, latency_sample_size: int | None = None):
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ConfigError(f"sample_size must be a positive integer, got {sample_size!r}")
        if latency_sample_size is None:
            latency_sample_size = sample_size
        if not isinstance(latency_sample_size, int) or latency_sample_size < 1:
            raise ConfigError(f"latency_sample_size must be a positive integer, got {latency_sample_size!r}")

        self.sample_size = sample_size
        self.latency_sample_size = latency_sample_size
        self.seed = seed
        self._rng = random.Random(seed)
        self.count = 0
        self.sample: list[Observation] = []
        self.started_at: float | None = None
        self.last_at: float | None = None
        self._confidence_sum = 0.0
        self._latencies: list[float] = []
        self._latency_count = 0

    def add(self, obs: Observation) -> None:
        """Add one observation to the streaming figures and, with the reservoir probability, to the sample."""
        if not isinstance(obs, Observation):
            raise DataError(f"expected an Observation, got {type(obs).__name__}")
        # The window's span uses the time the event was received, the same clock the store's
        # received_at uses, so "labelled events since the window started" includes this one.
        now = obs.received_at if obs.received_at is not None else time.time()
        if self.started_at is None:
            self.started_at = now
        self.last_at = now

        self.count += 1
        self._confidence_sum += float(obs.confidence)
        self._offer(self.sample, self.sample_size, self.count, obs)

        if obs.latency_ms is not None:
            self._latency_count += 1
            self._offer(self._latencies, self.latency_sample_size, self._latency_count, float(obs.latency_ms))

    def _offer(self, reservoir: list, capacity: int, seen: int, item) -> None:
        # Algorithm R: the seen-th item replaces a uniform slot with probability capacity / seen.
        if len(reservoir) < capacity:
            reservoir.append(item)
            return
        slot = self._rng.randrange(seen)
        if slot < capacity:
            reservoir[slot] = item

    @property
    def mean_confidence(self) -> float:
        """Mean confidence over all observations added, or nan before the first one."""
        if self.count == 0:
            return math.nan
        return self._confidence_sum / self.count

    @property
    def latency_count(self) -> int:
        """Number of observations added that carried a latency."""
        return self._latency_count

    def latency_quantiles(self) -> dict[str, float | None]:
        """Return the p50 and p99 latency in milliseconds, or None for both when no latency was seen."""
        if not self._latencies:
            return {"p50": None, "p99": None}
        values = np.asarray(self._latencies, dtype=np.float64)
        p50, p99 = np.quantile(values, [0.5, 0.99])
        return {"p50": float(p50), "p99": float(p99)}
