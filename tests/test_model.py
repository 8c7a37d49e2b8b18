"""Tests for retrain.model: device selection, adapter loading and thread-safe prediction."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.errors import ConfigError, DataError, RegistryError
from retrain.model import Classifier, resolve_device
from retrain.trainer import TrainSettings, train_adapter
from tests.test_trainer import TOY_LABELS, toy_examples

TEXTS = [
    "i like apple",
    "the train please",
    "rain today",
    "",
    "a much longer sentence about an apple, a train and some rain " * 4,
    "show me the weather",
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("model-adapters") / "v1"
    settings = TrainSettings(epochs=4, batch_size=8, learning_rate=2e-2, max_length=32)
    train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), output_dir, settings)
    return output_dir


@pytest.fixture(scope="module")
def classifier(tiny_model_dir, adapter_dir) -> Classifier:
    return Classifier.load(str(tiny_model_dir), adapter_dir, version="v1", device="cpu")


def copy_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(adapter_dir, copy)
    return copy


def test_resolve_device_cpu_is_fp32():
    assert resolve_device("cpu") == (torch.device("cpu"), None)


def test_resolve_device_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_device("auto") == (torch.device("cpu"), None)


@pytest.mark.parametrize(("bf16_supported", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_resolve_device_cuda_dtype(monkeypatch, bf16_supported, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)

    assert resolve_device("auto") == (torch.device("cuda"), dtype)
    assert resolve_device("cuda:1") == (torch.device("cuda:1"), dtype)


def test_resolve_device_rejects_cuda_when_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_device_rejects_unknown_name():
    with pytest.raises(ConfigError, match="'tpu'"):
        resolve_device("tpu")


def test_classifier_attributes(classifier):
    assert classifier.version == "v1"
    assert classifier.labels == TOY_LABELS
    assert classifier.max_length == 32  # read from training.yaml
    assert classifier.device == torch.device("cpu")
    assert not classifier.model.training


def test_predict_proba_shape_and_normalization(classifier):
    probabilities = classifier.predict_proba(TEXTS)

    assert probabilities.dtype == np.float32
    assert probabilities.shape == (len(TEXTS), len(TOY_LABELS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()


def test_predict_proba_keeps_input_order(classifier):
    """Length-sorted batching must return rows in input order, independent of batch size."""
    full_batch = classifier.predict_proba(TEXTS, batch_size=64)
    one_by_one = np.stack([classifier.predict_proba([text])[0] for text in TEXTS])
    reversed_rows = classifier.predict_proba(TEXTS[::-1], batch_size=2)[::-1]

    np.testing.assert_allclose(full_batch, one_by_one, atol=1e-5)
    np.testing.assert_allclose(full_batch, reversed_rows, atol=1e-5)


def test_predict_proba_empty_input(classifier):
    probabilities = classifier.predict_proba([])

    assert probabilities.shape == (0, len(TOY_LABELS))
    assert probabilities.dtype == np.float32


def test_predict_proba_rejects_non_string(classifier):
    with pytest.raises(DataError, match=r"texts\[1\]"):
        classifier.predict_proba(["apple", None])


def test_predict_returns_top_label(classifier):
    probabilities = classifier.predict_proba(TEXTS)
    predictions = classifier.predict(TEXTS)

    assert len(predictions) == len(TEXTS)
    for row, (label, probability) in zip(probabilities, predictions):
        assert label == TOY_LABELS[int(row.argmax())]
        assert probability == pytest.approx(float(row.max()))


def test_concurrent_predictions_match_sequential(classifier):
    inputs = [[f"{text} {index}" for text in TEXTS] for index in range(16)]
    sequential = [classifier.predict_proba(batch) for batch in inputs]

    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(classifier.predict_proba, inputs))

    for expected, actual in zip(sequential, concurrent):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_load_missing_dir_names_path(tiny_model_dir, tmp_path):
    missing = tmp_path / "v404"

    with pytest.raises(RegistryError, match="v404"):
        Classifier.load(str(tiny_model_dir), missing, version="v404")


def test_load_corrupt_labels_names_file(tiny_model_dir, adapter_dir, tmp_path):
    copy = copy_adapter(adapter_dir, tmp_path)
    (copy / "labels.json").write_text("{not json")

    with pytest.raises(RegistryError, match="labels.json"):
        Classifier.load(str(tiny_model_dir), copy, version="bad")


def test_load_missing_labels_names_file(tiny_model_dir, adapter_dir, tmp_path):
    copy = copy_adapter(adapter_dir, tmp_path)
    (copy / "labels.json").unlink()

    with pytest.raises(RegistryError, match="labels file not found"):
        Classifier.load(str(tiny_model_dir), copy, version="bad")


def test_load_label_count_mismatch(tiny_model_dir, adapter_dir, tmp_path):
    copy = copy_adapter(adapter_dir, tmp_path)
    (copy / "labels.json").write_text(json.dumps(TOY_LABELS + ["music"]))

    with pytest.raises(RegistryError, match="could not be loaded"):
        Classifier.load(str(tiny_model_dir), copy, version="bad")


def test_load_corrupt_weights(tiny_model_dir, adapter_dir, tmp_path):
    copy = copy_adapter(adapter_dir, tmp_path)
    (copy / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    with pytest.raises(RegistryError, match="adapter_model.safetensors"):
        Classifier.load(str(tiny_model_dir), copy, version="bad")


def test_load_weights_without_head(tiny_model_dir, adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = copy_adapter(adapter_dir, tmp_path)
    weights = load_file(str(copy / "adapter_model.safetensors"))
    lora_only = {name: tensor for name, tensor in weights.items() if "classifier" not in name}
    save_file(lora_only, str(copy / "adapter_model.safetensors"))

    with pytest.raises(RegistryError, match="no classification head"):
        Classifier.load(str(tiny_model_dir), copy, version="bad")


def test_load_missing_adapter_config(tiny_model_dir, adapter_dir, tmp_path):
    copy = copy_adapter(adapter_dir, tmp_path)
    (copy / "adapter_config.json").unlink()

    with pytest.raises(RegistryError, match="adapter_config.json"):
        Classifier.load(str(tiny_model_dir), copy, version="bad")


def test_load_missing_base_model(adapter_dir, tmp_path):
    with pytest.raises(ConfigError, match="base model"):
        Classifier.load(str(tmp_path / "no-base-model"), adapter_dir, version="v1", device="cpu")
