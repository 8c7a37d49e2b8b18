"""One retraining run: assemble data, sweep ranks, train a LoRA candidate, canary it, await approval.

States, each written to the store before the work it names starts::

    queued -> training -> evaluating -> pending_approval | awaiting_data | approved -> promoting -> active

with ``rejected_by_gate``, ``rejected``, ``failed`` and ``cancelled`` as final
states. ``state_after_canary`` chooses the state after ``evaluating`` from the
canary's status and the approval policy. A run waiting in ``pending_approval``
or ``awaiting_data`` with an inconclusive canary goes back to ``evaluating``
when enough new labelled production events arrived. A cancel request moves a
queued, training or evaluating run to ``cancelling``; the worker stops before
its next step and writes ``cancelled``. A waiting or approved run is cancelled
at once. Every change
is a compare-and-set on the run's state, so a cancel and an approval, or two
approvals, cannot both win.

After a crash the daemon marks a run it finds queued, training, evaluating or
promoting as ``failed`` and a cancelling one as ``cancelled``, and removes
half-written output. The active adapter is untouched, because a candidate only
enters the registry at promotion, and the candidate folder appears by an
atomic rename once it is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from monitor.config import Config, resolve_model_path
from monitor.errors import DriftloopError, NotFoundError, TrainingError
from monitor.store import Store
from retrain.assembly import AssembledData, assemble_training_data, canary_holdout, in_holdout
from retrain.datasets import Dataset, Example
from retrain.registry import Registry, Version, read_train_data, write_examples, write_train_data

logger = logging.getLogger(__name__)

RUNNING_STATES = ("queued", "training", "evaluating", "cancelling")
# States of a trained candidate that waits: for a person, or for more labelled events.
WAITING_STATES = ("awaiting_data", "pending_approval")
# States a restart finds only when the process died inside them.
INTERRUPTED_STATES = ("queued", "training", "evaluating", "promoting", "cancelling")
CANCELLABLE_STATES = ("queued", "training", "evaluating", "awaiting_data", "pending_approval", "approved")
FINAL_STATES = ("active", "rejected_by_gate", "rejected", "failed", "cancelled", "superseded", "rolled_back")
# Fewer drifted-period texts than this and the profile falls back to the training data.
MIN_PROFILE_TEXTS = 100
# Seconds between the worker's reads of its run's state, to see a cancel request from another process.
CANCEL_POLL_S = 1.0
# A working run touches its updated_at this often, so a replica on another host can tell that
# its owner lives. A run silent for OWNER_SILENT_AFTER_S counts as dead there.
HEARTBEAT_S = 30.0
OWNER_SILENT_AFTER_S = 600.0
# psutil derives start times from clock ticks since boot, so two reads of one process agree to
# well within this many seconds.
START_TIME_TOLERANCE_S = 1.0


def training_threads() -> int:
    """Return the default torch thread count of a retrain: every core this process may use but one."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


class RunCancelled(DriftloopError):
    """The run's state moved to ``cancelling`` while the worker was between steps."""


