"""Reference profile of one adapter version: the training-time distributions that windows are tested against."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monitor.embedding import Embedder
from monitor.errors import ConfigError, DataError, InsufficientSamplesError, NotFittedError

MIN_REFERENCE_TEXTS = 20
PROFILE_FORMAT_VERSION = 1
PROFILE_JSON = "profile.json"
ARRAYS_NPZ = "arrays.npz"


def tokenize_counts(tokenizer, texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    """Tokenize ``texts`` without truncation.

    Returns
    -------
    counts : numpy.ndarray of int64
        Tokens per text as the classifier receives them before truncation, that is
        ``len(ids)`` plus ``tokenizer.num_special_tokens_to_add()``.
    ids : list of list of int
        Token ids of each text without special tokens.
    """
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{index}] must be a str, got {type(text).__name__}")
    if not texts:
        return np.zeros(0, dtype=np.int64), []

    # verbose=False silences the "sequence longer than model_max_length" warning,
    # because counting untruncated lengths is the purpose here.
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    ids = [list(map(int, row)) for row in encoded["input_ids"]]
    special = int(tokenizer.num_special_tokens_to_add(pair=False))
    counts = np.fromiter((len(row) + special for row in ids), dtype=np.int64, count=len(ids))
    return counts, ids


@dataclass(eq=False)
class ReferenceProfile:
    """Training-time distributions of one adapter version.

    Attributes
    ----------
    token_counts : numpy.ndarray of int64
        Tokens per training text, special tokens included, not truncated.
    max_length : int
        Tokenizer length limit. A text with more tokens is truncated.
    truncation_rate : float
        Share of training texts with more than ``max_length`` tokens.
    token_frequencies : numpy.ndarray of float64
        Relative frequency of each vocabulary id in the frequency part of the
        training texts, special tokens excluded. The vector sums to 1.
    unk_rate : float
        Share of unknown-token ids among all training tokens.
    unk_token_id : int or None
        Id of the tokenizer's unknown token.
    heldout_token_ids : list of list of int
        Token ids of the training texts left out of ``token_frequencies``. The
        vocabulary detector resamples them to calibrate its null distribution.
    embeddings : numpy.ndarray of float32, shape (m, d)
        Embeddings of a random sample of training texts.
    val_confidences : numpy.ndarray of float64
        Max-softmax probability of each validation text.
    val_predicted_labels : list of str
        Predicted label of each validation text.
    label_distribution : dict of str to float
        Share of each label among the validation predictions, with every label present.
    meta : dict
        JSON-serialisable provenance: version, created_at, n_train_texts, n_val,
        model, embedding_model and anything the caller added.
    val_gold_labels : list of str or None
        Gold label of each validation text, in the order of ``val_predicted_labels``.
        None for a profile built without them, including every profile saved
        before the field existed.
    pool_token_ids, pool_token_counts, pool_embeddings : optional
        Token ids, token counts and embeddings of the calibration pool: a seeded
        sample of at most ``embedding_sample`` validation texts, which none of the
        training-text statistics above saw. Detectors draw windows from it to
        calibrate their null distributions (see monitor.calibration). None in a
        profile saved before the pool existed.
    """

    token_counts: np.ndarray
    max_length: int
    truncation_rate: float
    token_frequencies: np.ndarray
    unk_rate: float
    unk_token_id: int | None
    heldout_token_ids: list[list[int]]
    embeddings: np.ndarray
    val_confidences: np.ndarray
    val_predicted_labels: list[str]
    label_distribution: dict[str, float]
    meta: dict = field(default_factory=dict)
    val_gold_labels: list[str] | None = None
    pool_token_ids: list[list[int]] | None = None
    pool_token_counts: np.ndarray | None = None
    pool_embeddings: np.ndarray | None = None

    @property
    def has_calibration_pool(self) -> bool:
        """True when the profile carries the calibration pool's tokens and embeddings."""
        return self.pool_token_ids is not None and self.pool_embeddings is not None

    @property
    def val_correct(self) -> np.ndarray | None:
        """Boolean array, True where the validation prediction equals the gold label; None without gold labels."""
        if self.val_gold_labels is None:
            return None
        return np.array(
            [predicted == gold for predicted, gold in zip(self.val_predicted_labels, self.val_gold_labels)],
            dtype=bool,
        )

    @property
    def vocab_size(self) -> int:
        """Length of ``token_frequencies``."""
        return int(self.token_frequencies.shape[0])

    @property
    def embedding_dimension(self) -> int:
        """Width of ``embeddings``."""
        return int(self.embeddings.shape[1])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``profile.json`` and ``arrays.npz`` into ``directory`` and return the directory.

        Each file is written to a temporary name first and then renamed, so a
        crash leaves either the old file or the new one.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        heldout_flat, heldout_lengths = _flatten(self.heldout_token_ids)
        arrays = {
            "token_counts": np.asarray(self.token_counts, dtype=np.int64),
            "token_frequencies": np.asarray(self.token_frequencies, dtype=np.float64),
            "embeddings": np.asarray(self.embeddings, dtype=np.float32),
            "val_confidences": np.asarray(self.val_confidences, dtype=np.float64),
            "heldout_flat": heldout_flat,
            "heldout_lengths": heldout_lengths,
        }
        if self.has_calibration_pool:
            arrays["pool_flat"], arrays["pool_lengths"] = _flatten(self.pool_token_ids)
            arrays["pool_token_counts"] = np.asarray(self.pool_token_counts, dtype=np.int64)
            arrays["pool_embeddings"] = np.asarray(self.pool_embeddings, dtype=np.float32)
        document = {
            "format_version": PROFILE_FORMAT_VERSION,
            "max_length": int(self.max_length),
            "truncation_rate": float(self.truncation_rate),
            "unk_rate": float(self.unk_rate),
            "unk_token_id": None if self.unk_token_id is None else int(self.unk_token_id),
            "val_predicted_labels": [str(label) for label in self.val_predicted_labels],
            "label_distribution": {str(k): float(v) for k, v in self.label_distribution.items()},
            "meta": self.meta,
            "val_gold_labels": (
                None if self.val_gold_labels is None else [str(label) for label in self.val_gold_labels]
            ),
        }
        try:
            text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise DataError(f"profile is not JSON-serialisable (check meta): {error}") from error

        arrays_tmp = directory / (ARRAYS_NPZ + ".tmp")
        with open(arrays_tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(arrays_tmp, directory / ARRAYS_NPZ)
        json_tmp = directory / (PROFILE_JSON + ".tmp")
        json_tmp.write_text(text, encoding="utf-8")
        os.replace(json_tmp, directory / PROFILE_JSON)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ReferenceProfile":
        """Read a profile written by :meth:`save`.

        Raises NotFittedError when either file is missing and DataError when a file
        is unreadable or its contents are inconsistent. Both messages name the path.
        """
        directory = Path(directory)
        json_path = directory / PROFILE_JSON
        arrays_path = directory / ARRAYS_NPZ
        for path in (json_path, arrays_path):
            if not path.is_file():
                raise NotFittedError(f"reference profile file not found: {path}; build the reference first")

        try:
            document = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"reference profile {json_path} is unreadable: {error}") from error
        if not isinstance(document, dict):
            raise DataError(f"reference profile {json_path} must contain a JSON object")
        if document.get("format_version") != PROFILE_FORMAT_VERSION:
            raise DataError(
                f"reference profile {json_path} has format_version {document.get('format_version')!r}, "
                f"expected {PROFILE_FORMAT_VERSION}"
            )

        try:
            with np.load(arrays_path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f"reference arrays {arrays_path} are unreadable: {error}") from error

        try:
            heldout = _unflatten(arrays["heldout_flat"], arrays["heldout_lengths"], arrays_path)
            # Profiles saved before the calibration pool existed have none of its arrays.
            has_pool = "pool_flat" in arrays
            profile = cls(
                token_counts=arrays["token_counts"].astype(np.int64),
                max_length=int(document["max_length"]),
                truncation_rate=float(document["truncation_rate"]),
                token_frequencies=arrays["token_frequencies"].astype(np.float64),
                unk_rate=float(document["unk_rate"]),
                unk_token_id=document["unk_token_id"],
                heldout_token_ids=heldout,
                embeddings=arrays["embeddings"].astype(np.float32),
                val_confidences=arrays["val_confidences"].astype(np.float64),
                val_predicted_labels=list(document["val_predicted_labels"]),
                label_distribution=dict(document["label_distribution"]),
                meta=dict(document["meta"]),
                # Profiles saved before this field existed have no such key.
                val_gold_labels=_optional_labels(document.get("val_gold_labels")),
                pool_token_ids=_unflatten(arrays["pool_flat"], arrays["pool_lengths"], arrays_path) if has_pool else None,
                pool_token_counts=arrays["pool_token_counts"].astype(np.int64) if has_pool else None,
                pool_embeddings=arrays["pool_embeddings"].astype(np.float32) if has_pool else None,
            )
        except KeyError as error:
            raise DataError(f"reference profile in {directory} is missing the field {error}") from error
        except (TypeError, ValueError) as error:
            raise DataError(f"reference profile in {directory} has an invalid field: {error}") from error

        if profile.embeddings.ndim != 2:
            raise DataError(f"reference arrays {arrays_path}: embeddings must be 2-D, got shape {profile.embeddings.shape}")
        if len(profile.val_predicted_labels) != profile.val_confidences.shape[0]:
            raise DataError(
                f"reference profile in {directory}: {len(profile.val_predicted_labels)} validation labels "
                f"but {profile.val_confidences.shape[0]} validation confidences"
            )
        if profile.val_gold_labels is not None and len(profile.val_gold_labels) != len(profile.val_predicted_labels):
            raise DataError(
                f"reference profile in {directory}: {len(profile.val_gold_labels)} validation gold labels "
                f"but {len(profile.val_predicted_labels)} validation predictions"
            )
        if profile.has_calibration_pool:
            sizes = {len(profile.pool_token_ids), profile.pool_token_counts.shape[0], profile.pool_embeddings.shape[0]}
            if len(sizes) != 1 or profile.pool_embeddings.ndim != 2:
                raise DataError(
                    f"reference arrays {arrays_path}: the calibration pool's token ids, token counts and "
                    f"embeddings differ in length or shape"
                )
        return profile


