"""Build and load the reference profile of an adapter version.

The profile follows the active version. It describes the texts in the
version folder's ``reference.jsonl``, the traffic the version was trained for,
or ``train.jsonl`` when that file is absent. Its confidence part comes from
that version's classifier on ``validation.jsonl``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from monitor.config import Config, resolve_model_path
from monitor.embedding import Embedder
from monitor.reference import ReferenceProfile, build_reference
from retrain.registry import read_examples

logger = logging.getLogger(__name__)


def profile_settings(config: Config) -> dict:
    """Return the config values that a reference profile is built with, keyed by their config keys."""
    return {
        "embedding.model": config.embedding.model,
        "model.max_length": config.model.max_length,
        "detectors.embedding.reference_sample": config.detectors.embedding.reference_sample,
        "detectors.seed": config.detectors.seed,
    }


def stale_settings(profile: ReferenceProfile, config: Config) -> list[str]:
    """List the settings that differ between the profile and the config, as ``key: built with A, config has B``.

    A profile saved before its settings were recorded is checked on the three that every
    profile contains: the embedding model and seed in its metadata, and its max_length.
    """
    built = profile.meta.get("settings") or {"embedding.model": profile.meta.get("embedding_model"),
                                             "model.max_length": profile.max_length,
                                             "detectors.seed": profile.meta.get("seed")}
    expected = profile_settings(config)
    return [f"{key}: built with {built[key]!r}, config has {expected[key]!r}"
            for key in expected if key in built and built[key] != expected[key]]


def build_version_profile(config: Config, adapter_dir: Path, version: str, target: Path,
                          embedder: Embedder | None = None, classifier=None) -> ReferenceProfile:
    """Build the reference profile of one version and save it to ``target``."""
    from retrain.model import Classifier

    started = time.time()
    base_model = resolve_model_path(config.model.base)
    device = None if config.model.device == "auto" else config.model.device
    if classifier is None:
        classifier = Classifier.load(base_model, adapter_dir, version, device=device)
    if embedder is None:
        embedder = Embedder(resolve_model_path(config.embedding.model), batch_size=config.embedding.batch_size)

    folder = Path(adapter_dir)
    reference_file = folder / "reference.jsonl"
    if not reference_file.is_file():
        reference_file = folder / "train.jsonl"
    train_texts = [text for text, _ in read_examples(reference_file)]
    validation = read_examples(folder / "validation.jsonl")
    val_texts = [text for text, _ in validation]
    probabilities = classifier.predict_proba(val_texts)
    predicted = [classifier.labels[index] for index in probabilities.argmax(axis=1)] if len(val_texts) else []
    correct = sum(label == gold for label, (_, gold) in zip(predicted, validation))
    validation_accuracy = correct / len(validation) if validation else None
    settings = profile_settings(config)
    profile = build_reference(
        train_texts, val_texts, probabilities, classifier.labels, classifier.tokenizer, embedder,
        max_length=settings["model.max_length"],
        embedding_sample=max(settings["detectors.embedding.reference_sample"] * 2, 1000),
        seed=settings["detectors.seed"],
        meta={"version": version, "model": config.model.base, "embedding_model": settings["embedding.model"],
              "validation_accuracy": validation_accuracy, "settings": settings},
        val_gold_labels=[str(gold) for _, gold in validation],
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    profile.save(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    logger.info("built reference profile for version %s in %.1f s (%d train texts, %d validation texts)",
                version, time.time() - started, len(train_texts), len(val_texts))
    return profile