class RetrainJob:
    """Run one retrain in the calling thread; the daemon runs it in a worker thread."""

    def __init__(self, *, run_id: str, config: Config, store: Store, registry: Registry, dataset: Dataset,
                 base: Version, since: float | None, drift_started_at: float | None = None,
                 on_progress: Callable[[dict], None] | None = None, embedder=None,
                 should_stop: Callable[[], bool] | None = None, stop_reason: str = "the daemon is stopping"):
        self.run_id = run_id
        self.config = config
        self.store = store
        self.registry = registry
        self.dataset = dataset
        self.base = base
        self.since = since
        self.drift_started_at = drift_started_at
        self.on_progress = on_progress
        # The sidecar's embedder, shared to build the candidate's profile; None loads one.
        self.embedder = embedder
        self.external_stop = should_stop
        self.stop_reason = stop_reason
        self.work_dir = config.shared_path / "runs" / run_id
        self._last_poll = 0.0
        self._last_heartbeat = time.monotonic()
        self._cancel_seen = False

    def set_state(self, state: str, from_states: tuple[str, ...], **values) -> None:
        """Move the run from one of ``from_states`` to ``state``; raise RunCancelled when a cancel came first."""
        detail = {key: value for key, value in values.items() if key == "error"}
        if not self.store.transition_run(self.run_id, from_states, state, actor="retrain", action=f"run_{state}",
                                         detail=detail, **values):
            current = (self.store.get_run(self.run_id) or {}).get("state")
            if current == "cancelling":
                raise RunCancelled(f"retrain run {self.run_id} was cancelled")
            raise DriftloopError(f"retrain run {self.run_id} is {current}, expected one of {list(from_states)}")
        logger.info("retrain run %s: state %s", self.run_id, state)

    def should_stop(self) -> bool:
        """True once the daemon stops or someone asked to cancel this run (read from the store each second)."""
        if self.external_stop is not None and self.external_stop():
            return True
        now = time.monotonic()
        if not self._cancel_seen and now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            self._cancel_seen = (self.store.get_run(self.run_id) or {}).get("state") == "cancelling"
        if now - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now
            self.store.touch_run(self.run_id)
        return self._cancel_seen

    def _check_cancel(self) -> None:
        """Raise RunCancelled between the canary's parts when a cancel was requested."""
        self._last_poll = 0.0
        if self.should_stop():
            raise RunCancelled(f"retrain run {self.run_id} was cancelled during evaluation")

    def _progress(self, phase: str) -> Callable[[dict], None] | None:
        if self.on_progress is None:
            return None
        return lambda progress: self.on_progress({"phase": phase, **progress})

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
        """Return the final state reached by this thread (``approved`` means promotion is next).

        Torch runs on ``retrain.training.num_threads`` threads for the whole run, canary included
        (default: every core but one), so the sidecar's ingest keeps a core.
        """
        return self._guarded(self._run)

    def _guarded(self, work: Callable[[], str]) -> str:
        """Run ``work`` with the retrain's thread cap; a cancel or any failure ends the run, never the caller."""
        import torch

        from retrain.trainer import TrainingCancelled

        threads = self.config.retrain.training.num_threads or training_threads()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return work()
        except (TrainingCancelled, RunCancelled) as exc:
            reason = self.stop_reason if self.external_stop is not None and self.external_stop() else str(exc)
            self.store.transition_run(self.run_id, RUNNING_STATES, "cancelled", actor="retrain", action="run_cancelled",
                                      detail={"reason": reason}, error=f"cancelled: {reason}")
            logger.info("retrain run %s: state cancelled (%s)", self.run_id, reason)
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return "cancelled"
        except Exception as exc:  # noqa: BLE001 - any failure ends the run, never the daemon
            logger.exception("retrain run %s failed", self.run_id)
            error = f"{type(exc).__name__}: {exc}"
            if not self.store.transition_run(self.run_id, RUNNING_STATES, "failed", actor="retrain",
                                             action="run_failed", detail={"error": error}, error=error):
                logger.error("retrain run %s: could not record the failure; the run is %s", self.run_id,
                             (self.store.get_run(self.run_id) or {}).get("state"))
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return "failed"
        finally:
            torch.set_num_threads(previous_threads)

    def _assemble(self) -> AssembledData:
        retrain = self.config.retrain
        production = self.store.labelled_events(since=self.since)
        if not production:
            raise TrainingError(f"no labelled production events since version {self.base.name} became active; "
                                "post labels to /v1/labels first")
        data = assemble_training_data(
            read_train_data(self.base.adapter_dir),
            production,
            replay_per_label=retrain.replay_per_label,
            holdout_fraction=retrain.holdout_fraction,
            seed=retrain.training.seed,
            max_per_label=retrain.max_per_label,
            validation_fraction=retrain.validation_fraction,
            judged_texts=[text for text, _ in self.dataset.test],
            labels=self.dataset.labels,
            min_class_examples=retrain.min_class_examples,
        )
        logger.info("retrain run %s: data %s", self.run_id, json.dumps(data.summary()))
        return data

    def _train(self, data: AssembledData, base_model: str) -> dict:
        """Sweep ranks (when on), train the candidate and write it with its data; return the run's training record."""
        from retrain.sweep import settings_for_rank, sweep_ranks
        from retrain.trainer import settings_from_config, train_adapter

        retrain = self.config.retrain
        settings = settings_from_config(retrain.training, self.config.model, num_threads=training_threads())
        deadline = time.monotonic() + settings.max_wall_time_s if settings.max_wall_time_s else None
        init_adapter = self.base.adapter_dir if retrain.warm_start else None
        sweep_table = None
        if retrain.sweep.enabled:
            sweep = sweep_ranks(base_model, self.dataset.labels, data.train, data.validation, settings,
                                retrain.sweep.ranks, budget_steps=retrain.sweep.budget_steps,
                                tie_tolerance=retrain.sweep.tie_tolerance, init_adapter=init_adapter,
                                progress=self._progress("sweep"), should_stop=self.should_stop, deadline=deadline,
                                run_name=f"retrain run {self.run_id} sweep")
            sweep_table = sweep.table()
            self.store.update_run(self.run_id, training={"data": data.summary(), "sweep": sweep_table})
            settings = settings_for_rank(settings, sweep.chosen.rank)
            if sweep.chosen.start != "warm":
                init_adapter = None

        reference, validation = self._profile_data(data)

        def write_data(folder: Path) -> None:
            write_train_data(folder, data.train)
            write_examples(folder / "reference.jsonl", reference)
            write_examples(folder / "validation.jsonl", validation)

        self.work_dir.mkdir(parents=True, exist_ok=True)
        result = train_adapter(
            base_model, self.dataset.labels, data.train, self.candidate_dir, settings,
            validation=data.validation, init_adapter=init_adapter,
            progress=self._progress("train"), should_stop=self.should_stop, deadline=deadline,
            lineage={"run_id": self.run_id, "base_version": self.base.name, "data": data.lineage(),
                     "assembly": {key: getattr(retrain, key) for key in
                                  ("replay_per_label", "max_per_label", "holdout_fraction", "validation_fraction",
                                   "min_class_examples", "warm_start")},
                     "sweep_settings": retrain.sweep.model_dump(), "sweep": sweep_table},
            write_extras=write_data,
        )
        return {
            "data": data.summary(),
            "sweep": sweep_table,
            "rank": result.record["settings"]["rank"],
            "warm_start": init_adapter is not None,
            "steps": result.steps,
            "epochs": result.record["epochs"],
            "epoch_losses": result.epoch_losses,
            "final_loss": result.final_loss,
            "stop_reason": result.stop_reason,
            "validation": result.validation,
            "findings": result.findings,
            "wall_seconds": round(result.wall_seconds, 2),
            "device": result.device,
            "precision": result.precision,
            "data_sha256": result.data_sha256,
        }

    def _run(self) -> str:
        self.set_state("training", ("queued",))
        started = time.time()
        data = self._assemble()
        base_model = resolve_model_path(self.config.model.base)
        training = self._train(data, base_model)
        training["total_seconds"] = round(time.time() - started, 2)
        training["production_since"] = self.since
        self.store.update_run(self.run_id, training=training, candidate_dir=str(self.candidate_dir))

        self.set_state("evaluating", ("training",))
        return self._evaluate(data.holdout, base_model)

    @property
    def candidate_dir(self) -> Path:
        return self.work_dir / "candidate"

    @property
    def profile_dir(self) -> Path:
        """Where the candidate's reference profile is built before approval; promotion moves it."""
        return self.work_dir / "profile"

    def _evaluate(self, holdout: list[Example], base_model: str) -> str:
        """Run the canary of the candidate against the base version, store it, and enter the decided state.

        A candidate that did not fail also gets its reference profile built here, so that
        promotion after approval only moves folders and swaps pointers.
        """
        from retrain.canary import (CanaryGates, ComparisonSettings, compare_on_slice, decide, measure_latency,
                                    shadow_compare)
        from retrain.model import Classifier

        device = None if self.config.model.device == "auto" else self.config.model.device
        current = Classifier.load(base_model, self.base.adapter_dir, self.base.name, device=device)
        candidate = Classifier.load(base_model, self.candidate_dir, f"candidate:{self.run_id}", device=device)
        canary_config = self.config.canary
        settings = ComparisonSettings.from_config(canary_config)
        production_slice = None
        holdout_texts: list[str] = []
        if holdout:
            texts, labels = zip(*holdout)
            holdout_texts = list(texts)
            production_slice = compare_on_slice("production_holdout", holdout_texts, list(labels), current, candidate,
                                                settings)
        self._check_cancel()
        test_texts, test_labels = zip(*self.dataset.test)
        test_slice = compare_on_slice("original_test", list(test_texts), list(test_labels), current, candidate,
                                      settings)
        self._check_cancel()
        shadow_texts = self.store.recent_texts(canary_config.shadow_sample)
        shadow = shadow_compare(shadow_texts, current, candidate) if shadow_texts else None
        self._check_cancel()
        # Live inputs first, because their lengths are what the server sees.
        latency = measure_latency(shadow_texts + holdout_texts, current, candidate, canary_config.latency_samples)
        decision = decide(production_slice, test_slice, shadow, CanaryGates.from_config(canary_config), latency)
        previous = (self.store.get_run(self.run_id) or {}).get("canary") or {}
        report = {**decision.to_dict(), "evaluated_at": time.time(),
                  "evaluations": int(previous.get("evaluations", 0)) + 1}
        self.store.update_run(self.run_id, canary=report)
        self.store.audit("canary", "canary_" + decision.status, run_id=self.run_id,
                         detail={"gates": decision.gates, "deciding_gate": decision.deciding_gate,
                                 "evaluation": report["evaluations"]})
        if decision.status != "failed" and not (self.profile_dir / "profile.json").is_file():
            self._check_cancel()
            from monitor.profiles import build_version_profile

            build_version_profile(self.config, self.candidate_dir, f"candidate:{self.run_id}", self.profile_dir,
                                  embedder=self.embedder, classifier=candidate)
        return self._enter_decided_state(decision.status)

    def recheck(self) -> str:
        """Evaluate a waiting candidate again on the canary holdout as it is now; return the new state.

        The holdout holds the labelled production events since the base version became active
        that fall in the holdout by id hash, minus any text the candidate trained on. A candidate
        whose base version is no longer active is ``superseded`` instead.
        """
        return self._guarded(self._recheck)

    def _recheck(self) -> str:
        active = self.registry.active()
        if active is None or active.name != self.base.name:
            self.set_state("superseded", WAITING_STATES)
            return "superseded"
        self.set_state("evaluating", WAITING_STATES)
        trained = [text for text, _ in read_train_data(self.candidate_dir)]
        holdout = canary_holdout(self.store.labelled_events(since=self.since),
                                 self.config.retrain.holdout_fraction, trained)
        logger.info("retrain run %s: evaluating the candidate again on %d held-out production events",
                    self.run_id, len(holdout))
        return self._evaluate(holdout, resolve_model_path(self.config.model.base))

    def _enter_decided_state(self, status: str) -> str:
        state = state_after_canary(self.config.approval, status)
        if state == "approved":
            if not self.store.transition_run(self.run_id, ("evaluating",), "approved", actor="policy:" + self.config.approval,
                                             action="run_approved",
                                             detail={"comment": f"approval: {self.config.approval}, canary passed"}):
                raise RunCancelled(f"retrain run {self.run_id} was cancelled")
            logger.info("retrain run %s: approved by policy %s", self.run_id, self.config.approval)
            return state
        self.set_state(state, ("evaluating",))
        return state


