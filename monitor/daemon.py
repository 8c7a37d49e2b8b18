"""The monitor sidecar: ingest, windows, scheduled drift checks, retrain trigger, promotion.

Threads: the HTTP server's (ingest only appends to the store and to the window
being filled), the APScheduler job that evaluates closed windows and promotes
approved runs, and at most one retraining worker.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from types import SimpleNamespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DBAPIError

from monitor.auth import bearer_header, load_token
from monitor.config import Config, resolve_model_path
from monitor.detectors.base import to_json_value
from monitor.errors import DriftloopError, RegistryError
from monitor.ingest import (EVENT_FIELDS, LABEL_FIELDS, BatchResult, ItemError, LabelResult, validate_events,
                            validate_labels)
from monitor.metrics import CANARY_STATUSES, RUN_STATES, MonitorMetrics
from monitor import promotion_watch
from monitor.policy import TriggerPolicy
from monitor.retention import Retention
from monitor.resources import (
    MemoryWatch,
    ResourceMetrics,
    TokenBucket,
    apply_thread_limits,
    embedding_cap,
    limit_sample,
)
from monitor.sampling import Observation, WindowSampler
from monitor.event_buffer import EventBuffer
from monitor.leader import Leadership
from monitor.store import DatabaseUnavailableError, is_connection_error, open_store
from retrain.assembly import in_holdout
from retrain.jobs import RUNNING_STATES, WAITING_STATES, RetrainJob, cancel_run, recover_interrupted_runs, run_owner
from retrain.notify import Notifier
from retrain.registry import Registry
from retrain.trainer import progress_reporter

logger = logging.getLogger(__name__)


@dataclass
class OpenWindow:
    id: str
    sampler: WindowSampler
    version: str | None


def lock_state_dir(state_path: Path) -> TextIO:
    """Take an exclusive lock on the state directory, so one monitor daemon owns its runs.

    The lock is held while the returned file stays open. The operating system drops it when
    the process ends, so a crashed daemon leaves no stale lock.
    """
    state_path.mkdir(parents=True, exist_ok=True)
    path = state_path / "monitor.lock"
    handle = open(path, "a+")  # noqa: SIM115 - the open file is the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise DriftloopError(
            f"another monitor daemon (pid {owner}) uses the state directory {state_path}; "
            "stop it first, or give this daemon its own state_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


# resources.evaluation_max_share is averaged over this many seconds: the time budget's burst.
EVALUATION_BUDGET_SPAN_S = 60.0
# Seconds between polls for runs approved outside this process (the CLI, a follower replica).
APPROVAL_POLL_S = 1.0
# Distinct unread field names logged per process; later ones are still reported in responses.
MAX_LOGGED_IGNORED_FIELDS = 100
# Signals that quote the window texts most unlike the reference, in the order they are quoted.
TYPICAL_EXAMPLE_SIGNALS = ("novelty", "domain_classifier")


def explain_drift(report) -> dict[str, Any]:
    """Summarise why a window drifted: each drifted signal's evidence, new tokens and typical texts."""
    evidence = {}
    for result in report.results:
        if result.drifted:
            evidence[result.signal] = {"statistic": result.statistic, "p_value": result.p_value,
                                       "threshold": result.threshold}
    details = {result.signal: result.details for result in report.results}
    explanation: dict[str, Any] = {"evidence": to_json_value(evidence)}
    tokens = details.get("vocabulary", {}).get("new_frequent_tokens")
    if tokens:
        explanation["new_frequent_tokens"] = tokens
    examples = []
    for signal in TYPICAL_EXAMPLE_SIGNALS:
        for example in details.get(signal, {}).get("typical_examples") or []:
            if example.get("text") and example["text"] not in examples:
                examples.append(example["text"])
    if examples:
        explanation["typical_examples"] = examples
    return explanation


