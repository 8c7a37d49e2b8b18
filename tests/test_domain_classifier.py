"""Tests of the domain-classifier drift detector on synthetic Gaussian embeddings."""

import json
import math

import numpy as np
import pytest

from monitor.detectors.base import WindowFeatures
from monitor.detectors.domain_classifier import DomainClassifierDetector, combine_bonferroni
from monitor.errors import ConfigError, DataError, InsufficientSamplesError, NotFittedError
from monitor.reference import ReferenceProfile
from tests.test_detectors import make_profile as base_profile


def make_profile(embeddings: np.ndarray) -> ReferenceProfile:
    return base_profile(embeddings=np.asarray(embeddings, dtype=np.float32))


def make_window(embeddings: np.ndarray, texts: list[str] | None = None) -> WindowFeatures:
    n = np.asarray(embeddings).shape[0]
    return WindowFeatures(
        token_counts=np.full(n, 10),
        token_ids=[[1, 2, 3]] * n,
        embeddings=embeddings,
        confidences=np.full(n, 0.8),
        predicted_labels=["balance"] * n,
        n_total=n,
        texts=texts if texts is not None else [],
    )


def gaussian(rng: np.random.Generator, rows: int, dimension: int, shift: float = 0.0) -> np.ndarray:
    return rng.normal(loc=shift, size=(rows, dimension))


# p-value


def test_same_distribution_p_value_calibrated():
    rng = np.random.default_rng(100)
    trials = 150
    p_values = []
    for trial in range(trials):
        detector = DomainClassifierDetector(alpha=0.05, reference_sample=80, seed=trial)
        detector.fit(make_profile(gaussian(rng, 80, 4)))
        p_values.append(detector.test(make_window(gaussian(rng, 40, 4))).p_value)
    p_values = np.array(p_values)

    rejection_share = float(np.mean(p_values < 0.05))

    # Binomial(150, 0.05) exceeds 15 rejections (share 0.1) with probability below 1%.
    assert rejection_share <= 0.1, f"share of p < 0.05 under the null is {rejection_share:.3f}"
    assert np.all((p_values > 0) & (p_values <= 1))


def test_shifted_sample_detected():
    rng = np.random.default_rng(1)
    detector = DomainClassifierDetector(seed=1).fit(make_profile(gaussian(rng, 400, 8)))

    result = detector.test(make_window(gaussian(rng, 120, 8, shift=1.5)))

    assert result.status == "ok"
    assert result.drifted
    assert result.p_value < 1e-10
    assert result.statistic > 0.97
    assert min(result.details["fold_aucs"]) > 0.9


def test_combine_bonferroni_values():
    assert combine_bonferroni(np.array([0.01, 0.2, 0.5])) == pytest.approx(0.03)
    assert combine_bonferroni(np.array([0.3, 0.9])) == 0.6
    assert combine_bonferroni(np.array([0.6, 0.9])) == 1.0


def test_perfect_split_fold_aucs():
    rng = np.random.default_rng(2)
    detector = DomainClassifierDetector(folds=3).fit(make_profile(gaussian(rng, 90, 2)))

    result = detector.test(make_window(gaussian(rng, 60, 2, shift=20.0)))

    assert result.statistic == 1.0
    assert result.details["fold_aucs"] == [1.0, 1.0, 1.0]
    assert len(result.details["fold_p_values"]) == 3


# Details


def test_details_fields():
    rng = np.random.default_rng(3)
    detector = DomainClassifierDetector(reference_sample=150, folds=4).fit(make_profile(gaussian(rng, 300, 6)))

    result = detector.test(make_window(gaussian(rng, 60, 6)))

    assert result.signal == "domain_classifier"
    assert result.details["auc"] == result.statistic
    assert result.details["folds"] == 4
    assert result.details["n_reference"] == 150
    assert result.details["n_window"] == 60
    assert result.n == 60
    assert result.threshold == 0.01


def test_typical_examples_are_the_shifted_texts():
    rng = np.random.default_rng(4)
    detector = DomainClassifierDetector(seed=4).fit(make_profile(gaussian(rng, 300, 8)))
    embeddings = np.vstack([gaussian(rng, 90, 8), gaussian(rng, 10, 8, shift=3.0)])
    texts = [f"usual text {i}" for i in range(90)] + [f"shifted text {i}" for i in range(10)]

    result = detector.test(make_window(embeddings, texts))

    examples = result.details["typical_examples"]
    assert len(examples) == 5
    assert all(example["text"].startswith("shifted text") for example in examples)
    assert all(example["text"] == texts[example["index"]] for example in examples)
    scores = [example["score"] for example in examples]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= score <= 1.0 for score in scores)


@pytest.mark.parametrize("count", [0, 2, 80])
def test_typical_examples_count(count):
    rng = np.random.default_rng(5)
    detector = DomainClassifierDetector(typical_examples=count).fit(make_profile(gaussian(rng, 100, 4)))

    result = detector.test(make_window(gaussian(rng, 50, 4), [f"text {i}" for i in range(50)]))

    assert len(result.details["typical_examples"]) == min(count, 50)


def test_typical_examples_without_texts():
    rng = np.random.default_rng(6)
    detector = DomainClassifierDetector().fit(make_profile(gaussian(rng, 100, 4)))

    result = detector.test(make_window(gaussian(rng, 40, 4)))

    examples = result.details["typical_examples"]
    assert len(examples) == 5
    assert all(example["text"] is None for example in examples)
    assert all(0 <= example["index"] < 40 for example in examples)