def state_after_canary(approval: str, status: str) -> str:
    """Return the state a run enters once its canary decided, under the approval policy.

    A failed canary ends the run as ``rejected_by_gate`` under every policy. A passed one is
    ``approved`` at once under ``auto`` and ``auto-if-gates-pass`` and waits in
    ``pending_approval`` under ``manual``. An inconclusive one is never a pass: under ``auto``
    it waits in ``awaiting_data`` for more labelled production events, and otherwise in
    ``pending_approval`` for a person (more events re-evaluate it there too).
    """
    if status == "failed":
        return "rejected_by_gate"
    if status == "passed":
        return "pending_approval" if approval == "manual" else "approved"
    if status == "inconclusive":
        return "awaiting_data" if approval == "auto" else "pending_approval"
    raise DriftloopError(f"unknown canary status {status!r}")


def _decide(store: Store, run_id: str, from_states: tuple[str, ...], state: str, *, actor: str, action: str,
            comment: str, verb: str) -> dict:
    """Move a run between states on a person's decision; the error names the run and its current state."""
    if store.get_run(run_id) is None:
        raise NotFoundError(f"retrain run {run_id!r} not found")
    if not store.transition_run(run_id, from_states, state, actor=actor, action=action, detail={"comment": comment}):
        current = (store.get_run(run_id) or {}).get("state")
        *first, last = from_states
        allowed = f"{', '.join(first)} or {last}" if first else last
        raise DriftloopError(f"retrain run {run_id} is {current}, only {allowed} runs can be {verb}")
    return store.get_run(run_id)