class CountedWarning:
    """A warning that may repeat many times a second, logged at most once per ``interval_s`` with its count."""

    def __init__(self, interval_s: float = 60.0, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.count = 0
        self.since = clock()
        self.logged_at: float | None = None

    def add(self, message: str, *args) -> bool:
        """Count one occurrence; log ``message % (count, seconds, *args)`` when due and return whether it logged."""
        now = self.clock()
        if self.count == 0:
            self.since = now
        self.count += 1
        if self.logged_at is not None and now - self.logged_at < self.interval_s:
            return False
        logger.warning(message, self.count, now - self.since, *args)
        self.count, self.since, self.logged_at = 0, now, now
        return True


def new_run_id() -> str:
    return "r" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + uuid.uuid4().hex[:4]


def new_window_id() -> str:
    return time.strftime("w%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class MonitorDaemon:
    def __init__(self, config: Config, registry: CollectorRegistry | None = None):
        self.config = config
        database = config.database
        self.store = open_store(config.db_url, attempts=database.connect_attempts,
                                initial_delay_s=database.connect_backoff_initial_s,
                                max_delay_s=database.connect_backoff_max_s)
        self.registry = Registry(self.store, config.shared_path)
        self.metrics = MonitorMetrics(registry)
        self.metrics.record_config(config)
        self.notifier = Notifier(config.notify, self.store, self.metrics)
        self.leadership = Leadership(self.store, self.metrics.registry)
        self.leading = False
        self.event_buffer = EventBuffer(config.database.buffer_events, self.metrics.registry)
        self.retention = Retention(config.database, self.store, self.metrics.retention_deleted)
        # Windows of every replica that the leader has made its decisions on: id -> evaluation time.
        self.decided_windows: dict[str, float] = {}
        self.ready = False
        self.startup_error: str | None = None
        self.lock = threading.RLock()
        # Reentrant, because a promotion pass keeps it across its list of approved runs and each promotion.
        self.promotion_lock = threading.RLock()

        self.labels: list[str] = []
        self.active_name: str | None = None
        self.active_since: float | None = None
        self.evaluator = None
        self.embedder = None
        self.tokenizer = None
        self.dataset = None
        self.window = self._open_window(None)
        self.pending: deque[OpenWindow] = deque()
        self.metrics.windows_pending.set_function(lambda: len(self.pending))
        self.policy = TriggerPolicy(config.trigger.consecutive_windows, config.trigger.min_labels,
                                    config.trigger.cooldown_s, clear_windows=config.trigger.clear_windows)
        self.job_thread: threading.Thread | None = None
        self.cancel_requested = threading.Event()
        self.labels_alert_streak: int | None = None
        # Signals of the last drifted window, recorded with a retrain that a later check starts.
        self.last_drifted_signals: list[str] = []
        # Audit id of the last rollback counted in the metrics; older ones happened before this process.
        self.rollbacks_seen = self.store.last_audit_id()
        self.scheduler = BackgroundScheduler(daemon=True)
        # Set by monitor.shutdown on SIGTERM: ingest answers 503 and no retrain starts.
        self.draining = False
        self.startup_phase = "waiting to start"
        # Held by each tick, so the shutdown drain evaluates windows only after a running tick ends.
        self.tick_lock = threading.Lock()
        self.resource_metrics = ResourceMetrics(self.metrics.registry)
        self.memory = MemoryWatch(config.resources.memory_soft_limit_mb, self.resource_metrics)
        rate = config.resources.embedding_max_texts_per_s
        self.embedding_budget = (TokenBucket(rate, burst=config.monitor.sample_size,
                                             initial=config.detectors.min_samples) if rate else None)
        share = config.resources.evaluation_max_share
        self.evaluation_budget = (TokenBucket(share, burst=share * EVALUATION_BUDGET_SPAN_S) if share else None)
        # Windows skipped or dropped since their last log line: under heavy traffic these happen
        # several times a second, so they are logged as a count once a minute.
        self.unevaluated = {name: CountedWarning() for name in ("skipped", "skipped_time", "dropped", "stale")}
        # Unread field names already logged, so each is logged once.
        self.logged_ignored_fields: set[tuple[str, str]] = set()

    # Lifecycle

    def start(self, background: bool = True, on_failure: Callable[[], None] | None = None) -> None:
        """Load models and the reference, then start the schedule; ``on_failure`` runs if that fails."""
        if background:
            threading.Thread(target=self._load, args=(on_failure,), name="driftloop-startup", daemon=True).start()
        else:
            self._load(on_failure)

    def _load(self, on_failure: Callable[[], None] | None = None) -> None:
        try:
            logger.info("thread limits: %s", apply_thread_limits(self.config.resources))
            self.startup_phase = "closing runs interrupted by an earlier process"
            self._refresh_leadership()
            from transformers import AutoTokenizer

            from monitor.embedding import Embedder
            from retrain.datasets import dataset_from_config

            self.startup_phase = "loading the data set"
            self.dataset = dataset_from_config(self.config)
            self.startup_phase = "loading the tokenizer and the embedding model"
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.config.model.base))
            self.embedder = Embedder(resolve_model_path(self.config.embedding.model), batch_size=self.config.embedding.batch_size)
            active = self.registry.active()
            if active is None:
                raise RegistryError("no active adapter version; run `driftloop bootstrap` first")
            self.startup_phase = f"loading the reference profile of version {active.name}"
            self._activate_reference(active.name)
            self.startup_phase = "taking back the windows the last shutdown left"
            self._restore_windows()
            self.scheduler.add_job(self.tick, "interval", seconds=self.config.monitor.check_interval_s,
                                   max_instances=1, coalesce=True, id="driftloop-check")
            # An approval recorded elsewhere (the CLI, a follower replica) is promoted within a
            # second, without waiting behind a check that may spend seconds on a window.
            self.scheduler.add_job(self.promote_approved_runs, "interval", seconds=APPROVAL_POLL_S,
                                   max_instances=1, coalesce=True, id="driftloop-promote")
            # A tick that outlasts the interval (a window evaluation can) makes APScheduler warn about
            # each skipped run. Skipping is intended, because the next tick picks up every closed window.
            logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
            self.notifier.start()
            self.scheduler.start()
            self.memory.check()
            self.startup_phase = "ready"
            self.ready = True
            logger.info("monitor ready: active version %s, %d labels", self.active_name, len(self.labels))
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log
            self.startup_error = f"{type(exc).__name__}: {exc}"
            logger.exception("monitor startup failed")
            if on_failure is not None:
                on_failure()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the schedule, cancel a running retrain and wait up to ``timeout_s`` for its worker."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.cancel_requested.set()
        if self.job_thread is not None:
            self.job_thread.join(timeout=max(timeout_s, 0.0))
        self.notifier.stop()
        self.leadership.release()
        if len(self.event_buffer):
            logger.error("stopping with %d events not written: the database was unreachable", len(self.event_buffer))
        self.store.close()
        logger.info("monitor daemon stopped")

    def _recover_runs(self) -> None:
        for run in recover_interrupted_runs(self.store, self.config.shared_path):
            self.metrics.retrain_runs.labels(run["state"]).inc()

    def _activate_reference(self, name: str) -> None:
        """Load (or build) the reference profile of ``name`` and point the detectors at it."""
        from monitor.evaluation import WindowEvaluator, evaluator_options
        from monitor.profiles import build_version_profile, stale_settings
        from monitor.reference import ReferenceProfile

        version = self.registry.get(name)
        profile_dir = self.registry.profile_dir(name)
        profile = ReferenceProfile.load(profile_dir) if (profile_dir / "profile.json").is_file() else None
        if profile is not None and not profile.has_calibration_pool:
            logger.info("reference profile of version %s has no calibration pool; rebuilding it", name)
            profile = None
        elif profile is not None and (changed := stale_settings(profile, self.config)):
            # Embeddings of another model, or token counts at another max_length, do not compare with the windows.
            logger.warning("reference profile of version %s was built with other settings (%s); rebuilding it",
                           name, "; ".join(changed))
            profile = None
        if profile is None:
            profile = build_version_profile(self.config, version.adapter_dir, name, profile_dir, embedder=self.embedder)
        evaluator = WindowEvaluator(profile, self.tokenizer, self.embedder, **evaluator_options(self.config))
        labels = json.loads((version.adapter_dir / "labels.json").read_text())
        with self.lock:
            self.evaluator = evaluator
            self.labels = labels
            self.active_name = name
            # Labels count from the activation itself, so a restarted daemon keeps those already received.
            self.active_since = self.registry.activated_at() or time.time()
            # Windows are compared with one reference: start a fresh one.
            self.window = self._open_window(name)
        self.metrics.active_version.info({"version": name})
        watch = self.store.watch(name)
        self.metrics.post_promotion_watching.set(1 if watch and watch["status"] == promotion_watch.WATCHING else 0)
        self.metrics.record_reference(float(profile.val_confidences.mean()) if len(profile.val_confidences) else None,
                                      evaluator.accuracy_estimator.validation_accuracy_)

    def _restore_windows(self) -> None:
        """Take back the windows that the last shutdown on this host left unevaluated.

        Their events are in the store with their window id. Closed windows wait for the next
        check; the window that was open goes on filling under its id. Windows of a version that
        is no longer active are left alone, because their reference is gone. The outcome is
        audited, so a second restart does not take them again.
        """
        host = socket.gethostname()
        entry = self.store.last_audit_entry(("windows_not_evaluated", "windows_restored"),
                                            detail_key="host", detail_value=host)
        if entry is None or entry["action"] != "windows_not_evaluated":
            return
        restored: list[dict[str, Any]] = []
        skipped = None
        if entry["version"] != self.active_name:
            skipped = f"they belong to version {entry['version']}, and version {self.active_name} is active"
        else:
            for item in entry["detail"].get("windows", []):
                window = self._open_window(self.active_name, window_id=item["id"])
                for row in self.store.events_of_window(item["id"]):
                    window.sampler.add(Observation(event_id=row["id"], text=row["text"],
                                                   predicted_label=row["predicted_label"],
                                                   confidence=row["confidence"], latency_ms=row["latency_ms"],
                                                   version=row["version"], received_at=row["received_at"]))
                if not window.sampler.count:
                    continue
                closed = item.get("closed", True) or window.sampler.count >= self.config.monitor.window_size
                with self.lock:
                    if closed:
                        self.pending.append(window)
                    else:
                        self.window = window
                restored.append({"id": window.id, "events": window.sampler.count, "closed": closed})
        self.store.audit("daemon", "windows_restored", version=self.active_name,
                         detail={"host": host, "from_audit_id": entry["id"], "windows": restored,
                                 **({"skipped": skipped} if skipped else {})})
        if skipped:
            logger.warning("windows left by the last shutdown are not taken back: %s", skipped)
        else:
            logger.info("took back %d windows left by the last shutdown: %s", len(restored),
                        ", ".join(f"{item['id']} ({item['events']} events, {'closed' if item['closed'] else 'open'})"
                                  for item in restored))

    def _open_window(self, version: str | None, window_id: str | None = None) -> OpenWindow:
        sampler = WindowSampler(self.config.monitor.sample_size, seed=self.config.detectors.seed)
        return OpenWindow(window_id or new_window_id(), sampler, version)

    # Ingest

    def ingest_events(self, body: Any) -> BatchResult:
        with self.lock:
            labels = list(self.labels)
        result = validate_events(body, labels, max_items=self.config.monitor.max_batch,
                                 max_text_chars=self.config.monitor.max_text_chars)
        self._log_ignored_fields("events", result.ignored_fields, EVENT_FIELDS)
        if result.errors:
            self.metrics.events_rejected.inc(len(result.errors))
        if not result.valid:
            return result
        with self.lock:
            # Ingest is serialised by the lock, so windows fill in the order batches are stored.
            rows = [row for row in result.valid if not self.event_buffer.contains(row["id"])]
            for row in rows:
                row["window_id"] = self.window.id
            inserted, duplicates, labelled = self._store_events(rows)
            self.metrics.window_events.set(self.window.sampler.count)
        self.metrics.events_received.inc(inserted)
        if inserted:
            self.metrics.last_event_received.set_to_current_time()
        if labelled:
            self.metrics.labels_pending.dec(labelled)
        # Events already held in the buffer count as duplicates too; usually there are none.
        buffered_ids = []
        if len(rows) < len(result.valid):
            new_ids = {row["id"] for row in rows}
            buffered_ids = [row["id"] for row in result.valid if row["id"] not in new_ids]
        result.duplicates = sorted([*buffered_ids, *duplicates])
        if result.duplicates:
            self.metrics.events_duplicate.inc(len(result.duplicates))
        return result

    def _place(self, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
        """Add new events to the open window in order; a window closes at exactly window_size events.

        Sets each row's ``window_id`` and returns ``{window_id: ids}`` for the rows that moved to a
        window opened during this batch.
        """
        moved: dict[str, list[str]] = {}
        for row in rows:
            if row["window_id"] != self.window.id:
                row["window_id"] = self.window.id
                moved.setdefault(self.window.id, []).append(row["id"])
            self.window.sampler.add(Observation(
                event_id=row["id"], text=row["text"], predicted_label=row["predicted_label"],
                confidence=row["confidence"], latency_ms=row["latency_ms"], version=row["version"],
                received_at=row["received_at"],
            ))
            if self.window.sampler.count >= self.config.monitor.window_size:
                self._close_window()
        return moved

    def _close_window(self) -> None:
        self.pending.append(self.window)
        if len(self.pending) > self.config.monitor.max_pending_windows:
            dropped = self.pending.popleft()
            self.metrics.windows_dropped.inc()
            self.unevaluated["dropped"].add(
                "evaluation is behind: dropped %d closed windows in %.0f s, the last %s (%d events); their events "
                "are stored (monitor.max_pending_windows)", dropped.id, dropped.sampler.count)
        self.window = self._open_window(self.active_name)

    def _store_events(self, rows: list[dict[str, Any]]) -> tuple[int, list[str], int]:
        """Store new events and place them in windows, or buffer them while the database is unreachable.

        Buffered events are written first, so they stay in arrival order. Returns (events
        accepted, ids already stored, pending labels applied). With the database unreachable
        and no room in the buffer, raises BufferFullError and accepts nothing.
        """
        if not rows:
            return 0, [], 0
        placed = False

        def place(fresh: list[dict[str, Any]]) -> dict[str, list[str]]:
            nonlocal placed
            placed = True
            return self._place(fresh)

        try:
            self.event_buffer.flush(self.store)
            return self.store.insert_events(rows, place=place)
        except DBAPIError as exc:
            if not is_connection_error(exc):
                # NOTE: when ``place`` already ran, the batch stays in the window but not in the
                # database, and a client that resends it is counted in the window twice.
                raise
            self._count_store_error("ingest_events", exc)
        if not placed:
            self.event_buffer.check_room(len(rows), self.store)
            self._place(rows)
        # NOTE: when the commit fails after the events entered the window, the batch is held even if it
        # overfills the buffer (by one batch at most), so that the window and the database agree later.
        self.event_buffer.add(rows)
        return len(rows), [], 0

    def _count_store_error(self, operation: str, exc: DBAPIError) -> None:
        self.event_buffer.errors.labels(operation).inc()
        logger.warning("database unreachable during %s: %s", operation, str(exc.orig or exc).strip().splitlines()[0])

    def _flush_event_buffer(self) -> None:
        if not len(self.event_buffer):
            return
        with self.lock:
            try:
                self.event_buffer.flush(self.store)
            except DBAPIError as exc:
                if not is_connection_error(exc):
                    raise
                self._count_store_error("flush_buffer", exc)

    def _log_ignored_fields(self, kind: str, names: dict[str, int], known: frozenset[str]) -> None:
        """Log each field name that clients send but driftloop does not read, once per process."""
        fresh = [name for name in names if (kind, name) not in self.logged_ignored_fields]
        if not fresh or len(self.logged_ignored_fields) >= MAX_LOGGED_IGNORED_FIELDS:
            return
        self.logged_ignored_fields.update((kind, name) for name in fresh)
        logger.warning("%s carry fields that driftloop does not read, so they are ignored: %s. The fields it reads "
                       "are %s", kind, ", ".join(sorted(fresh)), ", ".join(sorted(known)))

    def ingest_labels(self, body: Any) -> LabelResult:
        """Store delayed labels; a database that cannot be reached is an error to the caller, never a silent loss."""
        try:
            return self._ingest_labels(body)
        except DBAPIError as exc:
            if not is_connection_error(exc):
                raise
            self._count_store_error("ingest_labels", exc)
            raise DatabaseUnavailableError(
                "the database is unreachable, so no label of this request was stored; resend them later"
            ) from None

    def _ingest_labels(self, body: Any) -> LabelResult:
        """Attach delayed labels to stored events; keep labels for events not stored yet as pending."""
        with self.lock:
            labels = list(self.labels)
        result = validate_labels(body, labels, max_items=self.config.monitor.max_batch)
        self._log_ignored_fields("labels", result.ignored_fields, LABEL_FIELDS)
        if result.valid:
            limit = self.config.monitor.max_pending_labels
            with self.lock:
                known = self.store.known_event_ids(list(result.valid))
                applied = {event_id: label for event_id, label in result.valid.items() if event_id in known}
                unknown = [event_id for event_id in result.valid if event_id not in known]
                room = max(limit - self.store.count_pending_labels(), 0)
                waiting = {event_id: result.valid[event_id] for event_id in unknown[:room]}
                for event_id in unknown[room:]:
                    index = result.positions[event_id]
                    result.errors.append(ItemError(
                        index, f"labels[{index}].id", event_id,
                        f"no event with this id yet, and {limit} labels already wait for their events "
                        "(monitor.max_pending_labels); resend this label after its event is posted",
                        event_id,
                    ))
                self.store.set_labels(applied)
                self.store.add_pending_labels(waiting)
                pending_total = self.store.count_pending_labels()
            result.accepted = len(applied)
            result.pending = len(waiting)
            self.metrics.labels_pending.set(pending_total)
        self.metrics.labels_received.inc(result.accepted + result.pending)
        if result.accepted + result.pending:
            self.metrics.last_label_received.set_to_current_time()
        if result.errors:
            self.metrics.labels_rejected.inc(len(result.errors))
        return result

    def _expire_pending_labels(self) -> None:
        cutoff = time.time() - self.config.monitor.pending_label_ttl_s
        expired = self.store.expire_pending_labels(older_than=cutoff)
        if expired:
            self.metrics.labels_expired.inc(expired)
            logger.warning("dropped %d labels whose events did not arrive within %.0f s (monitor.pending_label_ttl_s)",
                           expired, self.config.monitor.pending_label_ttl_s)
        self.metrics.labels_pending.set(self.store.count_pending_labels())

    # Scheduled work

    def tick(self) -> None:
        with self.tick_lock:
            self._tick()

    def _tick(self) -> None:
        try:
            self.memory.check()
            leader = self._refresh_leadership()
            self._flush_event_buffer()
            self._follow_registry()
            if leader:
                self._promote_approved()
                self._recheck_waiting_runs()
            self._expire_pending_labels()
            while True:
                with self.lock:
                    if not self.pending:
                        break
                    window = self.pending.popleft()
                try:
                    self._evaluate(window)
                except DBAPIError as exc:
                    if is_connection_error(exc):
                        # Evaluated again at the next check, when the database may be back.
                        with self.lock:
                            self.pending.appendleft(window)
                    raise
            if leader:
                self._decide_windows()
                self._recheck_trigger()
                self.notifier.check_pending()
                self.retention.run_if_due()
            # Runs started by `driftloop retrain` in a terminal show up here too.
            latest = self.store.runs(limit=1)
            if latest and not self.job_running() and latest[0]["state"] in RUN_STATES:
                self.metrics.retrain_state.state(latest[0]["state"])
        except DBAPIError as exc:
            if not is_connection_error(exc):
                logger.exception("scheduled check failed")
                return
            self._count_store_error("scheduled_check", exc)
        except Exception:  # noqa: BLE001 - one failed check must not stop the schedule
            logger.exception("scheduled check failed")

    # Leadership among replicas

    def _decision_horizon_s(self) -> float:
        """Seconds back, in evaluation time, the leader looks for windows it has not decided on yet."""
        return max(600.0, 10 * self.config.monitor.check_interval_s)

    def _refresh_leadership(self) -> bool:
        """Keep or try the leadership; a replica that becomes leader closes the runs its predecessor left."""
        leader = self.leadership.refresh()
        if leader and not self.leading:
            self._recover_runs()
            # Windows evaluated before this replica led were the previous leader's to decide on.
            since = time.time() - self._decision_horizon_s()
            self.decided_windows = {window["window_id"]: window["evaluated_at"]
                                    for window in self.store.windows_evaluated_since(since)}
        self.leading = leader
        return leader

    def _decide_windows(self) -> None:
        """Apply the post-promotion watch and the trigger policy to new windows of every replica, by end time."""
        since = time.time() - self._decision_horizon_s()
        self.decided_windows = {key: at for key, at in self.decided_windows.items() if at >= since}
        # NOTE: evaluation times come from each replica's clock; one that lags by more than the
        # horizon stores windows the leader never decides on.
        for window in self.store.windows_evaluated_since(since):
            if window["window_id"] in self.decided_windows:
                continue
            self.decided_windows[window["window_id"]] = window["evaluated_at"]
            if window["version"] != self.active_name:
                # A window of the previous version is no evidence about the new one.
                continue
            if self._judge_watch(window["version"]):
                continue
            report = SimpleNamespace(started_at=window["started_at"], status=window["status"],
                                     drifted=window["drifted"], drifted_signals=window.get("drifted_signals", []))
            self._apply_policy(window["window_id"], report)

    def _follow_registry(self) -> None:
        """Reload the reference when the active version changed outside this process (CLI rollback).

        A promotion or rollback in this process holds the promotion lock from the pointer move
        until its reference is loaded; the check skips while it is held, so it never mistakes
        that change for an outside one.
        """
        if not self.promotion_lock.acquire(blocking=False):
            return
        try:
            self._follow_registry_locked()
        finally:
            self.promotion_lock.release()

    def _follow_registry_locked(self) -> None:
        active = self.registry.active()
        if active is not None and active.name != self.active_name:
            logger.info("active version changed from %s to %s; reloading the reference", self.active_name, active.name)
            previous = self.active_name
            self._activate_reference(active.name)
            self.policy.run_ended()
            self.notifier.version_changed(active.name, active.adapter_dir, previous, "rollback")
        self._count_rollbacks()

    def _evaluate(self, window: OpenWindow) -> None:
        if window.version != self.active_name:
            # The window closed before a promotion or rollback. Its own reference is no longer loaded,
            # and the new version's reference would judge traffic that version never served.
            self.resource_metrics.windows_skipped.inc()
            self.unevaluated["stale"].add(
                "skipped %d closed windows in %.0f s of a version no longer active, the last %s (%d events of "
                "version %s); their events are stored", window.id, window.sampler.count, window.version)
            return
        started = time.time()
        sampler = window.sampler
        span = (sampler.last_at or started) - (sampler.started_at or started)
        cap = embedding_cap(self.config.resources.embedding_max_texts_per_s, span,
                            sample_size=self.config.monitor.sample_size, min_samples=self.config.detectors.min_samples)
        if self.evaluation_budget is not None and self.evaluation_budget.available() <= 0:
            self.resource_metrics.windows_skipped.inc()
            self.unevaluated["skipped_time"].add(
                "evaluation time budget spent: skipped %d closed windows in %.0f s, the last %s (%d events); their "
                "events are stored (resources.evaluation_max_share)", window.id, sampler.count)
            return
        if (self.embedding_budget is not None and cap is not None
                and not self.embedding_budget.take(min(cap, len(sampler.sample)))):
            self.resource_metrics.windows_skipped.inc()
            self.unevaluated["skipped"].add(
                "embedding budget spent: skipped %d closed windows in %.0f s, the last %s (%d events); their events "
                "are stored (resources.embedding_max_texts_per_s)", window.id, sampler.count)
            return
        report = self.evaluator.evaluate(window.id, limit_sample(sampler, cap, seed=self.config.detectors.seed))
        if self.evaluation_budget is not None:
            self.evaluation_budget.charge(time.time() - started)
        self.metrics.evaluation_seconds.observe(time.time() - started)
        labelled, accuracy = self.store.window_accuracy(window.id)
        data = report.to_dict()
        data["realized_accuracy"] = accuracy
        data["labelled_events"] = labelled
        estimate = report.accuracy_estimate.estimate if report.accuracy_estimate else None
        # Labels arrive late, so the realized accuracy covers the events labelled by evaluation time.
        gap = estimate - accuracy if estimate is not None and accuracy is not None else None
        data["accuracy_estimate_gap"] = gap
        # n_sampled is what the detectors tested; sampled_texts is the reservoir before the embedding budget.
        data["sampled_texts"] = len(sampler.sample)
        data["embedding_cap"] = cap
        self.resource_metrics.window_embedded.set(report.n_sampled)
        self.resource_metrics.window_embedding_cap.set(float("nan") if cap is None else cap)
        self.store.insert_window(data, window.version)
        self.metrics.record_window(report)
        if accuracy is not None:
            self.metrics.realized_accuracy.set(accuracy)
        if gap is not None:
            self.metrics.accuracy_estimate_gap.set(gap)
        if report.drifted:
            verdict = "drift in " + ", ".join(report.drifted_signals)
        elif report.status == "ok":
            verdict = "no drift"
        else:
            verdict = report.status.replace("_", " ")
        logger.info("window %s: %s (%d events, mean confidence %.3f)",
                    window.id, verdict, report.n_events, report.mean_confidence)
        if report.drifted:
            self.store.audit("monitor", "window_drifted", version=window.version,
                             detail={"window_id": window.id, "signals": report.drifted_signals,
                                     "mean_confidence": report.mean_confidence, "n_events": report.n_events,
                                     "explanation": explain_drift(report),
                                     "report": f"/v1/windows/{window.id}/report"})
        # The leader applies the watch and the policy to it, with the windows of other replicas (_decide_windows).

    # Post-promotion watch

    def _start_watch(self, version: str, previous: str | None, run_id: str) -> None:
        """Record the baseline of the version being replaced, so live figures of ``version`` can be judged."""
        settings = self.config.post_promotion
        if not settings.enabled or previous is None:
            return
        windows = self.store.last_windows_of_version(previous, settings.baseline_windows)
        baseline = promotion_watch.pool_windows(windows, self.store.window_accuracy)
        self.store.start_watch(version, previous, run_id, baseline.to_dict())
        self.metrics.post_promotion_watching.set(1)
        self.metrics.post_promotion_events.set(0)
        self.store.audit("post_promotion_watch", "watch_started", run_id=run_id, version=version,
                         detail={"previous": previous, "baseline": baseline.to_dict()})
        logger.info("post-promotion watch of version %s started: baseline from %d windows of %s %s",
                    version, baseline.windows, previous, baseline.to_dict())

    def _judge_watch(self, version: str) -> bool:
        """Judge the watched ``version`` on its windows so far; return True when it was rolled back."""
        watch = self.store.watch(version)
        if watch is None or watch["status"] != promotion_watch.WATCHING:
            return False
        baseline = promotion_watch.LiveFigures(**watch["baseline"])
        observed = promotion_watch.pool_windows(self.store.windows_of_version(version, since=watch["started_at"]),
                                self.store.window_accuracy)
        verdict = promotion_watch.judge(baseline, observed, self.config.post_promotion)
        result = {"observed": observed.to_dict(), **verdict.to_dict()}
        self.metrics.post_promotion_events.set(observed.events)
        if verdict.status == promotion_watch.WATCHING:
            self.store.update_watch(version, verdict.status, result)
            return False
        self.metrics.post_promotion_watching.set(0)
        if verdict.status == promotion_watch.PASSED:
            self.store.update_watch(version, verdict.status, result)
            self.store.audit("post_promotion_watch", "watch_passed", run_id=watch["run_id"], version=version,
                             detail=result)
            logger.info("post-promotion watch of version %s passed after %d events", version, observed.events)
            return False
        reason = "post-promotion watch: " + "; ".join(verdict.reasons)
        logger.warning("version %s is worse than %s on live traffic: %s; rolling back", version, watch["previous"],
                       "; ".join(verdict.reasons))
        try:
            self.rollback(watch["previous"], actor="post_promotion_watch", reason=reason)
        except DriftloopError as exc:
            # The pointer moved meanwhile (a person rolled back or promoted): nothing to undo.
            logger.warning("post-promotion watch of version %s could not roll back: %s", version, exc)
            self.store.update_watch(version, "ended", {**result, "error": str(exc)})
            return False
        self.store.update_watch(version, "rolled_back", result)
        self.metrics.post_promotion_rollbacks.inc()
        return True

    def _apply_policy(self, window_id: str, report) -> None:
        decision = self.policy.observe(
            window_id, report.started_at, report.status, report.drifted,
            count_labelled=lambda since: self.store.count_labelled(since=since),
            job_active=self.job_running(),
        )
        if report.drifted:
            self.last_drifted_signals = list(report.drifted_signals)
        self._act_on(decision)

    def _recheck_trigger(self) -> None:
        """Start the retrain that an earlier window armed once its labels are in or its cooldown is over."""
        if not self.policy.armed or self.job_running() or self.draining or self.memory.over_limit():
            # A refused start is recorded when a window arrives, not at every check.
            return
        self._act_on(self.policy.recheck(count_labelled=lambda since: self.store.count_labelled(since=since),
                                         job_active=False))

    def _act_on(self, decision) -> None:
        self.metrics.consecutive_drift.set(decision.streak)
        if decision.action == "needs_labels":
            self.metrics.labels_needed.set(decision.labels_needed)
            if self.labels_alert_streak is None:
                self.labels_alert_streak = decision.streak
                logger.warning("drift persists but no retrain started: %s", decision.reason)
                self.store.audit("monitor", "labels_needed", version=self.active_name,
                                 detail={"labelled": decision.labelled, "needed": decision.labels_needed,
                                         "message": decision.reason})
        elif decision.action == "trigger" and self._retrain_refused(decision.reason):
            return
        elif decision.action == "trigger":
            self.metrics.labels_needed.set(0)
            self.labels_alert_streak = None
            self.start_retrain({"windows": list(self.policy.streak_windows), "reason": decision.reason,
                                "signals": self.last_drifted_signals, "labelled": decision.labelled,
                                "drift_started_at": self.policy.streak_started_at})
            self.policy.reset()
        elif decision.streak == 0:
            self.labels_alert_streak = None

    # Retraining

    def _retrain_refused(self, reason: str) -> bool:
        """Return True, and log why, when a triggered retrain must not start: shutdown or memory.

        The drift streak is kept, so the next drifted window triggers again once the cause is gone.
        """
        if self.draining:
            cause, label = "the sidecar is shutting down", "shutdown"
        elif self.memory.over_limit():
            cause, label = (f"resident memory is above resources.memory_soft_limit_mb "
                            f"({self.config.resources.memory_soft_limit_mb} MiB)"), "memory"
        else:
            return False
        logger.warning("retrain not started although %s: %s", reason, cause)
        self.resource_metrics.retrains_refused.labels(label).inc()
        self.store.audit("monitor", "retrain_refused", version=self.active_name,
                         detail={"reason": cause, "trigger": reason})
        return True

    def job_running(self) -> bool:
        return self.job_thread is not None and self.job_thread.is_alive()

    def start_retrain(self, trigger: dict[str, Any], actor: str = "monitor") -> str:
        if not self.leadership.is_leader:
            raise DriftloopError(f"replica {self.leadership.replica} is not the leader; only the leader starts "
                                 "retrains (see leader in GET /v1/status of each replica)")
        if self.job_running():
            raise DriftloopError("a retraining run is already in progress")
        # A run started by `driftloop retrain` in another process counts too, unless that process died.
        self._recover_runs()
        running = self.store.runs(states=RUNNING_STATES, limit=1)
        if running:
            raise DriftloopError(f"retrain run {running[0]['id']} is {running[0]['state']}; wait for it or cancel it")
        active = self.registry.active()
        if active is None:
            raise RegistryError("no active version to retrain from")
        run_id = new_run_id()
        trigger = {**trigger, "owner": run_owner("daemon")}
        self.store.create_run(run_id, "queued", active.name, trigger)
        self.store.audit(actor, "retrain_triggered", run_id=run_id, version=active.name,
                         detail={key: value for key, value in trigger.items() if key != "owner"})
        logger.info("retrain run %s triggered from version %s: %s", run_id, active.name, trigger.get("reason"))
        self.cancel_requested.clear()
        self._log_progress = progress_reporter(logger.info, f"retrain run {run_id}")
        self.metrics.retrain_state.state("queued")
        self.metrics.retrain_overfitting.set(0)
        job = self._new_job(run_id, active, self.active_since, drift_started_at=trigger.get("drift_started_at"))
        self.job_thread = threading.Thread(target=self._run_job, args=(job,), name=f"retrain-{run_id}", daemon=True)
        self.job_thread.start()
        return run_id

    def _new_job(self, run_id: str, base, since: float | None, drift_started_at: float | None = None) -> RetrainJob:
        return RetrainJob(run_id=run_id, config=self.config, store=self.store, registry=self.registry,
                          dataset=self.dataset, base=base, since=since, drift_started_at=drift_started_at,
                          on_progress=self._on_progress, should_stop=self.cancel_requested.is_set,
                          stop_reason="sidecar shutdown", embedder=self.embedder)

    def _on_progress(self, progress: dict) -> None:
        self._log_progress(progress)
        self.metrics.retrain_state.state("training")
        self.metrics.retrain_step.set(progress.get("step", 0))
        if progress.get("loss") is not None:
            self.metrics.retrain_loss.set(progress["loss"])
        if progress.get("val_loss") is not None:
            self.metrics.retrain_val_loss.set(progress["val_loss"])
        if progress.get("overfitting"):
            self.metrics.retrain_overfitting.set(1)
        if progress.get("eta_s") is not None:
            self.metrics.retrain_eta.set(progress["eta_s"])

    def cancel_retrain(self, run_id: str, actor: str, comment: str = "") -> dict:
        """Cancel a run; a running one stops before its next training step (see ``retrain.jobs.cancel_run``)."""
        run = cancel_run(self.store, run_id, actor=actor, comment=comment, state_dir=self.config.shared_path)
        logger.info("retrain run %s: cancel requested by %s, now %s", run_id, actor, run["state"])
        if run["state"] == "cancelled":
            self.metrics.retrain_runs.labels("cancelled").inc()
            self.metrics.retrain_state.state("cancelled")
        return run

    def _run_job(self, job: RetrainJob, recheck: bool = False) -> None:
        state = job.recheck() if recheck else job.run()
        run = self.store.get_run(job.run_id) or {}
        canary = run.get("canary") or {}
        if canary:
            self.metrics.canary_passed.set(1 if canary.get("passed") else 0)
            if canary.get("status") in CANARY_STATUSES:
                self.metrics.canary_evaluations.labels(canary["status"]).inc()
        self.metrics.retrain_state.state(state if state in RUN_STATES else "idle")
        if state in ("failed", "rejected_by_gate", "cancelled"):
            self.metrics.retrain_runs.labels(state).inc()
            self.policy.run_ended()
        if state == "pending_approval":
            self.notifier.approval_requested(job.run_id)
        if state == "approved":
            self.promote(job.run_id, actor="policy:" + self.config.approval)

    def _recheck_waiting_runs(self) -> None:
        """Evaluate an inconclusive waiting candidate again once enough new held-out events are labelled.

        One run at a time, in the worker thread, and never beside a retrain.
        """
        if self.job_running() or self.draining:
            return
        step = self.config.canary.recheck_new_samples
        for run in self.store.runs(states=WAITING_STATES, limit=20):
            canary = run["canary"] or {}
            if canary.get("status") != "inconclusive" or not run.get("candidate_dir"):
                continue
            since = (run["training"] or {}).get("production_since")
            held_out = sum(in_holdout(event_id, self.config.retrain.holdout_fraction)
                           for event_id, _, _ in self.store.labelled_events(since=since))
            judged = (canary.get("production") or {}).get("n", 0)
            if held_out - judged < step:
                continue
            try:
                base = self.registry.get(run["base_version"])
            except DriftloopError as exc:
                logger.warning("retrain run %s cannot be evaluated again: %s", run["id"], exc)
                continue
            logger.info("retrain run %s: %d held-out events labelled, %d when last judged; evaluating again",
                        run["id"], held_out, judged)
            job = self._new_job(run["id"], base, since)
            self.job_thread = threading.Thread(target=self._run_job, args=(job, True), name=f"recheck-{run['id']}",
                                               daemon=True)
            self.job_thread.start()
            return

    def _promote_approved(self) -> None:
        """Promote every approved run, after waiting for a promotion running in another thread.

        The lock covers the listing too. So a check that follows an approval returns with the new
        version active, whichever thread promoted it, and no two threads promote the same run.
        """
        with self.promotion_lock:
            for run in self.store.runs(states=["approved"]):
                self.promote(run["id"], actor="approval")

    def promote_approved_runs(self) -> None:
        """Promote the runs approved since the last poll, on the leader only; a scheduled job of its own."""
        if not self.leading or self.draining:
            return
        try:
            self._promote_approved()
        except DBAPIError as exc:
            if not is_connection_error(exc):
                logger.exception("promoting approved runs failed")
                return
            self._count_store_error("promote_approved", exc)
        except Exception:  # noqa: BLE001 - the next look tries again
            logger.exception("promoting approved runs failed")

    def promote(self, run_id: str, actor: str) -> str:
        """Register the run's candidate as a new version, activate it and rebuild the reference."""

        with self.promotion_lock:
            # A cancel or reject that lands first wins; the check and the change are one statement.
            if not self.store.transition_run(run_id, ("approved",), "promoting", actor=actor, action="run_promoting"):
                run = self.store.get_run(run_id)
                raise DriftloopError(f"retrain run {run_id} is not approved (state {run and run['state']})")
            run = self.store.get_run(run_id)
            try:
                version = self.registry.register(Path(run["candidate_dir"]), parent=run["base_version"],
                                                 run_id=run_id, actor=actor)
                self._install_profile(run_id, version)
                previous = self.registry.activate(version.name, actor=actor, action="promote", run_id=run_id)
            except Exception as exc:
                self.store.update_run(run_id, state="failed", error=f"promotion failed: {exc}")
                self.metrics.retrain_runs.labels("failed").inc()
                logger.exception("promotion of run %s failed", run_id)
                raise
            self.store.update_run(run_id, state="active", promoted_version=version.name)
            self._supersede_waiting_runs(run_id, version.name)
            self._notify_server()
            self.notifier.version_changed(version.name, version.adapter_dir, previous, "promote")
            self._start_watch(version.name, run["base_version"], run_id)
            self._activate_reference(version.name)
            self.policy.run_ended()
            self.metrics.promotions.inc()
            self.metrics.retrain_runs.labels("promoted").inc()
            self.metrics.retrain_state.state("active")
            logger.info("retrain run %s promoted as version %s", run_id, version.name)
            return version.name

    def _supersede_waiting_runs(self, promoted_run: str, version: str) -> None:
        """End the other candidates that wait: they were trained from a version that is no longer active."""
        for run in self.store.runs(states=(*WAITING_STATES, "approved"), limit=1000):
            if run["id"] != promoted_run and self.store.transition_run(
                    run["id"], (run["state"],), "superseded", actor="daemon", action="run_superseded",
                    detail={"by_version": version, "was": run["state"]}):
                logger.info("retrain run %s: superseded by version %s", run["id"], version)
                shutil.rmtree(self.config.shared_path / "runs" / run["id"], ignore_errors=True)

    def _install_profile(self, run_id: str, version) -> None:
        """Move the profile the run built before approval into place, or build it now if it has none."""
        work_dir = self.config.shared_path / "runs" / run_id
        built = work_dir / "profile"
        target = self.registry.profile_dir(version.name)
        if (built / "profile.json").is_file() and not target.exists():
            os.rename(built, target)
        else:
            from monitor.profiles import build_version_profile

            build_version_profile(self.config, version.adapter_dir, version.name, target, embedder=self.embedder)
        shutil.rmtree(work_dir, ignore_errors=True)

    def rollback(self, to: str | None, actor: str, reason: str = "") -> tuple[str | None, str]:
        with self.promotion_lock:
            previous, target = self.registry.rollback(to, actor=actor, reason=reason)
            self._notify_server()
            self.notifier.version_changed(target, self.registry.get(target).adapter_dir, previous, "rollback")
            self._activate_reference(target)
            self.policy.run_ended()
            self._count_rollbacks()
            return previous, target

    def _count_rollbacks(self) -> None:
        """Count rollbacks from the audit log, so those made by the CLI in another process count too."""
        ids = self.store.audit_ids(["rollback"], since_id=self.rollbacks_seen)
        if ids:
            self.rollbacks_seen = ids[-1]
            self.metrics.rollbacks.inc(len(ids))
            self.metrics.retrain_state.state("rolled_back")

    def _notify_server(self) -> None:
        server = self.config.server
        url = f"http://{server.host}:{server.port}/v1/admin/reload"
        try:
            response = httpx.post(url, headers=bearer_header(load_token(self.config.auth)), timeout=10.0)
            if response.status_code != 200:
                logger.warning("the model server at %s returned %d to the reload request: %s", url, response.status_code,
                               response.text[:200])
        except httpx.HTTPError as exc:
            # The server also polls the registry, so it picks the version up within its poll interval.
            logger.warning("could not notify the model server at %s: %s", url, exc)

    # Status

    def status(self) -> dict[str, Any]:
        with self.lock:
            window = {"id": self.window.id, "events": self.window.sampler.count,
                      "size": self.config.monitor.window_size, "pending": len(self.pending)}
        try:
            runs = self.store.runs(limit=5)
        except DBAPIError as exc:
            if not is_connection_error(exc):
                raise
            self._count_store_error("status", exc)
            return {"ready": self.ready, "startup_error": self.startup_error, "active_version": self.active_name,
                    "window": window, "leader": self.leadership.describe(),
                    "store": {"reachable": False, "buffered_events": len(self.event_buffer)}}
        return {
            "ready": self.ready,
            "leader": self.leadership.describe(),
            "store": {"reachable": True, "buffered_events": len(self.event_buffer)},
            "startup_error": self.startup_error,
            "active_version": self.active_name,
            "window": window,
            "consecutive_drifted_windows": self.policy.streak,
            "alpha": {
                "per_window": self.config.alpha,
                "per_signal": self.evaluator.adjusted_alpha if self.evaluator else None,
                "false_alarms_per_week": self.config.alarm.false_alarms_per_week,
                "windows_per_week": self.config.alarm.windows_per_week,
            },
            "retrain_running": self.job_running(),
            "labelled_since_activation": self.store.count_labelled(since=self.active_since) if self.ready else 0,
            "recent_runs": [{"id": run["id"], "state": run["state"], "promoted_version": run["promoted_version"]} for run in runs],
            "post_promotion_watch": self.store.watch(self.active_name) if self.active_name else None,
        }
