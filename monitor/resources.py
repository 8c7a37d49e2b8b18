"""CPU and memory limits of the monitor sidecar, and the CPU budget of window embeddings.

Thread limits are applied once, when the daemon loads its models. Memory is watched,
not capped: a resident set above ``resources.memory_soft_limit_mb`` makes the sidecar
refuse to start new retrains and log it. The hard limit belongs to the container's
cgroup, because ``RLIMIT_AS`` caps virtual address space, which torch and its
allocators reserve far beyond what they touch.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from typing import Any

import numpy as np
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.config import ResourcesConfig
from monitor.sampling import WindowSampler

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
# Embedding caps are rounded down to a multiple of this share of monitor.sample_size, so at most
# ten window sizes need their own null calibration.
CAP_STEPS = 10


class ResourceMetrics:
    """Gauges and counters of the sidecar's resource limits, on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry):
        self.resident_memory = Gauge(
            "driftloop_resident_memory_bytes", "Resident set size of the sidecar process at the last check.",
            registry=registry)
        self.memory_soft_limit = Gauge(
            "driftloop_memory_soft_limit_bytes", "resources.memory_soft_limit_mb in bytes; 0 when unset.",
            registry=registry)
        self.memory_over_soft_limit = Gauge(
            "driftloop_memory_over_soft_limit", "1 while the resident set is above the soft limit, so new retrains are refused.",
            registry=registry)
        self.retrains_refused = Counter(
            "driftloop_retrains_refused_total", "Retrain triggers not started, by reason.", ["reason"], registry=registry)
        self.retrains_refused.labels("memory")
        self.retrains_refused.labels("shutdown")
        self.window_embedded = Gauge(
            "driftloop_window_embedded_texts",
            "Texts of the last evaluated window that the detectors tested (and embedded), after the embedding budget.",
            registry=registry)
        self.window_embedding_cap = Gauge(
            "driftloop_window_embedding_cap_texts",
            "Cap on embedded texts that resources.embedding_max_texts_per_s set for the last window; NaN when no cap.",
            registry=registry)
        self.windows_skipped = Counter(
            "driftloop_windows_skipped_total",
            "Closed windows not evaluated, because the embedding or evaluation-time budget was spent or their "
            "version is no longer active; their events stay stored.",
            registry=registry)


def apply_thread_limits(resources: ResourcesConfig) -> dict[str, Any]:
    """Set the sidecar's thread pools from ``resources`` and return what was set, for the log.

    ``inference_threads`` sets torch's intra-op threads, used by window embeddings and profile
    builds. A retrain switches torch to ``retrain.training.num_threads`` while it runs and back
    afterwards, and torch threads are per process, so evaluations during a retrain use the
    training count. ``blas_threads`` caps the OpenMP and BLAS pools of numpy and scikit-learn at
    run time through threadpoolctl, which also works after the libraries were loaded, unlike
    ``OMP_NUM_THREADS``.
    """
    import torch

    applied: dict[str, Any] = {}
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if resources.tokenizers_parallelism else "false"
    applied["tokenizers_parallelism"] = resources.tokenizers_parallelism
    if resources.inference_threads is not None:
        torch.set_num_threads(resources.inference_threads)
    applied["torch_threads"] = torch.get_num_threads()
    if resources.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        # Without a context manager the limits stay in place for the life of the process.
        threadpool_limits(limits=resources.blas_threads)
        applied["blas_threads"] = resources.blas_threads
    return applied