def test_result_is_json_serialisable():
    rng = np.random.default_rng(7)
    detector = DomainClassifierDetector().fit(make_profile(gaussian(rng, 100, 4)))

    result = detector.test(make_window(gaussian(rng, 40, 4), [f"text {i}" for i in range(40)]))

    json.dumps(result.to_dict(), allow_nan=False)


def test_same_seed_same_result():
    rng = np.random.default_rng(8)
    profile = make_profile(gaussian(rng, 200, 4))
    window = make_window(gaussian(rng, 50, 4, shift=0.2))

    first = DomainClassifierDetector(reference_sample=100, seed=3).fit(profile).test(window)
    second = DomainClassifierDetector(reference_sample=100, seed=3).fit(profile).test(window)

    assert first.to_dict() == second.to_dict()


# Edge cases


def test_small_window_is_insufficient():
    rng = np.random.default_rng(9)
    detector = DomainClassifierDetector(min_samples=30).fit(make_profile(gaussian(rng, 100, 4)))

    result = detector.test(make_window(gaussian(rng, 29, 4)))

    assert result.status == "insufficient_data"
    assert result.drifted is False
    assert result.statistic is None
    assert result.p_value is None
    assert result.n == 29
    assert result.details["min_samples"] == 30


def test_identical_texts_and_embeddings_not_drifted():
    detector = DomainClassifierDetector().fit(make_profile(np.ones((200, 4))))

    result = detector.test(make_window(np.ones((60, 4)), ["the same text"] * 60))

    assert result.status == "ok"
    assert not result.drifted
    assert result.statistic == pytest.approx(0.5, abs=0.05)
    assert result.p_value == 1.0
    assert result.details["typical_examples"][0]["text"] == "the same text"


def test_window_larger_than_reference_sample():
    rng = np.random.default_rng(10)
    detector = DomainClassifierDetector(reference_sample=50, seed=10).fit(make_profile(gaussian(rng, 500, 4)))

    same = detector.test(make_window(gaussian(rng, 300, 4)))
    shifted = detector.test(make_window(gaussian(rng, 300, 4, shift=1.0)))

    assert same.status == "ok"
    assert same.details["n_reference"] == 50
    assert same.details["n_window"] == 300
    assert not same.drifted
    assert shifted.drifted
    assert shifted.statistic > 0.85


def test_small_reference_uses_all_rows():
    rng = np.random.default_rng(11)
    detector = DomainClassifierDetector(reference_sample=500).fit(make_profile(gaussian(rng, 40, 4)))

    result = detector.test(make_window(gaussian(rng, 40, 4)))

    assert result.details["n_reference"] == 40


def test_zero_column_window_is_insufficient():
    rng = np.random.default_rng(12)
    detector = DomainClassifierDetector().fit(make_profile(gaussian(rng, 100, 4)))

    result = detector.test(make_window(np.zeros((100, 0))))

    assert result.status == "insufficient_data"
    assert result.n == 0
    assert result.details["embeddings_disabled"] is True


def test_zero_column_reference_raises_in_fit():
    with pytest.raises(InsufficientSamplesError, match="at least one column"):
        DomainClassifierDetector().fit(make_profile(np.zeros((100, 0))))


def test_reference_with_fewer_rows_than_folds_raises():
    with pytest.raises(InsufficientSamplesError, match="folds=5"):
        DomainClassifierDetector().fit(make_profile(np.zeros((4, 3))))


def test_nan_in_window_embeddings_raises():
    rng = np.random.default_rng(13)
    detector = DomainClassifierDetector().fit(make_profile(gaussian(rng, 100, 4)))
    embeddings = gaussian(rng, 40, 4)
    embeddings[7, 2] = np.nan

    with pytest.raises(DataError, match=r"WindowFeatures\.embeddings contains NaN.*\[7\]"):
        detector.test(make_window(embeddings))


def test_nan_in_reference_embeddings_raises():
    embeddings = np.zeros((100, 4))
    embeddings[3, 0] = np.inf

    with pytest.raises(DataError, match=r"ReferenceProfile\.embeddings contains NaN or infinite"):
        DomainClassifierDetector().fit(make_profile(embeddings))


def test_dimension_mismatch_raises():
    rng = np.random.default_rng(14)
    detector = DomainClassifierDetector().fit(make_profile(gaussian(rng, 100, 4)))

    with pytest.raises(DataError, match="dimension 3"):
        detector.test(make_window(gaussian(rng, 40, 3)))


def test_unfitted_detector_raises():
    with pytest.raises(NotFittedError, match="fit"):
        DomainClassifierDetector().test(make_window(np.zeros((40, 4))))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"folds": 1}, "folds must be an integer >= 2, got 1"),
        ({"folds": 2.5}, "folds must be an integer >= 2, got 2.5"),
        ({"reference_sample": 0}, "reference_sample must be a positive integer, got 0"),
        ({"min_samples": 1}, "min_samples must be an integer >= 2, got 1"),
        ({"min_samples": 4, "folds": 5}, "min_samples=4 is below folds=5"),
        ({"typical_examples": -1}, "typical_examples must be an integer >= 0, got -1"),
        ({"regularization": 0.0}, "regularization must be a positive finite number, got 0.0"),
        ({"regularization": float("nan")}, "regularization must be a positive finite number, got nan"),
    ],
)
def test_invalid_parameters_raise(arguments, message):
    with pytest.raises(ConfigError, match=message):
        DomainClassifierDetector(**arguments)
