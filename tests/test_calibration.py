"""Tests of null calibration on held-out windows and of the detectors' calibrated statistics."""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.stats import ks_2samp

from monitor.calibration import NullCalibration, calibration_window_size, heldout_window_indices
from monitor.detectors import EmbeddingMMDDetector, TokenLengthDetector, VocabularyDetector
from monitor.errors import ConfigError, InsufficientSamplesError
from tests.test_detectors import make_profile, make_window


def exponential_null(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).exponential(1.0, size=count)


def test_empirical_p_value_inside_the_sample():
    calibration = NullCalibration("s", 100, np.arange(1.0, 101.0), tail_size=10)
    # 50 of the 100 null statistics are >= 51.
    assert calibration.p_value(51.0) == pytest.approx(51 / 101)
    assert calibration.p_value(-5.0) == 1.0


def test_tail_is_continuous_and_decreasing():
    calibration = NullCalibration("s", 100, exponential_null(1000), tail_size=20)
    start = calibration.tail_start
    just_above = calibration.p_value(start + 1e-12)
    assert just_above == pytest.approx(21 / 1001, rel=1e-6)
    values = [calibration.p_value(start + step) for step in np.linspace(0.0, 10.0, 50)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))
    assert values[-1] < 1e-4


def test_threshold_inverts_the_p_value():
    calibration = NullCalibration("s", 100, exponential_null(1000), tail_size=20)
    for level in (0.1, 0.01, 0.001, 1e-5):
        threshold = calibration.threshold(level)
        assert calibration.p_value(threshold + 1e-9) <= level * 1.001
        assert calibration.p_value(threshold - 1e-3) > level * 0.99


@pytest.mark.parametrize("family", [stats.expon(), stats.gamma(3), stats.norm(), stats.chi2(50)],
                         ids=["exponential", "gamma", "normal", "chi-square"])
def test_tail_holds_the_level_on_average(family):
    # The realized false-alarm rate of the fitted threshold, averaged over 100 calibrations of
    # 1,000 null draws, stays near 0.001 for an exponential tail and below it for lighter tails.
    level = 0.001
    rates = [family.sf(NullCalibration("s", 100, family.rvs(size=1000, random_state=seed), 50).threshold(level))
             for seed in range(100)]
    assert float(np.mean(rates)) < 1.3 * level
    assert float(np.mean(rates)) > 0.3 * level


def test_infinite_statistic():
    calibration = NullCalibration("s", 100, exponential_null(100), tail_size=10)
    assert calibration.p_value(math.inf) == pytest.approx(1 / 101)
    assert calibration.p_value(-math.inf) == 1.0


def test_tied_tail_falls_back_to_empirical():
    calibration = NullCalibration("s", 100, np.concatenate([np.zeros(80), np.ones(20)]), tail_size=10)
    assert calibration.tail_scale == 0.0
    assert calibration.p_value(2.0) == pytest.approx(1 / 101)


def test_summary_fields():
    calibration = NullCalibration("s", 100, exponential_null(500), tail_size=20)
    summary = calibration.summary(0.001)
    assert summary["null"] == "heldout_windows"
    assert summary["null_windows"] == 500
    assert summary["calibrated_threshold"] == pytest.approx(calibration.threshold(0.001))


def test_too_few_null_statistics():
    with pytest.raises(InsufficientSamplesError, match="10 finite null statistics"):
        NullCalibration("vocabulary", 100, np.concatenate([np.arange(10.0), np.full(60, np.inf)]), tail_size=5)


@pytest.mark.parametrize("tail_size", [4, 100, 2.5])
def test_bad_tail_size_names_value(tail_size):
    with pytest.raises(ConfigError, match=f"tail_size .* got {tail_size!r}"):
        NullCalibration("s", 100, exponential_null(100), tail_size=tail_size)


