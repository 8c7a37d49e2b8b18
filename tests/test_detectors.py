"""Tests of the four drift detectors on synthetic windows with known drift."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from monitor.detectors import (
    ConfidenceDetector,
    DriftResult,
    EmbeddingMMDDetector,
    TokenLengthDetector,
    VocabularyDetector,
    WindowFeatures,
)
from monitor.detectors.embedding_mmd import squared_distances, unbiased_mmd2
from monitor.errors import ConfigError, DataError, NotFittedError
from monitor.reference import ReferenceProfile, tokenize_counts

BANKING_WORDS = (
    "please check my account balance transfer money to savings what is the routing number card "
    "how much do i have in checking pay bill due date freeze lost report fraud interest rate"
).split()
SCIENCE_WORDS = "photosynthesis chlorophyll mitochondria ribosome xylem".split()


def make_texts(count: int, seed: int, words=BANKING_WORDS) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=rng.integers(4, 14))) for _ in range(count)]


def make_profile(**overrides) -> ReferenceProfile:
    rng = np.random.default_rng(0)
    fields = {
        "token_counts": rng.integers(5, 20, size=400),
        "max_length": 32,
        "truncation_rate": 0.0,
        "token_frequencies": np.full(100, 0.01),
        "unk_rate": 0.0,
        "unk_token_id": 0,
        "heldout_token_ids": [list(rng.integers(1, 100, size=8)) for _ in range(50)],
        "embeddings": rng.normal(size=(600, 16)).astype(np.float32),
        "val_confidences": rng.uniform(0.6, 1.0, size=500),
        "val_predicted_labels": ["balance"] * 250 + ["transfer"] * 250,
        "label_distribution": {"balance": 0.5, "transfer": 0.5},
        "meta": {},
    }
    fields.update(overrides)
    return ReferenceProfile(**fields)


def make_window(n: int, **overrides) -> WindowFeatures:
    fields = {
        "token_counts": np.full(n, 10),
        "token_ids": [[1, 2, 3]] * n,
        "embeddings": np.zeros((n, 16), dtype=np.float32),
        "confidences": np.full(n, 0.8),
        "predicted_labels": ["balance"] * n,
        "n_total": n,
    }
    fields.update(overrides)
    return WindowFeatures(**fields)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def text_profile(tokenizer):
    """Profile of 600 banking-style texts with a 20% held-out part, built without embeddings."""
    texts = make_texts(600, seed=0)
    counts, ids = tokenize_counts(tokenizer, texts)
    heldout = ids[:120]
    flat = np.array([t for row in ids[120:] for t in row])
    frequencies = np.bincount(flat, minlength=len(tokenizer)) / flat.size
    return make_profile(
        token_counts=counts,
        token_frequencies=frequencies,
        unk_token_id=tokenizer.unk_token_id,
        heldout_token_ids=heldout,
    )


def text_window(tokenizer, texts: list[str]) -> WindowFeatures:
    counts, ids = tokenize_counts(tokenizer, texts)
    return make_window(len(texts), token_counts=counts, token_ids=ids)


# Token length


def test_token_length_flags_doubled_texts(tokenizer, text_profile):
    texts = make_texts(120, seed=5)
    doubled = [a + " " + b for a, b in zip(texts[::2], texts[1::2])]
    detector = TokenLengthDetector().fit(text_profile)

    result = detector.test(text_window(tokenizer, doubled))

    assert result.status == "ok"
    assert result.drifted
    assert result.p_value < 1e-6
    assert result.details["window_mean_length"] > 1.5 * result.details["reference_mean_length"]


def test_token_length_stable_window(tokenizer, text_profile):
    detector = TokenLengthDetector().fit(text_profile)

    result = detector.test(text_window(tokenizer, make_texts(80, seed=6)))

    assert not result.drifted
    assert result.p_value > 0.01


def test_token_length_truncation_rates(text_profile):
    profile = make_profile(token_counts=np.full(100, 10), max_length=20, truncation_rate=0.0)
    detector = TokenLengthDetector().fit(profile)

    result = detector.test(make_window(40, token_counts=np.array([30] * 10 + [10] * 30)))

    assert result.details["window_truncation_rate"] == pytest.approx(0.25)
    assert result.details["reference_truncation_rate"] == 0.0
    assert result.details["max_length"] == 20


# Vocabulary


def test_vocabulary_flags_unseen_words(tokenizer, text_profile):
    detector = VocabularyDetector(tokenizer=tokenizer).fit(text_profile)
    texts = [a + " " + b for a, b in zip(make_texts(60, seed=7), make_texts(60, seed=8, words=SCIENCE_WORDS))]

    result = detector.test(text_window(tokenizer, texts))

    assert result.drifted
    assert result.p_value == pytest.approx(1 / 201)
    expected_pieces = {piece for word in SCIENCE_WORDS for piece in tokenizer.tokenize(word)}
    reported = set(result.details["new_frequent_tokens"])
    assert len(reported & expected_pieces) >= 5
    assert len(reported) == len(result.details["new_frequent_token_counts"])
    for token in reported:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert text_profile.token_frequencies[token_id] < 1e-5


def test_vocabulary_same_distribution_not_drifted(tokenizer, text_profile):
    detector = VocabularyDetector(tokenizer=tokenizer).fit(text_profile)

    for seed in range(10, 15):
        result = detector.test(text_window(tokenizer, make_texts(60, seed=seed)))
        assert result.p_value > 0.01, f"seed {seed}: p={result.p_value}"
        assert not result.drifted
        assert result.details["new_frequent_tokens"] == []


def test_vocabulary_null_cached_per_size(text_profile):
    detector = VocabularyDetector(alpha=0.05, null_windows=50).fit(text_profile)

    first = detector.null_distribution(40)

    assert detector.null_distribution(40) is first
    assert first.shape == (50,)
    assert np.all((first >= 0) & (first <= 1))
    assert detector.null_distribution(41) is not first


def test_vocabulary_without_tokenizer_reports_ids(text_profile, tokenizer):
    detector = VocabularyDetector().fit(text_profile)
    texts = make_texts(40, seed=9, words=SCIENCE_WORDS)

    result = detector.test(text_window(tokenizer, texts))

    assert all(isinstance(token, int) for token in result.details["new_frequent_tokens"])
    assert "continuation_share" not in result.details


def test_vocabulary_reports_unknown_rate(tokenizer, text_profile):
    detector = VocabularyDetector(tokenizer=tokenizer).fit(text_profile)
    texts = [text + " \u2603" for text in make_texts(40, seed=3)]

    result = detector.test(text_window(tokenizer, texts))

    assert result.details["unk_rate"] > 0
    assert result.details["reference_unk_rate"] == 0.0
    assert "[UNK]" in result.details["new_frequent_tokens"]


def test_vocabulary_rejects_foreign_token_ids(text_profile):
    detector = VocabularyDetector().fit(text_profile)
    window = make_window(40, token_ids=[[len(text_profile.token_frequencies) + 5]] * 40)

    with pytest.raises(DataError, match="outside the reference vocabulary"):
        detector.test(window)


def test_vocabulary_fragmentation_share(tokenizer, text_profile):
    detector = VocabularyDetector(tokenizer=tokenizer).fit(text_profile)
    texts = make_texts(40, seed=2, words=SCIENCE_WORDS)

    result = detector.test(text_window(tokenizer, texts))

    assert result.details["continuation_share"] > 0.5
    assert result.details["reference_continuation_share"] < 0.1


# Embedding MMD


def test_mmd_vectorised_matches_direct_formula():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(12, 3))
    kernel = np.exp(-squared_distances(points) / 2.0)
    first, second = kernel[:5, :5], kernel[5:, 5:]
    m, n = 5, 7
    expected = (
        (first.sum() - np.trace(first)) / (m * (m - 1))
        + (second.sum() - np.trace(second)) / (n * (n - 1))
        - 2 * kernel[:5, 5:].mean()
    )
    membership = np.zeros((1, 12))
    membership[0, :5] = 1.0
    no_diagonal = kernel.copy()
    np.fill_diagonal(no_diagonal, 0.0)

    assert unbiased_mmd2(no_diagonal, membership)[0] == pytest.approx(expected)


def test_mmd_detects_shifted_gaussian():
    profile = make_profile()
    detector = EmbeddingMMDDetector(permutations=200, reference_sample=300, seed=1).fit(profile)
    rng = np.random.default_rng(2)

    result = detector.test(make_window(60, embeddings=rng.normal(loc=0.6, size=(60, 16))))

    assert result.drifted
    assert result.p_value == pytest.approx(1 / 201)
    assert result.statistic > result.details["null_max"]


def test_mmd_same_distribution_not_drifted():
    profile = make_profile()
    detector = EmbeddingMMDDetector(permutations=200, reference_sample=300, seed=1).fit(profile)
    rng = np.random.default_rng(3)

    for _ in range(3):
        result = detector.test(make_window(60, embeddings=rng.normal(size=(60, 16))))
        assert result.p_value > 0.05
        assert not result.drifted


def test_mmd_p_value_has_permutation_form():
    detector = EmbeddingMMDDetector(alpha=0.05, permutations=99, reference_sample=100, seed=4).fit(make_profile())
    rng = np.random.default_rng(4)

    result = detector.test(make_window(40, embeddings=rng.normal(loc=0.1, size=(40, 16))))

    exceed = result.p_value * 100 - 1
    assert result.p_value > 0
    assert exceed == pytest.approx(round(exceed))
    assert 0 <= round(exceed) <= 99


def test_mmd_rejects_dimension_mismatch():
    detector = EmbeddingMMDDetector(reference_sample=50).fit(make_profile())

    with pytest.raises(DataError, match="dimension"):
        detector.test(make_window(40, embeddings=np.zeros((40, 8))))


def test_mmd_random_features_detect_shift():
    detector = EmbeddingMMDDetector(permutations=200, reference_sample=300, exact_max_points=100,
                                    random_features=256, seed=1).fit(make_profile())
    rng = np.random.default_rng(2)

    result = detector.test(make_window(60, embeddings=rng.normal(loc=0.6, size=(60, 16))))

    assert result.details["method"] == "random_features"
    assert result.drifted
    assert result.p_value == pytest.approx(1 / 201)


def test_mmd_random_features_calibrated_under_null():
    detector = EmbeddingMMDDetector(alpha=0.05, permutations=99, reference_sample=300, exact_max_points=100,
                                    random_features=128, seed=5).fit(make_profile())
    rng = np.random.default_rng(6)

    p_values = [detector.test(make_window(60, embeddings=rng.normal(size=(60, 16)))).p_value for _ in range(40)]

    assert detector.test(make_window(60, embeddings=rng.normal(size=(60, 16)))).details["method"] == "random_features"
    # Under the null the p-value is uniform: with 40 draws, 6 or more below 0.05 has probability about 0.05.
    assert sum(p < 0.05 for p in p_values) <= 5
    assert 0.3 < float(np.mean(p_values)) < 0.7


def test_mmd_exact_path_below_limit():
    detector = EmbeddingMMDDetector(alpha=0.05, permutations=50, reference_sample=100, exact_max_points=1000).fit(make_profile())

    result = detector.test(make_window(40, embeddings=np.zeros((40, 16))))

    assert result.details["method"] == "exact"


def test_mmd_identical_points_give_no_drift():
    profile = make_profile(embeddings=np.ones((100, 4), dtype=np.float32))
    detector = EmbeddingMMDDetector(alpha=0.1, reference_sample=50, permutations=20).fit(profile)

    result = detector.test(make_window(40, embeddings=np.ones((40, 4))))

    assert not result.drifted
    assert result.details["bandwidth"] == 1.0


# Confidence


@pytest.mark.parametrize("drop, drifted", [(0.2, True), (0.02, False)])
def test_confidence_drop_threshold(drop, drifted):
    profile = make_profile()
    detector = ConfidenceDetector(max_drop=0.1).fit(profile)

    result = detector.test(make_window(500, confidences=profile.val_confidences - drop))

    assert result.drifted is drifted
    assert result.statistic == pytest.approx(drop)
    assert result.threshold == 0.1


def test_confidence_p_value_is_one_sided():
    profile = make_profile()
    detector = ConfidenceDetector().fit(profile)

    lower = detector.test(make_window(500, confidences=profile.val_confidences - 0.2))
    higher = detector.test(make_window(500, confidences=np.clip(profile.val_confidences + 0.05, 0, 1)))

    assert lower.p_value < 1e-6
    assert higher.p_value > 0.5


def test_confidence_details():
    profile = make_profile()
    detector = ConfidenceDetector(low_confidence_threshold=0.7).fit(profile)
    labels = ["transfer"] * 30 + ["balance"] * 10

    result = detector.test(make_window(40, confidences=np.array([0.5] * 10 + [0.9] * 30), predicted_labels=labels))

    assert result.details["window_low_confidence_share"] == pytest.approx(0.25)
    assert result.details["reference_low_confidence_share"] == pytest.approx(np.mean(profile.val_confidences < 0.7))
    top = result.details["label_shifts"][0]
    assert top["window_share"] - top["reference_share"] == pytest.approx(0.25) or top[
        "reference_share"
    ] - top["window_share"] == pytest.approx(0.25)


# Shared behaviour


def all_detectors():
    return [
        TokenLengthDetector(),
        VocabularyDetector(alpha=0.1, null_windows=20),
        EmbeddingMMDDetector(alpha=0.1, permutations=20, reference_sample=50),
        ConfidenceDetector(),
    ]


@pytest.mark.parametrize("detector", all_detectors(), ids=lambda d: d.signal)
def test_small_window_is_insufficient(detector):
    detector.fit(make_profile())

    result = detector.test(make_window(10))

    assert result.status == "insufficient_data"
    assert result.drifted is False
    assert result.statistic is None
    assert result.p_value is None
    assert result.n == 10


@pytest.mark.parametrize("detector", all_detectors(), ids=lambda d: d.signal)
def test_result_is_json_serialisable(detector):
    detector.fit(make_profile())
    rng = np.random.default_rng(0)
    window = make_window(
        40, token_ids=[list(rng.integers(1, 100, size=6)) for _ in range(40)], embeddings=rng.normal(size=(40, 16))
    )

    result = detector.test(window)

    assert isinstance(result, DriftResult)
    assert result.status == "ok"
    json.dumps(result.to_dict(), allow_nan=False)


@pytest.mark.parametrize("detector", all_detectors(), ids=lambda d: d.signal)
def test_unfitted_detector_raises(detector):
    with pytest.raises(NotFittedError, match="fit"):
        detector.test(make_window(40))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: TokenLengthDetector(alpha=0),
        lambda: VocabularyDetector(null_windows=0),
        lambda: EmbeddingMMDDetector(min_samples=1),
        lambda: EmbeddingMMDDetector(alpha=0.01, permutations=99),
        lambda: VocabularyDetector(alpha=0.001, null_windows=500),
        lambda: ConfidenceDetector(max_drop=-0.1),
    ],
)
def test_invalid_parameters_raise(factory):
    with pytest.raises(ConfigError):
        factory()


def test_window_features_length_mismatch():
    with pytest.raises(DataError, match="confidences"):
        make_window(10, confidences=np.ones(9))


def test_resample_count_error_names_minimum():
    with pytest.raises(ConfigError, match="use at least 100"):
        EmbeddingMMDDetector(alpha=0.01, permutations=50)
