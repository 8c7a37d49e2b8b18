"""Tests of the novelty detector: exact null, power on a small mixture, examples and guards."""

from math import comb

import numpy as np
import pytest

from monitor.detectors.novelty import NoveltyDetector
from monitor.errors import ConfigError, DataError, InsufficientSamplesError
from tests.test_detectors import make_profile, make_window

DIMENSION = 16


def clustered(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points near randomly chosen ``centres``, as sentence embeddings of known intents lie."""
    chosen = centres[rng.integers(0, len(centres), size=count)]
    return (chosen + 0.3 * rng.normal(size=chosen.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    known = rng.normal(size=(20, DIMENSION))
    unknown = rng.normal(size=(5, DIMENSION))
    profile = make_profile(embeddings=clustered(600, known, rng), pool_embeddings=clustered(400, known, rng),
                           pool_token_ids=[[1]] * 400, pool_token_counts=np.full(400, 3))
    return {"known": known, "unknown": unknown, "profile": profile}


def window_of(points: np.ndarray, texts: list[str] | None = None):
    return make_window(len(points), embeddings=points, texts=texts or [])


def test_p_value_matches_the_negative_hypergeometric_formula(world):
    detector = NoveltyDetector().fit(world["profile"])
    big_n, k, n = detector.pool_size_, detector.rank_, 50
    for x in (1, 3, 8, 20):
        exact = sum(comb(j + k - 1, j) * comb(n - j + big_n - k, n - j) for j in range(x, n + 1)) / comb(big_n + n, n)
        assert detector.p_value(x, n) == pytest.approx(exact, rel=1e-9)
    assert detector.p_value(0, n) == 1.0


def test_false_alarm_rate_under_exchangeability(world):
    detector = NoveltyDetector(alpha=0.05).fit(world["profile"])
    rng = np.random.default_rng(1)
    flagged = [detector.test(window_of(clustered(100, world["known"], rng))).drifted for _ in range(200)]
    assert np.mean(flagged) <= 0.08


def test_detects_a_ten_percent_mixture_and_quotes_it(world):
    detector = NoveltyDetector(alpha=0.001, typical_examples=3).fit(world["profile"])
    rng = np.random.default_rng(2)
    points = np.vstack([clustered(270, world["known"], rng), clustered(30, world["unknown"], rng)])
    texts = [f"known {i}" for i in range(270)] + [f"unknown {i}" for i in range(30)]
    result = detector.test(window_of(points, texts))
    assert result.drifted
    assert result.details["novel_share"] > 0.08
    assert result.details["expected_share"] == pytest.approx(detector.rank_ / (detector.pool_size_ + 1))
    quoted = [example["text"] for example in result.details["typical_examples"]]
    assert len(quoted) == 3 and all(text.startswith("unknown") for text in quoted)


def test_small_window_is_insufficient(world):
    detector = NoveltyDetector(min_samples=30).fit(world["profile"])
    result = detector.test(window_of(clustered(10, world["known"], np.random.default_rng(3))))
    assert result.status == "insufficient_data"
    assert not result.drifted


def test_profile_without_pool_asks_for_a_rebuild():
    with pytest.raises(InsufficientSamplesError, match="no calibration pool.*rebuild"):
        NoveltyDetector().fit(make_profile())


def test_small_pool_is_refused():
    profile = make_profile(pool_embeddings=np.ones((15, DIMENSION), dtype=np.float32),
                           pool_token_ids=[[1]] * 15, pool_token_counts=np.full(15, 3))
    with pytest.raises(InsufficientSamplesError, match="15 texts"):
        NoveltyDetector().fit(profile)


def test_dimension_mismatch_names_both(world):
    detector = NoveltyDetector().fit(world["profile"])
    with pytest.raises(DataError, match="dimension 8, reference embeddings 16"):
        detector.test(window_of(np.ones((40, 8), dtype=np.float32)))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"quantile": 1.0}, "quantile must be in"), ({"quantile": 0.2}, "quantile must be in"),
    ({"typical_examples": -1}, "typical_examples"), ({"alpha": 2.0}, "alpha"),
])
def test_invalid_parameters(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        NoveltyDetector(**kwargs)


def test_far_tail_p_value_is_accurate(world):
    # 130 of 200 window texts above the cut-off: the exact tail is about 1e-80, far below where nhypergeom.sf is accurate.
    detector = NoveltyDetector().fit(world["profile"])
    big_n, k, n, x = detector.pool_size_, detector.rank_, 200, 130
    exact = sum(comb(j + k - 1, j) * comb(n - j + big_n - k, n - j) for j in range(x, n + 1)) / comb(big_n + n, n)
    assert exact < 1e-40
    assert detector.p_value(x, n) == pytest.approx(exact, rel=1e-6)


def test_cut_off_rank_is_exact_share():
    profile = make_profile(pool_embeddings=np.random.default_rng(4).normal(size=(1000, DIMENSION)).astype(np.float32),
                           pool_token_ids=[[1]] * 1000, pool_token_counts=np.full(1000, 3))
    detector = NoveltyDetector(quantile=0.95).fit(profile)
    assert detector.rank_ == 50
