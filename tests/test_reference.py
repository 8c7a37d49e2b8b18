"""Tests of reference profile building, tokenization helpers and persistence."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from monitor.embedding import Embedder
from monitor.errors import ConfigError, DataError, InsufficientSamplesError, NotFittedError
from monitor.reference import ReferenceProfile, build_reference, tokenize_counts

WORDS = "please check my account balance transfer money to savings what is the routing number card".split()
LABELS = ["balance", "transfer", "routing"]


def make_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(count)]


def make_probabilities(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(count, len(LABELS)))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return Embedder(str(tiny_model_dir))


@pytest.fixture(scope="module")
def profile(tokenizer, embedder):
    return build_reference(
        make_texts(200, seed=0),
        make_texts(60, seed=1),
        make_probabilities(60, seed=2),
        LABELS,
        tokenizer,
        embedder,
        max_length=10,
        embedding_sample=50,
        meta={"version": "v1"},
    )


def test_tokenize_counts_adds_special_tokens(tokenizer):
    counts, ids = tokenize_counts(tokenizer, ["hello world", ""])

    assert ids[0] == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert ids[1] == []
    assert counts.tolist() == [len(ids[0]) + 2, 2]


def test_tokenize_counts_does_not_truncate(tokenizer):
    counts, ids = tokenize_counts(tokenizer, ["word " * 300])

    assert len(ids[0]) == 300
    assert counts[0] == 302


def test_tokenize_counts_empty_input(tokenizer):
    counts, ids = tokenize_counts(tokenizer, [])

    assert counts.shape == (0,)
    assert ids == []


def test_embedder_normalises_rows(embedder):
    vectors = embedder.encode(["check my balance", "transfer money now"])

    assert vectors.dtype == np.float32
    assert vectors.shape == (2, embedder.dimension)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_embedder_empty_list(embedder):
    assert embedder.encode([]).shape == (0, embedder.dimension)


def test_embedder_missing_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Embedder(str(tmp_path / "absent"))


def test_embedder_directory_without_model(tmp_path):
    with pytest.raises(DataError, match="failed to load embedding model"):
        Embedder(str(tmp_path))


def test_build_reference_fields(profile, tokenizer, embedder):
    assert profile.token_counts.shape == (200,)
    assert len(profile.heldout_token_ids) == 40
    assert profile.meta["n_frequency_texts"] == 160
    assert profile.meta["version"] == "v1"
    assert profile.token_frequencies.shape == (len(tokenizer),)
    assert profile.token_frequencies.sum() == pytest.approx(1.0)
    assert profile.truncation_rate == pytest.approx(np.mean(profile.token_counts > 10))
    assert profile.embeddings.shape == (50, embedder.dimension)
    assert profile.unk_token_id == tokenizer.unk_token_id
    assert profile.unk_rate == 0.0


def test_build_reference_validation_figures(profile):
    probabilities = make_probabilities(60, seed=2)

    np.testing.assert_allclose(profile.val_confidences, probabilities.max(axis=1))
    assert profile.val_predicted_labels == [LABELS[i] for i in probabilities.argmax(axis=1)]
    assert set(profile.label_distribution) == set(LABELS)
    assert sum(profile.label_distribution.values()) == pytest.approx(1.0)


def test_build_reference_heldout_excluded_from_frequencies(tokenizer, embedder):
    texts = make_texts(100, seed=4)
    profile = build_reference(
        texts, texts[:30], make_probabilities(30, 5), LABELS, tokenizer, embedder,
        max_length=32, embedding_sample=10, heldout_fraction=0.2, seed=9,
    )
    vocab_size = len(tokenizer)
    _, ids = tokenize_counts(tokenizer, texts)
    all_counts = np.bincount([t for row in ids for t in row], minlength=vocab_size)
    heldout_counts = np.bincount([t for row in profile.heldout_token_ids for t in row], minlength=vocab_size)
    expected = (all_counts - heldout_counts) / (all_counts - heldout_counts).sum()

    assert profile.meta["n_heldout_texts"] == 20
    assert heldout_counts.sum() > 0
    np.testing.assert_allclose(profile.token_frequencies, expected)


def test_build_reference_counts_unknown_tokens(tokenizer, embedder):
    texts = make_texts(40, seed=6)
    texts[0] = texts[0] + " \u2603\u2603"
    profile = build_reference(
        texts, texts[:20], make_probabilities(20, 7), LABELS, tokenizer, embedder,
        max_length=32, embedding_sample=10,
    )
    _, ids = tokenize_counts(tokenizer, texts)
    n_unknown = sum(row.count(tokenizer.unk_token_id) for row in ids)
    assert n_unknown > 0
    assert profile.unk_rate == pytest.approx(n_unknown / sum(len(row) for row in ids))


def test_build_reference_too_few_texts_names_counts(tokenizer, embedder):
    with pytest.raises(InsufficientSamplesError, match=r"got 5 training and 30 validation"):
        build_reference(
            make_texts(5, 0), make_texts(30, 1), make_probabilities(30, 2), LABELS, tokenizer, embedder,
            max_length=32,
        )


def test_build_reference_too_few_val_texts(tokenizer, embedder):
    with pytest.raises(InsufficientSamplesError, match=r"got 40 training and 3 validation"):
        build_reference(
            make_texts(40, 0), make_texts(3, 1), make_probabilities(3, 2), LABELS, tokenizer, embedder,
            max_length=32,
        )


def test_build_reference_probability_shape_mismatch(tokenizer, embedder):
    with pytest.raises(DataError, match="shape"):
        build_reference(
            make_texts(40, 0), make_texts(30, 1), make_probabilities(29, 2), LABELS, tokenizer, embedder,
            max_length=32,
        )


def test_build_reference_rejects_unnormalised_rows(tokenizer, embedder):
    probabilities = make_probabilities(30, 2) * 0.5
    with pytest.raises(DataError, match="sum to 1"):
        build_reference(
            make_texts(40, 0), make_texts(30, 1), probabilities, LABELS, tokenizer, embedder, max_length=32,
        )


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2])
def test_build_reference_invalid_heldout_fraction(tokenizer, embedder, fraction):
    with pytest.raises(ConfigError, match="heldout_fraction"):
        build_reference(
            make_texts(40, 0), make_texts(30, 1), make_probabilities(30, 2), LABELS, tokenizer, embedder,
            max_length=32, heldout_fraction=fraction,
        )


def test_build_reference_rejects_unserialisable_meta(tokenizer, embedder):
    with pytest.raises(ConfigError, match="meta"):
        build_reference(
            make_texts(40, 0), make_texts(30, 1), make_probabilities(30, 2), LABELS, tokenizer, embedder,
            max_length=32, meta={"when": object()},
        )


def test_profile_round_trip(profile, tmp_path):
    profile.save(tmp_path / "ref")
    loaded = ReferenceProfile.load(tmp_path / "ref")

    np.testing.assert_array_equal(loaded.token_counts, profile.token_counts)
    np.testing.assert_array_equal(loaded.token_frequencies, profile.token_frequencies)
    np.testing.assert_array_equal(loaded.embeddings, profile.embeddings)
    np.testing.assert_array_equal(loaded.val_confidences, profile.val_confidences)
    assert loaded.embeddings.dtype == np.float32
    assert loaded.heldout_token_ids == profile.heldout_token_ids
    assert loaded.val_predicted_labels == profile.val_predicted_labels
    assert loaded.label_distribution == profile.label_distribution
    assert loaded.meta == profile.meta
    assert loaded.max_length == profile.max_length
    assert loaded.truncation_rate == profile.truncation_rate
    assert loaded.unk_rate == profile.unk_rate
    assert loaded.unk_token_id == profile.unk_token_id


def test_profile_save_writes_no_pickle(profile, tmp_path):
    profile.save(tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["arrays.npz", "profile.json"]
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as arrays:
        assert "token_counts" in arrays.files


def test_profile_load_missing_directory(tmp_path):
    with pytest.raises(NotFittedError, match="profile.json"):
        ReferenceProfile.load(tmp_path / "nothing")


def test_profile_load_corrupt_json(profile, tmp_path):
    profile.save(tmp_path)
    (tmp_path / "profile.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(DataError, match="profile.json"):
        ReferenceProfile.load(tmp_path)


def test_profile_load_missing_field(profile, tmp_path):
    profile.save(tmp_path)
    document = json.loads((tmp_path / "profile.json").read_text())
    del document["unk_rate"]
    (tmp_path / "profile.json").write_text(json.dumps(document))

    with pytest.raises(DataError, match="unk_rate"):
        ReferenceProfile.load(tmp_path)


def test_profile_load_corrupt_arrays(profile, tmp_path):
    profile.save(tmp_path)
    (tmp_path / "arrays.npz").write_bytes(b"garbage")

    with pytest.raises(DataError, match="arrays.npz"):
        ReferenceProfile.load(tmp_path)


def test_build_reference_stores_gold_labels(tokenizer, embedder):
    probabilities = make_probabilities(30, 2)
    predicted = [LABELS[i] for i in probabilities.argmax(axis=1)]
    gold = list(predicted)
    gold[0] = next(label for label in LABELS if label != predicted[0])

    profile = build_reference(
        make_texts(40, 0), make_texts(30, 1), probabilities, LABELS, tokenizer, embedder,
        max_length=32, embedding_sample=10, val_gold_labels=gold,
    )

    assert profile.val_gold_labels == gold
    assert profile.val_correct.tolist() == [False] + [True] * 29


def test_build_reference_without_gold_labels(profile):
    assert profile.val_gold_labels is None
    assert profile.val_correct is None


def test_build_reference_gold_label_count_mismatch(tokenizer, embedder):
    with pytest.raises(DataError, match="val_gold_labels"):
        build_reference(
            make_texts(40, 0), make_texts(30, 1), make_probabilities(30, 2), LABELS, tokenizer, embedder,
            max_length=32, val_gold_labels=["balance"] * 29,
        )


def test_profile_round_trip_gold_labels(tokenizer, embedder, tmp_path):
    gold = [LABELS[i % 3] for i in range(30)]
    profile = build_reference(
        make_texts(40, 0), make_texts(30, 1), make_probabilities(30, 2), LABELS, tokenizer, embedder,
        max_length=32, embedding_sample=10, val_gold_labels=gold,
    )

    profile.save(tmp_path)
    loaded = ReferenceProfile.load(tmp_path)

    assert loaded.val_gold_labels == gold
    np.testing.assert_array_equal(loaded.val_correct, profile.val_correct)


def test_profile_load_without_gold_labels_field(profile, tmp_path):
    profile.save(tmp_path)
    document = json.loads((tmp_path / "profile.json").read_text())
    del document["val_gold_labels"]
    (tmp_path / "profile.json").write_text(json.dumps(document))

    loaded = ReferenceProfile.load(tmp_path)

    assert loaded.val_gold_labels is None
    assert loaded.val_correct is None
    assert loaded.val_predicted_labels == profile.val_predicted_labels


def test_profile_load_gold_label_count_mismatch(profile, tmp_path):
    profile.save(tmp_path)
    document = json.loads((tmp_path / "profile.json").read_text())
    document["val_gold_labels"] = ["balance"] * 3
    (tmp_path / "profile.json").write_text(json.dumps(document))

    with pytest.raises(DataError, match="3 validation gold labels"):
        ReferenceProfile.load(tmp_path)


def test_profile_load_invalid_gold_labels(profile, tmp_path):
    profile.save(tmp_path)
    document = json.loads((tmp_path / "profile.json").read_text())
    document["val_gold_labels"] = "balance"
    (tmp_path / "profile.json").write_text(json.dumps(document))

    with pytest.raises(DataError, match="val_gold_labels"):
        ReferenceProfile.load(tmp_path)


def test_build_reference_calibration_pool_is_a_validation_sample(profile, tokenizer):
    assert profile.has_calibration_pool
    # 60 validation texts, capped at embedding_sample 50.
    assert len(profile.pool_token_ids) == 50 == profile.pool_embeddings.shape[0] == profile.pool_token_counts.shape[0]
    assert profile.meta["n_pool_texts"] == 50
    validation_ids = {tuple(ids) for ids in tokenize_counts(tokenizer, make_texts(60, seed=1))[1]}
    assert all(tuple(ids) in validation_ids for ids in profile.pool_token_ids)


def test_profile_round_trip_keeps_the_pool(profile, tmp_path):
    profile.save(tmp_path)
    loaded = ReferenceProfile.load(tmp_path)
    assert loaded.pool_token_ids == profile.pool_token_ids
    np.testing.assert_array_equal(loaded.pool_token_counts, profile.pool_token_counts)
    np.testing.assert_array_equal(loaded.pool_embeddings, profile.pool_embeddings)


def test_profile_saved_without_pool_loads_without_one(profile, tmp_path):
    # A profile written before the calibration pool existed has none of its arrays.
    profile.save(tmp_path)
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files if not name.startswith("pool_")}
    np.savez_compressed(tmp_path / "arrays.npz", **arrays)
    loaded = ReferenceProfile.load(tmp_path)
    assert not loaded.has_calibration_pool
    assert loaded.pool_embeddings is None


def test_profile_load_rejects_a_ragged_pool(profile, tmp_path):
    profile.save(tmp_path)
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["pool_embeddings"] = arrays["pool_embeddings"][:-1]
    np.savez_compressed(tmp_path / "arrays.npz", **arrays)
    with pytest.raises(DataError, match="calibration pool"):
        ReferenceProfile.load(tmp_path)