def resident_memory_bytes() -> int:
    """Return the resident set size of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


class MemoryWatch:
    """Compare the resident set size with ``resources.memory_soft_limit_mb``.

    Crossing the limit in either direction is logged once. ``over_limit`` is what the
    daemon calls before it starts a retrain, because a retrain adds a second copy of
    the model and its optimiser state.
    """

    def __init__(self, soft_limit_mb: int | None, metrics: ResourceMetrics,
                 measure=resident_memory_bytes):
        self.soft_limit_bytes = soft_limit_mb * MIB if soft_limit_mb is not None else None
        self.metrics = metrics
        self.measure = measure
        self.over = False
        metrics.memory_soft_limit.set(self.soft_limit_bytes or 0)

    def check(self) -> int:
        """Measure the resident set, update the metrics and the ``over`` flag; return the bytes measured."""
        resident = self.measure()
        self.metrics.resident_memory.set(resident)
        if self.soft_limit_bytes is None:
            return resident
        over = resident > self.soft_limit_bytes
        if over and not self.over:
            logger.warning("resident memory %.0f MiB is above resources.memory_soft_limit_mb (%.0f MiB); "
                           "new retrains are refused until it falls below", resident / MIB, self.soft_limit_bytes / MIB)
        elif self.over and not over:
            logger.info("resident memory %.0f MiB is below resources.memory_soft_limit_mb again; retrains may start",
                        resident / MIB)
        self.over = over
        self.metrics.memory_over_soft_limit.set(1 if over else 0)
        return resident

    def over_limit(self) -> bool:
        """Measure now and return True when the resident set is above the soft limit."""
        self.check()
        return self.over


def embedding_cap(max_texts_per_s: float | None, span_s: float, *, sample_size: int, min_samples: int) -> int | None:
    """Return how many sampled texts of a window may be embedded, or None when there is no budget.

    The budget is ``max_texts_per_s`` times the seconds the window took to fill
    (``span_s``), so a window of slow traffic may embed as many texts per second
    as one of fast traffic. The cap is rounded down to a multiple of
    ``sample_size / CAP_STEPS``, because each new sample size costs a null
    calibration. It never falls below ``min_samples``: a smaller window could
    only report insufficient data, so the budget is exceeded rather than the
    window left untested.
    """
    if max_texts_per_s is None:
        return None
    step = max(1, math.ceil(sample_size / CAP_STEPS))
    allowed = int(max_texts_per_s * max(span_s, 0.0))
    rounded = (allowed // step) * step
    return min(sample_size, max(rounded, min_samples))


class TokenBucket:
    """Token bucket that limits a kind of work to ``rate`` units a second on average.

    The bucket gains ``rate`` units a second of wall time and keeps at most ``burst``.
    ``take`` spends units known before the work (texts to embed) and refuses when they are
    not there; ``charge`` spends units known only after it (seconds an evaluation took), and
    may leave the bucket in debt, which later gains repay first.

    The daemon keeps two. Texts embedded: ``embedding_cap`` sizes one window by how long it
    took to fill, but never below ``detectors.min_samples``, so windows that fill in a fraction
    of a second would each still embed that floor. Seconds spent evaluating: the detectors
    cost a window a fixed part that the number of texts does not change, so only a budget of
    time bounds the share of the core they take. A window is evaluated only when both buckets
    allow it; skipped windows are counted, and their events stay in the store with their
    window id.
    """

    def __init__(self, rate: float, burst: float, initial: float | None = None, clock=time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive, got rate={rate!r} burst={burst!r}")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        # Starting below the burst keeps a traffic spike right after start-up from spending it at once.
        self.credit = burst if initial is None else min(initial, burst)
        self._last = clock()

    def available(self) -> float:
        """Return the units in the bucket now; negative while in debt."""
        now = self.clock()
        self.credit = min(self.burst, self.credit + (now - self._last) * self.rate)
        self._last = now
        return self.credit

    def take(self, amount: float) -> bool:
        """Spend ``amount`` and return True when the bucket contains it; otherwise return False and spend nothing."""
        if self.available() < amount:
            return False
        self.credit -= amount
        return True

    def charge(self, amount: float) -> None:
        """Spend ``amount`` of work already done, into debt if need be."""
        self.available()
        self.credit -= amount


def limit_sample(sampler: WindowSampler, cap: int | None, seed: int) -> WindowSampler:
    """Return ``sampler`` with its sample cut to ``cap`` texts drawn without replacement.

    A uniform subsample of the reservoir is a uniform sample of the window. The
    copy keeps the event count, mean confidence and latencies of the whole window;
    ``sampler`` itself is not changed.
    """
    if cap is None or len(sampler.sample) <= cap:
        return sampler
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(sampler.sample), size=cap, replace=False))
    limited = copy.copy(sampler)
    limited.sample = [sampler.sample[index] for index in keep]
    return limited
