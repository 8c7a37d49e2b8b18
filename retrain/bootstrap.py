"""Train the first adapter, register it as the active version and build its profile.

The trained adapter and its profile are cached under ``<state>/cache`` keyed by
a fingerprint of the model, data and training settings, so a rerun with the
same settings (the demo does this) skips training. A cached profile built with
other profile settings (embedding model, detector sample or seed) is rebuilt
from the cached adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from monitor.config import Config, resolve_model_path
from monitor.errors import RegistryError
from monitor.profiles import build_version_profile, stale_settings
from monitor.reference import ReferenceProfile
from monitor.store import Store
from retrain.datasets import Dataset, dataset_from_config
from retrain.registry import Registry, Version, write_examples, write_train_data
from retrain.trainer import progress_reporter

logger = logging.getLogger(__name__)


def fingerprint(config: Config, dataset: Dataset) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "model": config.model.model_dump(),
        "data": config.data.model_dump(),
        "bootstrap": config.bootstrap.model_dump(),
    }, sort_keys=True).encode())
    for text, label in dataset.train + dataset.validation:
        digest.update(f"{text}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def train_bootstrap_adapter(config: Config, dataset: Dataset, target: Path, progress=None) -> dict:
    from retrain.trainer import settings_from_config, train_adapter

    def write_data(folder: Path) -> None:
        write_train_data(folder, dataset.train)
        write_examples(folder / "validation.jsonl", dataset.validation)

    result = train_adapter(resolve_model_path(config.model.base), dataset.labels, dataset.train, target,
                           settings_from_config(config.bootstrap, config.model), validation=dataset.validation,
                           progress=progress, write_extras=write_data)
    return {"steps": result.steps, "wall_seconds": result.wall_seconds, "final_loss": result.final_loss,
            "device": result.device, "precision": result.precision}


# A heuristic: below this validation accuracy the first adapter is probably undertrained.
UNDERFIT_ACCURACY = 0.5


def describe_fit(profile: ReferenceProfile) -> str:
    """Summarise the validation fit of a profile, with a warning when it looks undertrained."""
    accuracy = profile.meta.get("validation_accuracy")
    confidence = float(profile.val_confidences.mean()) if len(profile.val_confidences) else float("nan")
    if accuracy is None:
        return f"mean validation confidence {confidence:.2f} (no validation labels)"
    summary = f"validation accuracy {accuracy:.3f}, mean confidence {confidence:.2f}"
    if accuracy < UNDERFIT_ACCURACY:
        summary += (f". WARNING: the adapter looks undertrained (accuracy below {UNDERFIT_ACCURACY}); drift "
                    "tests against it mean little. Raise bootstrap.epochs or bootstrap.learning_rate, "
                    "or check the labels, then run `driftloop bootstrap --force`")
    return summary


def bootstrap(config: Config, *, force: bool = False, progress=None, log=print) -> Version:
    """Make sure an active version exists; train it (or take it from the cache) when missing."""
    store = Store(config.db_url)
    registry = Registry(store, config.shared_path)
    active = registry.active()
    if active is not None and not force:
        log(f"bootstrap: version {active.name} is already active; pass --force to train a new first version")
        return active

    dataset = dataset_from_config(config)
    key = fingerprint(config, dataset)
    cached = config.cache_path / f"bootstrap-{key}"
    if (cached / "adapter" / "adapter_config.json").is_file() and (cached / "profile").is_dir():
        log(f"bootstrap: using cached adapter {cached}")
        changed = stale_settings(ReferenceProfile.load(cached / "profile"), config)
        if changed:
            log(f"bootstrap: rebuilding the cached reference profile, built with other settings ({'; '.join(changed)})")
            build_version_profile(config, cached / "adapter", "bootstrap", cached / "profile")
    else:
        log(f"bootstrap: training the first adapter on {len(dataset.train)} examples, "
            f"{len({label for _, label in dataset.train})} labels ({len(dataset.labels)} in the head)")
        started = time.time()
        work = cached.with_name(cached.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        summary = train_bootstrap_adapter(config, dataset, work / "adapter", progress=progress or progress_reporter(log, "bootstrap"))
        log(f"bootstrap: trained in {summary['wall_seconds']:.0f} s on {summary['device']}, "
            f"final loss {summary['final_loss']:.3f}; building the reference profile")
        build_version_profile(config, work / "adapter", "bootstrap", work / "profile")
        (work / "summary.json").write_text(json.dumps({**summary, "total_seconds": time.time() - started}))
        shutil.rmtree(cached, ignore_errors=True)
        work.rename(cached)

    staging = config.shared_path / "runs" / f"bootstrap-{key}-{int(time.time())}"
    shutil.copytree(cached / "adapter", staging)
    version = registry.register(staging, parent=active.name if active else None, run_id=None, actor="bootstrap")
    profile_target = registry.profile_dir(version.name)
    if profile_target.exists():
        raise RegistryError(f"profile folder {profile_target} already exists for new version {version.name}")
    shutil.copytree(cached / "profile", profile_target)
    registry.activate(version.name, actor="bootstrap", action="activate")
    log(f"bootstrap: version {version.name} is active; {describe_fit(ReferenceProfile.load(profile_target))}")
    store.close()
    return version