def _flatten(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Return (all ids in one array, length of each row) for saving ragged token ids."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((token for row in rows for token in row), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _unflatten(flat: np.ndarray, lengths: np.ndarray, path: Path) -> list[list[int]]:
    """Invert ``_flatten``; raise DataError naming ``path`` when the arrays disagree."""
    if int(lengths.sum()) != flat.shape[0]:
        raise DataError(f"reference arrays {path}: token id lengths do not match the token ids")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]


def _optional_labels(value) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise TypeError(f"val_gold_labels must be a list or null, got {type(value).__name__}")
    return [str(label) for label in value]


def build_reference(
    train_texts: list[str],
    val_texts: list[str],
    val_probabilities: np.ndarray,
    labels: list[str],
    tokenizer,
    embedder: Embedder,
    *,
    max_length: int,
    embedding_sample: int = 1000,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    meta: dict | None = None,
    val_gold_labels: list[str] | None = None,
) -> ReferenceProfile:
    """Build the reference profile of one adapter version from its training data.

    Parameters
    ----------
    train_texts : list of str
        Training texts. A seeded random ``heldout_fraction`` of them is kept out
        of ``token_frequencies`` to calibrate the vocabulary detector's null.
    val_texts : list of str
        Validation texts. A seeded sample of at most ``embedding_sample`` of them
        is tokenized and embedded as the calibration pool.
    val_probabilities : numpy.ndarray, shape (len(val_texts), len(labels))
        Classifier class probabilities on the validation texts.
    labels : list of str
        Label of each probability column.
    tokenizer
        The classifier's Hugging Face tokenizer.
    embedder : Embedder
        Encoder for the embedding sample.
    max_length : int
        Length limit at which the classifier truncates its input.
    embedding_sample : int
        Maximum number of training texts to embed, and of validation texts in the calibration pool.
    heldout_fraction : float
        Share of training texts held out, in (0, 1).
    seed : int
        Seed for the held-out split and the embedding sample.
    meta : dict, optional
        JSON-serialisable fields merged into the profile's ``meta``.
    val_gold_labels : list of str, optional
        Gold label of each validation text. It lets the profile record which
        validation predictions were correct, which the label-free accuracy
        estimate needs. Without it the profile's ``val_gold_labels`` is None.

    Raises
    ------
    InsufficientSamplesError
        Fewer than ``MIN_REFERENCE_TEXTS`` training or validation texts, or a split
        part that would be empty.
    ConfigError
        Invalid numeric argument or non-serialisable ``meta``.
    DataError
        ``val_probabilities`` does not match ``val_texts`` and ``labels``, or
        ``val_gold_labels`` does not have one entry per validation text.
    """
    train_texts = list(train_texts)
    val_texts = list(val_texts)
    labels = [str(label) for label in labels]
    _validate_build_arguments(max_length, embedding_sample, heldout_fraction)
    if len(train_texts) < MIN_REFERENCE_TEXTS or len(val_texts) < MIN_REFERENCE_TEXTS:
        raise InsufficientSamplesError(
            f"a reference needs at least {MIN_REFERENCE_TEXTS} training and {MIN_REFERENCE_TEXTS} "
            f"validation texts, got {len(train_texts)} training and {len(val_texts)} validation texts"
        )
    probabilities = _validate_probabilities(val_probabilities, len(val_texts), labels)
    if val_gold_labels is not None:
        val_gold_labels = [str(label) for label in val_gold_labels]
        if len(val_gold_labels) != len(val_texts):
            raise DataError(
                f"val_gold_labels must have one entry per validation text: got {len(val_gold_labels)} "
                f"gold labels for {len(val_texts)} validation texts"
            )

    rng = np.random.default_rng(seed)
    n_heldout = int(round(heldout_fraction * len(train_texts)))
    n_frequency = len(train_texts) - n_heldout
    if n_heldout < 1 or n_frequency < 1:
        raise InsufficientSamplesError(
            f"heldout_fraction={heldout_fraction} splits {len(train_texts)} training texts into "
            f"{n_frequency} frequency and {n_heldout} held-out texts; both parts need at least one"
        )

    token_counts, token_ids = tokenize_counts(tokenizer, train_texts)
    order = rng.permutation(len(train_texts))
    heldout_index = np.sort(order[:n_heldout])
    frequency_index = np.sort(order[n_heldout:])

    vocab_size = len(tokenizer)
    frequency_ids = _concatenate(token_ids[i] for i in frequency_index)
    all_ids = _concatenate(token_ids)
    if frequency_ids.size == 0:
        raise InsufficientSamplesError(
            f"the {n_frequency} frequency-part training texts contain no tokens; cannot estimate token frequencies"
        )
    frequency_counts = np.bincount(frequency_ids, minlength=vocab_size).astype(np.float64)
    token_frequencies = frequency_counts / frequency_counts.sum()

    unk_token_id = tokenizer.unk_token_id
    unk_rate = float(np.mean(all_ids == unk_token_id)) if unk_token_id is not None and all_ids.size else 0.0

    n_embed = min(embedding_sample, len(train_texts))
    embed_index = np.sort(rng.choice(len(train_texts), size=n_embed, replace=False))
    embeddings = embedder.encode([train_texts[i] for i in embed_index])

    pool_index = np.sort(rng.choice(len(val_texts), size=min(embedding_sample, len(val_texts)), replace=False))
    pool_texts = [val_texts[i] for i in pool_index]
    pool_token_counts, pool_token_ids = tokenize_counts(tokenizer, pool_texts)
    pool_embeddings = embedder.encode(pool_texts)

    confidences = probabilities.max(axis=1)
    predicted = [labels[i] for i in probabilities.argmax(axis=1)]
    label_distribution = {label: 0.0 for label in labels}
    for label in predicted:
        label_distribution[label] += 1.0 / len(predicted)

    profile_meta = {
        "version": None,
        "created_at": time.time(),
        "n_train_texts": len(train_texts),
        "n_frequency_texts": n_frequency,
        "n_heldout_texts": n_heldout,
        "n_val": len(val_texts),
        "n_embedded_texts": n_embed,
        "n_pool_texts": len(pool_texts),
        "model": getattr(tokenizer, "name_or_path", None),
        "embedding_model": getattr(embedder, "model_path", None),
        "seed": seed,
    }
    profile_meta.update(meta or {})
    try:
        json.dumps(profile_meta, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"meta must be JSON-serialisable: {error}") from error

    return ReferenceProfile(
        token_counts=token_counts,
        max_length=int(max_length),
        truncation_rate=float(np.mean(token_counts > max_length)),
        token_frequencies=token_frequencies,
        unk_rate=unk_rate,
        unk_token_id=None if unk_token_id is None else int(unk_token_id),
        heldout_token_ids=[token_ids[i] for i in heldout_index],
        embeddings=np.asarray(embeddings, dtype=np.float32),
        val_confidences=confidences.astype(np.float64),
        val_predicted_labels=predicted,
        label_distribution=label_distribution,
        meta=profile_meta,
        val_gold_labels=val_gold_labels,
        pool_token_ids=pool_token_ids,
        pool_token_counts=pool_token_counts,
        pool_embeddings=np.asarray(pool_embeddings, dtype=np.float32),
    )


