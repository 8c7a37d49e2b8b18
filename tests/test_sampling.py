"""Tests of the window reservoir sampler and its streaming figures."""

import math
import sys

import numpy as np
import pytest
from scipy.stats import chisquare

from monitor.errors import ConfigError, DataError
from monitor.sampling import Observation, WindowSampler


def make_observation(index: int, confidence: float = 0.9, latency_ms: float | None = None) -> Observation:
    return Observation(
        event_id=f"e{index}",
        text=f"text {index}",
        predicted_label="balance",
        confidence=confidence,
        latency_ms=latency_ms,
    )


def test_reservoir_keeps_sample_size():
    sampler = WindowSampler(sample_size=50, seed=1)
    for index in range(1000):
        sampler.add(make_observation(index))

    assert sampler.count == 1000
    assert len(sampler.sample) == 50
    assert len({obs.event_id for obs in sampler.sample}) == 50


def test_reservoir_below_capacity_keeps_all():
    sampler = WindowSampler(sample_size=50)
    for index in range(20):
        sampler.add(make_observation(index))

    assert [obs.event_id for obs in sampler.sample] == [f"e{i}" for i in range(20)]


def test_reservoir_inclusion_is_uniform():
    # Over many seeded runs each stream position must be sampled with probability
    # sample_size / stream_length; a chi-square test over 10 position buckets checks it.
    stream_length, sample_size, runs, buckets = 2000, 40, 150, 10
    observations = [make_observation(i) for i in range(stream_length)]
    hits = np.zeros(buckets)
    for seed in range(runs):
        sampler = WindowSampler(sample_size=sample_size, seed=seed)
        for obs in observations:
            sampler.add(obs)
        positions = np.array([int(obs.event_id[1:]) for obs in sampler.sample])
        hits += np.bincount(positions * buckets // stream_length, minlength=buckets)

    assert hits.sum() == runs * sample_size
    assert chisquare(hits).pvalue > 0.001
    # The last bucket must not be favoured, which a recency-biased sampler would do.
    assert hits[-1] < 1.25 * hits.mean()


def test_reservoir_is_seeded():
    first, second = WindowSampler(10, seed=7), WindowSampler(10, seed=7)
    for index in range(500):
        first.add(make_observation(index))
        second.add(make_observation(index))

    assert [obs.event_id for obs in first.sample] == [obs.event_id for obs in second.sample]


def test_memory_bounded_over_long_stream():
    sampler = WindowSampler(sample_size=25, seed=0)
    for index in range(20000):
        sampler.add(make_observation(index, latency_ms=float(index % 100)))

    assert len(sampler.sample) == 25
    assert len(sampler._latencies) == 25
    assert sys.getsizeof(sampler.sample) < 1000


def test_mean_confidence_covers_all_events():
    sampler = WindowSampler(sample_size=5)
    confidences = np.linspace(0.1, 0.9, 401)
    for index, confidence in enumerate(confidences):
        sampler.add(make_observation(index, confidence=float(confidence)))

    assert sampler.mean_confidence == pytest.approx(confidences.mean(), abs=1e-12)


def test_empty_sampler_figures():
    sampler = WindowSampler(sample_size=5)

    assert sampler.count == 0
    assert math.isnan(sampler.mean_confidence)
    assert sampler.latency_quantiles() == {"p50": None, "p99": None}
    assert sampler.started_at is None
    assert sampler.last_at is None


def test_latency_quantiles_exact_below_capacity():
    sampler = WindowSampler(sample_size=10, latency_sample_size=1000)
    latencies = np.arange(1, 1001, dtype=float)
    for index, latency in enumerate(latencies):
        sampler.add(make_observation(index, latency_ms=float(latency)))

    quantiles = sampler.latency_quantiles()
    assert quantiles["p50"] == pytest.approx(np.quantile(latencies, 0.5))
    assert quantiles["p99"] == pytest.approx(np.quantile(latencies, 0.99))


def test_latency_quantiles_estimated_above_capacity():
    rng = np.random.default_rng(3)
    latencies = rng.exponential(scale=20.0, size=20000)
    sampler = WindowSampler(sample_size=10, seed=3, latency_sample_size=2000)
    for index, latency in enumerate(latencies):
        sampler.add(make_observation(index, latency_ms=float(latency)))

    quantiles = sampler.latency_quantiles()
    assert quantiles["p50"] == pytest.approx(np.quantile(latencies, 0.5), rel=0.1)
    assert quantiles["p99"] == pytest.approx(np.quantile(latencies, 0.99), rel=0.25)


def test_latency_none_is_skipped():
    sampler = WindowSampler(sample_size=10)
    sampler.add(make_observation(0, latency_ms=None))
    sampler.add(make_observation(1, latency_ms=40.0))

    assert sampler.latency_count == 1
    assert sampler.latency_quantiles() == {"p50": 40.0, "p99": 40.0}


def test_timestamps_track_first_and_last_add():
    sampler = WindowSampler(sample_size=3)
    sampler.add(make_observation(0))
    first = sampler.started_at
    sampler.add(make_observation(1))

    assert first is not None
    assert sampler.started_at == first
    assert sampler.last_at >= first


@pytest.mark.parametrize("sample_size", [0, -1, 2.5, None])
def test_sampler_rejects_invalid_sample_size(sample_size):
    with pytest.raises(ConfigError, match="sample_size"):
        WindowSampler(sample_size=sample_size)


@pytest.mark.parametrize("confidence", [-0.1, 1.5, float("nan"), "high"])
def test_observation_rejects_invalid_confidence(confidence):
    with pytest.raises(DataError, match="confidence"):
        Observation("e1", "text", "balance", confidence)


@pytest.mark.parametrize("latency", [-1.0, float("inf"), "fast"])
def test_observation_rejects_invalid_latency(latency):
    with pytest.raises(DataError, match="latency_ms"):
        Observation("e1", "text", "balance", 0.5, latency_ms=latency)


def test_sampler_rejects_non_observation():
    sampler = WindowSampler(sample_size=3)
    with pytest.raises(DataError, match="Observation"):
        sampler.add({"text": "hello"})