def approve_run(store: Store, run_id: str, *, actor: str, comment: str = "") -> dict:
    """Mark a run that waits for a person or for data approved; the leader's daemon promotes it within a second."""
    return _decide(store, run_id, ("pending_approval", "awaiting_data"), "approved", actor=actor,
                   action="run_approved", comment=comment, verb="approved")


def reject_run(store: Store, run_id: str, *, actor: str, comment: str = "") -> dict:
    return _decide(store, run_id, ("awaiting_data", "pending_approval", "approved"), "rejected", actor=actor,
                   action="run_rejected", comment=comment, verb="rejected")


def cancel_run(store: Store, run_id: str, *, actor: str, comment: str = "", state_dir: Path | None = None) -> dict:
    """Cancel a run.

    A running run moves to ``cancelling``, and its worker stops before its next step. A pending
    or approved run becomes ``cancelled`` at once, and its candidate folder is removed.
    Cancelling a run that is already cancelling changes nothing.
    """
    run = store.get_run(run_id)
    if run is None:
        raise NotFoundError(f"retrain run {run_id!r} not found")
    if run["state"] == "cancelling":
        return run
    if run["state"] not in CANCELLABLE_STATES:
        raise DriftloopError(f"retrain run {run_id} is {run['state']}; only {', '.join(CANCELLABLE_STATES)} runs "
                             "can be cancelled")
    if run["state"] in ("awaiting_data", "pending_approval", "approved"):
        run = _decide(store, run_id, ("awaiting_data", "pending_approval", "approved"), "cancelled", actor=actor,
                      action="run_cancelled", comment=comment, verb="cancelled")
        if state_dir is not None:
            shutil.rmtree(Path(state_dir) / "runs" / run_id, ignore_errors=True)
        return run
    return _decide(store, run_id, ("queued", "training", "evaluating"), "cancelling", actor=actor,
                   action="cancel_requested", comment=comment, verb="cancelled")


