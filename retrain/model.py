"""Inference wrapper for one adapter version: base model + LoRA adapter + classification head."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from monitor.errors import ConfigError, DataError, RegistryError

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
TRAINING_RECORD_FILE = "training.yaml"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# Used when an adapter directory has no training.yaml. It equals the TrainSettings.max_length default.
DEFAULT_MAX_LENGTH = 64

# PEFT saves the SEQ_CLS head under these module names (peft 0.21 `classifier_module_names`).
HEAD_MODULE_NAMES = ("classifier", "score")


def resolve_device(preference: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """Pick the compute device and autocast dtype for ``preference``.

    "auto" selects CUDA when available, else the CPU. On CUDA the dtype is bfloat16
    when the GPU supports it and float16 otherwise. The CPU returns None, which means fp32.
    Raises ConfigError for an unknown preference or for "cuda" without a CUDA device.
    """
    normalized = preference.strip().lower()
    is_cuda_request = normalized == "cuda" or normalized.startswith("cuda:")
    if normalized not in ("auto", "cpu") and not is_cuda_request:
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {preference!r}"
        )

    if normalized == "cpu":
        return torch.device("cpu"), None

    cuda_available = torch.cuda.is_available()
    if is_cuda_request and not cuda_available:
        raise ConfigError(
            f"device {preference!r} was requested but CUDA is not available; use 'auto' or 'cpu'"
        )
    if not cuda_available:
        return torch.device("cpu"), None

    device = torch.device(normalized if is_cuda_request else "cuda")
    if torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float16


def read_labels(adapter_dir: Path) -> list[str]:
    """Read and validate ``adapter_dir/labels.json``, a JSON list of unique label strings.

    Raises RegistryError naming the file when it is missing or malformed.
    """
    labels_path = adapter_dir / LABELS_FILE
    try:
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"adapter labels file not found: {labels_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistryError(f"adapter labels file {labels_path} is unreadable: {error}") from error

    if not isinstance(labels, list) or not labels:
        raise RegistryError(f"adapter labels file {labels_path} must contain a non-empty JSON list")
    if not all(isinstance(label, str) for label in labels):
        raise RegistryError(f"adapter labels file {labels_path} must contain only strings")
    if len(set(labels)) != len(labels):
        raise RegistryError(f"adapter labels file {labels_path} contains duplicate labels")
    return labels


def find_head_weight_keys(adapter_dir: Path) -> list[str]:
    """Return the tensor names of the classification head stored in the adapter weights file.

    Raises RegistryError when the weights file is missing or not a readable safetensors file.
    """
    from safetensors import safe_open

    weights_path = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise RegistryError(f"adapter weights file not found: {weights_path}")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            keys = list(weights.keys())
    except Exception as error:  # safetensors raises its own SafetensorError and OSError
        raise RegistryError(f"adapter weights file {weights_path} is unreadable: {error}") from error

    return [key for key in keys if any(f".{name}." in f".{key}" for name in HEAD_MODULE_NAMES)]


def read_max_length(adapter_dir: Path) -> int:
    """Return the tokenizer max_length the adapter was trained with, from training.yaml."""
    record_path = adapter_dir / TRAINING_RECORD_FILE
    if not record_path.is_file():
        return DEFAULT_MAX_LENGTH
    try:
        record = yaml.safe_load(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RegistryError(f"training record {record_path} is unreadable: {error}") from error

    max_length = (record or {}).get("settings", {}).get("max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length < 2:
        raise RegistryError(
            f"training record {record_path} has invalid settings.max_length {max_length!r}"
        )
    return max_length


def validate_adapter_dir(adapter_dir: Path) -> list[str]:
    """Check that ``adapter_dir`` contains a loadable adapter with a head, and return its labels."""
    if not adapter_dir.is_dir():
        raise RegistryError(f"adapter directory not found: {adapter_dir}")
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise RegistryError(f"adapter config not found: {adapter_dir / ADAPTER_CONFIG_FILE}")

    labels = read_labels(adapter_dir)
    if not find_head_weight_keys(adapter_dir):
        raise RegistryError(
            f"adapter weights in {adapter_dir} contain no classification head "
            f"(no tensor under {', '.join(HEAD_MODULE_NAMES)}); retrain the adapter with task_type SEQ_CLS"
        )
    return labels


def load_base_classifier(base_model: str, labels: list[str]):
    """Load the tokenizer and the base model with a fresh head over ``labels``.

    A tokenizer without a pad token pads with its end-of-sequence token, and the model's
    ``pad_token_id`` follows, because decoder classifiers find each text's last token by it.
    Raises OSError when the model cannot be found or read, and ValueError when the tokenizer
    has neither token. Callers wrap both in the error type of their context.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def load_tokenizer(base_model: str):
    """Load the tokenizer of ``base_model``; one without a pad token pads with its end-of-sequence token.

    Raises OSError when a local folder does not exist, and ValueError when the tokenizer has
    neither token.
    """
    from transformers import AutoTokenizer

    looks_like_path = base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    if looks_like_path and not Path(base_model).expanduser().exists():
        raise OSError(f"the folder {base_model} does not exist; model.base takes 'minilm', a Hugging Face id or a local folder")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {base_model!r} has neither a pad_token nor an eos_token, so batches cannot be "
                "padded; add a pad token to the tokenizer files or choose another base model"
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer of %s has no pad_token; padding with eos_token %r", base_model, tokenizer.eos_token)
    return tokenizer