def test_window_indices_without_and_with_replacement():
    rng = np.random.default_rng(0)
    rows = heldout_window_indices(50, 20, 30, rng)
    assert rows.shape == (30, 20)
    assert all(len(set(row)) == 20 for row in rows)
    assert rows.min() >= 0
    assert rows.max() < 50
    large = heldout_window_indices(10, 25, 5, rng)
    assert large.shape == (5, 25)
    assert large.max() < 10
    with pytest.raises(InsufficientSamplesError, match="held-out pool is empty"):
        heldout_window_indices(0, 5, 5, rng)


@pytest.mark.parametrize("sample_size, pool_size, sampling, expected", [
    (500, 1000, "effective_size", 334), (500, 100_000, "effective_size", 498), (500, 1000, "window_size", 500),
    (5000, 1000, "effective_size", 833),
])
def test_calibration_window_size(sample_size, pool_size, sampling, expected):
    assert calibration_window_size(sample_size, pool_size, sampling) == expected


def test_effective_size_matches_population_variance():
    # The mean of n_eff texts drawn without replacement from the pool varies as much as a mean of n population draws.
    rng = np.random.default_rng(5)
    pool = rng.normal(size=1000)
    size = calibration_window_size(500, 1000, "effective_size")
    means = pool[heldout_window_indices(1000, size, 4000, rng)].mean(axis=1)
    assert np.var(means) == pytest.approx(np.var(pool) / 500, rel=0.1)


def test_unknown_sampling_names_value():
    with pytest.raises(ConfigError, match="'bootstrap'"):
        calibration_window_size(10, 100, "bootstrap")


# ------------------------------------------------------------ detectors: batch statistic == test statistic


def pool_window(seed: int = 0, n: int = 120):
    rng = np.random.default_rng(seed)
    return make_window(
        n,
        token_counts=rng.integers(3, 40, size=n),
        token_ids=[list(rng.integers(1, 100, size=rng.integers(1, 9))) for _ in range(n)],
        embeddings=rng.normal(size=(n, 16)).astype(np.float32),
    )


def subset(pool, index):
    return make_window(
        len(index),
        token_counts=pool.token_counts[index],
        token_ids=[pool.token_ids[i] for i in index],
        embeddings=pool.embeddings[index],
    )


@pytest.mark.parametrize("detector", [
    TokenLengthDetector(),
    VocabularyDetector(null_windows=200),
    EmbeddingMMDDetector(reference_sample=200),
    EmbeddingMMDDetector(reference_sample=200, exact_max_points=100, random_features=64),
], ids=["token_length", "vocabulary", "embedding-exact", "embedding-random-features"])
def test_batch_statistics_match_the_tested_statistic(detector):
    detector.fit(make_profile())
    pool = pool_window()
    rows = heldout_window_indices(120, 40, 5, np.random.default_rng(1))
    batch = detector.calibration_statistics(pool, rows, 40)
    for row, value in zip(rows, batch):
        assert detector.test(subset(pool, row)).statistic == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_ks_distance_matches_scipy():
    detector = TokenLengthDetector().fit(make_profile())
    window = pool_window(seed=4)
    expected = ks_2samp(window.token_counts, make_profile().token_counts).statistic
    assert detector.test(window).statistic == pytest.approx(expected)


def test_mmd_batch_repeated_points():
    detector = EmbeddingMMDDetector(reference_sample=100).fit(make_profile())
    pool = pool_window(n=10)
    rows = np.array([[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]])
    value = detector.calibration_statistics(pool, rows, 12)[0]
    window = pool.embeddings[rows[0]]
    assert detector.statistic(np.asarray(window, dtype=np.float64)) == pytest.approx(value)


def test_calibrated_detector_uses_calibration_for_its_size_only():
    detector = EmbeddingMMDDetector(alpha=0.01, permutations=200, reference_sample=200).fit(make_profile())
    pool = pool_window()
    rows = heldout_window_indices(120, 40, 300, np.random.default_rng(2))
    detector.set_calibration(NullCalibration("embedding", 40, detector.calibration_statistics(pool, rows, 40), 20))
    calibrated = detector.test(subset(pool, rows[0]))
    assert calibrated.details["null"] == "heldout_windows"
    assert "permutations" not in calibrated.details
    other_size = detector.test(subset(pool, rows[1][:30]))
    assert other_size.details["null"] == "permutations"