def process_started_at(pid: int) -> float | None:
    """Return when process ``pid`` of this host started, in Unix seconds, or None when it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def run_owner(process: str, pid: int | None = None) -> dict:
    """Describe the process that works on a run (this one by default), for the run's trigger record."""
    pid = os.getpid() if pid is None else pid
    return {"process": process, "pid": pid, "host": socket.gethostname(), "started_at": process_started_at(pid)}


def _owner_alive(owner: dict | None, updated_at: float | None = None) -> bool:
    """True when ``owner`` is a live process on this host, or one on another host that touched the run lately.

    A process on this host is checked by its pid and start time: a process that has the
    owner's pid but started at another time reuses the id of an owner that has ended, as a
    restarted container usually does. Records written before start times were kept are
    checked by pid alone. A process on another host, such as a `driftloop retrain` in a
    terminal beside a replica that is not the leader, cannot be checked. It counts as alive
    while the run's ``updated_at`` is less than OWNER_SILENT_AFTER_S old, because a working
    run touches it every HEARTBEAT_S.
    """
    if not owner or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("host") != socket.gethostname():
        return updated_at is not None and time.time() - updated_at < OWNER_SILENT_AFTER_S
    try:
        started_at = process_started_at(owner["pid"])
    except psutil.AccessDenied:
        return True
    if started_at is None:
        return False
    recorded = owner.get("started_at")
    if not isinstance(recorded, (int, float)):
        return True
    return abs(started_at - recorded) < START_TIME_TOLERANCE_S


def recover_interrupted_runs(store: Store, state_dir: Path) -> list[dict]:
    """Close the open runs whose process has died, and remove their half-written output.

    The daemon calls it when it starts, and before a new run starts. A run whose owner
    (``trigger.owner``: process, pid and host) still lives on this host is left alone,
    such as a `driftloop retrain` in a terminal. A cancelling run becomes ``cancelled``; any
    other interrupted run becomes ``failed`` with the state it died in. Returns the runs changed.
    """
    from retrain.trainer import clean_temporary_siblings

    changed = []
    for run in store.runs(states=INTERRUPTED_STATES, limit=1000):
        owner = (run["trigger"] or {}).get("owner")
        if _owner_alive(owner, run.get("updated_at")):
            continue
        state = "cancelled" if run["state"] == "cancelling" else "failed"
        if owner and owner.get("process") != "daemon":
            error = f"its process ({owner.get('process')}, pid {owner.get('pid')}) ended while the run was {run['state']}"
        else:
            error = f"daemon restarted while the run was {run['state']}"
        if store.transition_run(run["id"], (run["state"],), state, actor="daemon", action=f"run_{state}",
                                detail={"reason": error, "was": run["state"]}, error=error):
            logger.warning("retrain run %s: %s; marked %s", run["id"], error, state)
            changed.append(store.get_run(run["id"]))
            work_dir = Path(state_dir) / "runs" / run["id"]
            if run["state"] != "promoting":
                shutil.rmtree(work_dir, ignore_errors=True)
            elif work_dir.is_dir():
                clean_temporary_siblings(work_dir)
    return changed
