"""Build and load the reference profile of an adapter version.

The profile follows the active version: it is built from that version's own
training data (``train.jsonl``) and scored on its validation data
(``validation.jsonl``) with that version's classifier.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from monitor.config import Config, resolve_model_path
from monitor.embedding import Embedder
from monitor.reference import ReferenceProfile, build_reference
from retrain.registry import read_train_data

logger = logging.getLogger(__name__)


def read_validation(folder: Path) -> list[tuple[str, str]]:
    path = Path(folder) / "validation.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [(row["text"], row["label"]) for row in map(json.loads, handle)]


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

    train_texts = [text for text, _ in read_train_data(Path(adapter_dir))]
    validation = read_validation(Path(adapter_dir))
    val_texts = [text for text, _ in validation]
    probabilities = classifier.predict_proba(val_texts)
    profile = build_reference(
        train_texts, val_texts, probabilities, classifier.labels, classifier.tokenizer, embedder,
        max_length=config.model.max_length,
        embedding_sample=max(config.detectors.embedding.reference_sample * 2, 1000),
        seed=config.detectors.seed,
        meta={"version": version, "model": config.model.base, "embedding_model": config.embedding.model},
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
