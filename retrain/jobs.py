"""One retraining run: assemble data, train a LoRA candidate, canary it, await approval.

States, each written to the store before the work it names starts:
``training -> evaluating -> pending_approval | approved -> promoting -> active``,
with ``rejected_by_gate``, ``rejected`` and ``failed`` as final states. A run
found in ``training``, ``evaluating`` or ``promoting`` after a restart is marked
``failed`` by the daemon, and the active adapter is untouched because a
candidate only enters the registry at promotion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from monitor.config import Config, resolve_model_path
from monitor.errors import DriftloopError, NotFoundError
from monitor.store import Store
from retrain.datasets import Dataset, Example, cap_per_label
from retrain.registry import Registry, Version, read_train_data, write_examples, write_train_data

logger = logging.getLogger(__name__)

ACTIVE_STATES = ("training", "evaluating", "promoting")
# Fewer drifted-period texts than this and the profile falls back to the training data.
MIN_PROFILE_TEXTS = 100
FINAL_STATES = ("active", "rejected_by_gate", "rejected", "failed", "superseded", "rolled_back")


def in_holdout(event_id: str, fraction: float) -> bool:
    """Assign an event to the canary holdout by a stable hash of its id."""
    bucket = int.from_bytes(hashlib.sha256(event_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < fraction


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class AssembledData:
    train: list[Example]
    holdout: list[Example]
    production_train: int
    replay: int
    duplicates_removed: int
    label_counts: dict[str, int]
    capped: int = 0

    def summary(self) -> dict:
        return {
            "train": len(self.train),
            "holdout": len(self.holdout),
            "production_train": self.production_train,
            "replay": self.replay,
            "duplicates_removed": self.duplicates_removed,
            "capped": self.capped,
            "labels_in_train": len(self.label_counts),
        }


def assemble_training_data(base_train: list[Example], production: list[tuple[str, str, str]], *,
                           replay_per_label: int, holdout_fraction: float, seed: int,
                           max_per_label: int | None = None) -> AssembledData:
    """Mix replayed original data with labelled production events.

    Production events are split into train and holdout by id hash. Texts that
    occur in the holdout (after normalising case and spaces) are removed from
    the training side, so nothing is both trained on and used to judge. No
    label keeps more than ``max_per_label`` examples, so a frequent catch-all
    class (such as out-of-scope) does not swallow the rare new intents.
    """
    holdout = [(text, label) for event_id, text, label in production if in_holdout(event_id, holdout_fraction)]
    production_train = [(text, label) for event_id, text, label in production if not in_holdout(event_id, holdout_fraction)]
    replay, _ = cap_per_label(base_train, replay_per_label, seed) if replay_per_label else ([], [])

    judged = {normalise(text) for text, _ in holdout}
    seen: set[str] = set()
    train: list[Example] = []
    removed = 0
    for text, label in production_train + replay:
        key = normalise(text)
        if key in judged or key in seen:
            removed += 1
            continue
        seen.add(key)
        train.append((text, label))
    train, capped = cap_per_label(train, max_per_label, seed)
    return AssembledData(
        train=train,
        holdout=holdout,
        production_train=len(production_train),
        replay=len(replay),
        duplicates_removed=removed,
        label_counts=dict(Counter(label for _, label in train)),
        capped=len(capped),
    )


class RetrainJob:
    """Run one retrain in the calling thread; the daemon runs it in a worker thread."""

    def __init__(self, *, run_id: str, config: Config, store: Store, registry: Registry, dataset: Dataset,
                 base: Version, since: float | None, drift_started_at: float | None = None,
                 on_progress: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.run_id = run_id
        self.config = config
        self.store = store
        self.registry = registry
        self.dataset = dataset
        self.base = base
        self.since = since
        self.drift_started_at = drift_started_at
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.work_dir = config.state_path / "runs" / run_id

    def set_state(self, state: str, **values) -> None:
        self.store.update_run(self.run_id, state=state, **values)
        self.store.audit("retrain", f"run_{state}", run_id=self.run_id, version=self.base.name,
                         detail={k: v for k, v in values.items() if k == "error"})
        logger.info("retrain run %s: state %s", self.run_id, state)

    def _profile_data(self, data: AssembledData) -> tuple[list[Example], list[Example]]:
        """Choose the texts the new version's reference profile describes.

        The profile should describe the traffic the new version will serve, so
        it is built from the production events of the drifted period when
        there are enough of them. Replayed original data guards against
        forgetting and is no picture of current traffic.
        """
        if self.drift_started_at is None:
            return data.train, self.dataset.validation + data.holdout
        drifted = self.store.labelled_events(since=self.drift_started_at)
        drifted_train = [(text, label) for event_id, text, label in drifted
                         if not in_holdout(event_id, self.config.retrain.holdout_fraction)]
        drifted_holdout = [(text, label) for event_id, text, label in drifted
                           if in_holdout(event_id, self.config.retrain.holdout_fraction)]
        reference = drifted_train if len(drifted_train) >= MIN_PROFILE_TEXTS else data.train
        validation = drifted_holdout if len(drifted_holdout) >= MIN_PROFILE_TEXTS // 2 else self.dataset.validation + data.holdout
        logger.info("retrain run %s: reference profile from %d texts, confidence reference from %d texts",
                    self.run_id, len(reference), len(validation))
        return reference, validation

    def run(self) -> str:
        """Return the final state reached by this thread (``approved`` means promotion is next)."""
        try:
            return self._run()
        except Exception as exc:  # noqa: BLE001 - any failure ends the run, never the daemon
            logger.exception("retrain run %s failed", self.run_id)
            self.set_state("failed", error=f"{type(exc).__name__}: {exc}")
            shutil.rmtree(self.work_dir / "candidate", ignore_errors=True)
            return "failed"

    def _run(self) -> str:
        from retrain.canary import CanaryGates, compare_on_slice, decide, shadow_compare
        from retrain.model import Classifier
        from retrain.trainer import TrainSettings, train_adapter

        self.set_state("training")
        base_train = read_train_data(self.base.adapter_dir)
        production = self.store.labelled_events(since=self.since)
        retrain = self.config.retrain
        data = assemble_training_data(
            base_train, production,
            replay_per_label=retrain.replay_per_label,
            holdout_fraction=retrain.holdout_fraction,
            seed=retrain.training.seed,
            max_per_label=retrain.max_per_label,
        )
        logger.info("retrain run %s: data %s", self.run_id, json.dumps(data.summary()))

        settings = TrainSettings(
            **{**retrain.training.model_dump(), "target_modules": tuple(retrain.training.target_modules)},
            max_length=self.config.model.max_length,
            device=self.config.model.device,
        )
        base_model = resolve_model_path(self.config.model.base)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        candidate_dir = self.work_dir / "candidate"
        started = time.time()
        result = train_adapter(
            base_model, self.dataset.labels, data.train, candidate_dir, settings,
            init_adapter=self.base.adapter_dir if retrain.warm_start else None,
            progress=self.on_progress, should_stop=self.should_stop,
        )
        write_train_data(candidate_dir, data.train)
        reference, validation = self._profile_data(data)
        write_examples(candidate_dir / "reference.jsonl", reference)
        write_examples(candidate_dir / "validation.jsonl", validation)
        training = {
            "data": data.summary(),
            "steps": result.steps,
            "epoch_losses": result.epoch_losses,
            "final_loss": result.final_loss,
            "wall_seconds": round(time.time() - started, 2),
            "device": result.device,
            "precision": result.precision,
            "data_sha256": result.data_sha256,
        }
        self.store.update_run(self.run_id, training=training, candidate_dir=str(candidate_dir))

        self.set_state("evaluating")
        device = None if self.config.model.device == "auto" else self.config.model.device
        current = Classifier.load(base_model, self.base.adapter_dir, self.base.name, device=device)
        candidate = Classifier.load(base_model, candidate_dir, f"candidate:{self.run_id}", device=device)
        production_slice = None
        if data.holdout:
            texts, labels = zip(*data.holdout)
            production_slice = compare_on_slice("production_holdout", list(texts), list(labels), current, candidate)
        test_texts, test_labels = zip(*self.dataset.test)
        test_slice = compare_on_slice("original_test", list(test_texts), list(test_labels), current, candidate)
        shadow_texts = self.store.recent_texts(self.config.canary.shadow_sample)
        shadow = shadow_compare(shadow_texts, current, candidate) if shadow_texts else None
        gates = CanaryGates(
            min_production_samples=self.config.canary.min_production_samples,
            min_production_gain=self.config.canary.min_production_gain,
            max_test_regression=self.config.canary.max_test_regression,
        )
        decision = decide(production_slice, test_slice, shadow, gates)
        self.store.update_run(self.run_id, canary=decision.to_dict())
        self.store.audit("canary", "canary_" + decision.status, run_id=self.run_id,
                         detail={"gates": decision.gates})

        if not decision.passed:
            # An inconclusive canary waits for a person; a failed gate ends the run.
            if decision.status == "inconclusive":
                self.set_state("pending_approval")
                return "pending_approval"
            self.set_state("rejected_by_gate")
            return "rejected_by_gate"
        if self.config.approval == "auto":
            self.store.update_run(self.run_id, state="approved")
            self.store.audit("policy:auto", "run_approved", run_id=self.run_id, detail={"comment": "approval: auto"})
            logger.info("retrain run %s: approved by policy", self.run_id)
            return "approved"
        self.set_state("pending_approval")
        return "pending_approval"


def approve_run(store: Store, run_id: str, *, actor: str, comment: str = "") -> dict:
    """Mark a pending run approved; the daemon promotes it on its next check."""
    run = store.get_run(run_id)
    if run is None:
        raise NotFoundError(f"retrain run {run_id!r} not found")
    if run["state"] != "pending_approval":
        raise DriftloopError(f"retrain run {run_id} is {run['state']}, only pending_approval runs can be approved")
    store.update_run(run_id, state="approved")
    store.audit(actor, "run_approved", run_id=run_id, detail={"comment": comment})
    return store.get_run(run_id)


def reject_run(store: Store, run_id: str, *, actor: str, comment: str = "") -> dict:
    run = store.get_run(run_id)
    if run is None:
        raise NotFoundError(f"retrain run {run_id!r} not found")
    if run["state"] not in ("pending_approval", "approved"):
        raise DriftloopError(f"retrain run {run_id} is {run['state']}, only pending or approved runs can be rejected")
    store.update_run(run_id, state="rejected")
    store.audit(actor, "run_rejected", run_id=run_id, detail={"comment": comment})
    return store.get_run(run_id)