def _validate_build_arguments(max_length: int, embedding_sample: int, heldout_fraction: float) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    if not isinstance(embedding_sample, int) or embedding_sample < 2:
        raise ConfigError(f"embedding_sample must be an integer >= 2, got {embedding_sample!r}")
    if not isinstance(heldout_fraction, (int, float)) or not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")


def _validate_probabilities(val_probabilities, n_val: int, labels: list[str]) -> np.ndarray:
    if not labels:
        raise DataError("labels must not be empty")
    probabilities = np.asarray(val_probabilities, dtype=np.float64)
    expected = (n_val, len(labels))
    if probabilities.shape != expected:
        raise DataError(
            f"val_probabilities must have shape (len(val_texts), len(labels)) = {expected}, got {probabilities.shape}"
        )
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0.0 or probabilities.max() > 1.0:
        raise DataError("val_probabilities must be finite and within [0, 1]")
    row_sums = probabilities.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if not math.isclose(row_sums[worst], 1.0, abs_tol=1e-3):
        raise DataError(f"val_probabilities rows must sum to 1; row {worst} sums to {row_sums[worst]:.6f}")
    return probabilities


def _concatenate(rows) -> np.ndarray:
    flat = [token for row in rows for token in row]
    return np.asarray(flat, dtype=np.int64)