class BaseModelCache:
    """The last base model loaded, kept in memory so that loading the next version skips the disk.

    A model server swaps versions of one base model: each load deep-copies the cached base,
    with its fresh head over the same labels, and puts the adapter on the copy, because
    PEFT changes the model it wraps. One entry only, so memory grows by one base model.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model: torch.nn.Module | None = None

    def load(self, base_model: str, labels: list[str]):
        """Return (tokenizer, base model with a fresh head over ``labels``), the model a private copy."""
        import copy

        key = (base_model, tuple(labels))
        with self._lock:
            if self._key != key:
                tokenizer, model = load_base_classifier(base_model, labels)
                self._key, self._model = key, model
                return tokenizer, copy.deepcopy(model)
            model = copy.deepcopy(self._model)
        return load_tokenizer(base_model), model


class Classifier:
    """Inference wrapper around a base model with one LoRA adapter version and its head.

    ``predict_proba`` and ``predict`` may be called from several threads at once. Tokenization
    runs under a lock because a fast tokenizer mutates its padding and truncation state per call.
    The forward pass runs without a lock under ``torch.inference_mode``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        labels: list[str],
        version: str,
        max_length: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.version = version
        self.max_length = max_length
        self.device = device
        self.autocast_dtype = autocast_dtype
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        base_model: str,
        adapter_dir: str | Path,
        version: str,
        device: str | None = None,
        num_threads: int | None = None,
        base_cache: BaseModelCache | None = None,
    ) -> Classifier:
        """Load ``base_model`` with the adapter and head saved in ``adapter_dir``, in eval mode.

        ``device`` takes the values of ``resolve_device`` and defaults to "auto".
        ``num_threads`` calls ``torch.set_num_threads``, which applies to the whole process.
        ``base_cache`` keeps the base model in memory between loads (the model server's swaps).
        Raises RegistryError naming the path when the adapter directory is missing or corrupt,
        and ConfigError when the base model or tokenizer cannot be loaded.
        """
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        labels = validate_adapter_dir(adapter_dir)
        max_length = read_max_length(adapter_dir)
        torch_device, autocast_dtype = resolve_device(device or "auto")
        if num_threads is not None:
            if num_threads < 1:
                raise ConfigError(f"num_threads must be >= 1 or None, got {num_threads!r}")
            torch.set_num_threads(num_threads)

        try:
            if base_cache is not None:
                tokenizer, base = base_cache.load(base_model, labels)
            else:
                tokenizer, base = load_base_classifier(base_model, labels)
        except (OSError, ValueError) as error:
            raise ConfigError(f"base model {base_model!r} could not be loaded: {error}") from error

        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir))
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            # A head of another size raises RuntimeError (size mismatch) here.
            raise RegistryError(
                f"adapter in {adapter_dir} could not be loaded onto {base_model!r}: {error}"
            ) from error

        model.to(torch_device)
        model.eval()
        logger.info(
            "loaded adapter version %s from %s on %s (%d labels)",
            version, adapter_dir, torch_device, len(labels),
        )
        return cls(model, tokenizer, labels, version, max_length, torch_device, autocast_dtype)

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Return class probabilities, float32 of shape (len(texts), len(labels)).

        Texts are batched in order of character length to limit padding, and the rows come back
        in input order. Softmax runs in fp32 even when the forward pass uses bf16 or fp16.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"texts[{index}] must be a str, got {type(text).__name__}")

        probabilities = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return probabilities

        # Sorting by character length is a cheap stand-in for token length.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        for start in range(0, len(order), batch_size):
            batch_indices = order[start : start + batch_size]
            batch_texts = [texts[index] for index in batch_indices]
            probabilities[batch_indices] = self._predict_batch(batch_texts)
        return probabilities

    def _predict_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        encoded = {name: tensor.to(self.device) for name, tensor in encoded.items()}

        if self.device.type == "cuda" and self.autocast_dtype is not None:
            autocast = torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
        else:
            autocast = nullcontext()
        with torch.inference_mode(), autocast:
            logits = self.model(**encoded).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[tuple[str, float]]:
        """Return the top label and its probability for each text."""
        probabilities = self.predict_proba(texts, batch_size=batch_size)
        top_indices = probabilities.argmax(axis=1)
        return [
            (self.labels[label_index], float(probabilities[row, label_index]))
            for row, label_index in enumerate(top_indices)
        ]
