"""Delivery of notifications: approval requests to people, version changes to servers driftloop does not run.

Approval webhooks (``notify.approval_webhooks``, format slack, alertmanager or json)
hear when a retrain run starts waiting in ``pending_approval``, once more when it
has waited longer than ``notify.stale_approval_after_s``, and (alertmanager only)
when it stops waiting, so the alert resolves. Alertmanager drops an alert that is
not sent again within its ``resolve_timeout`` (5 minutes by default), so an
alertmanager target also gets the firing alert again every
``notify.resend_interval_s`` while the run waits. A stale run's alert has
severity ``critical`` instead of ``warning``; because labels identify an alert,
the same request resolves the ``warning`` alert.

Version hooks (``notify.version_hooks``, type vllm, webhook or command) hear of
every promotion and rollback after the registry changed. A vllm hook loads the
new version through vLLM's dynamic LoRA API, a webhook receives a JSON body, and
a command runs a program with the version in its environment.

Callers only put deliveries on a bounded queue. One worker thread sends them, so
ingest, the scheduler tick and the promotion lock never wait on a target. A
failed attempt that may succeed later (a connection error, a timeout, HTTP 5xx,
408 or 429, a command that failed) is retried with exponential backoff; any other
HTTP 4xx is not. Each delivery and each final failure is counted in the metrics
and written to the audit log (actor ``notify``), except the alertmanager re-sends,
which are only counted.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import httpx
from sqlalchemy import or_, select

from monitor.store import AuditRow, Store

if TYPE_CHECKING:
    from monitor.config import ApprovalWebhookConfig, NotifyConfig, VersionHookConfig
    from monitor.metrics import MonitorMetrics

logger = logging.getLogger(__name__)

PENDING_STATE = "pending_approval"
# Events, a bounded label set of the notification metrics.
APPROVAL_REQUESTED = "approval_requested"
APPROVAL_STALE = "approval_stale"
APPROVAL_RESEND = "approval_resend"
APPROVAL_RESOLVED = "approval_resolved"
VERSION_ACTIVATED = "version_activated"
ADAPTER_UNLOADED = "adapter_unloaded"

ALERT_NAME = "DriftloopApprovalPending"
SERVICE_LABEL = "driftloop"
# Deliveries waiting for the worker; a delivery that finds the queue full is dropped and counted.
QUEUE_SIZE = 1000
# Characters of a response body or of a command's stderr kept in logs and the audit log.
ERROR_TEXT_CHARS = 500
# Pending runs read per tick; more than this many waiting runs is far beyond normal use.
MAX_PENDING_RUNS = 1000


class DeliveryError(Exception):
    """One failed attempt; ``retryable`` is True when a later attempt may succeed."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Delivery:
    """One notification to one target, with the function that sends it once."""

    target_name: str
    target_type: str
    event: str
    send: Callable[[httpx.Client], None]
    max_attempts: int
    run_id: str | None = None
    version: str | None = None
    audited: bool = True
    # Builds a delivery to send after this one succeeded (vLLM's unload after the load).
    follow_up: Callable[[], Delivery | None] | None = None
    attempts: int = 0


@dataclass
class _PendingRun:
    """State the notifier keeps for a run that waits for approval."""

    pending_since: float
    stale_sent: bool = False
    last_alert_at: float = 0.0
    seen: set[str] = field(default_factory=set)


def rfc3339(timestamp: float) -> str:
    """Format Unix seconds as RFC 3339 in UTC, as Alertmanager expects its timestamps."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def monitor_url(host: str, port: int) -> str | None:
    """Return the monitor's base URL for links, or None when it listens on every address.

    A wildcard address such as 0.0.0.0 names no host a reader could open.
    """
    if host in ("", "0.0.0.0", "::"):
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def format_duration(seconds: float) -> str:
    """Format a duration for people: ``45s``, ``12m``, ``2h 5m``."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    return f"{minutes // 60}h {minutes % 60}m"


# Payloads

def deciding_gate(canary: dict) -> dict | None:
    """Return the canary gate that decided the outcome: the first failed gate, else the first unevaluated one.

    The canary records the deciding gate's name. For a run recorded without it, the gate is
    found from the gate list. Returns None when every gate passed, because then the approval
    policy, not a gate, made the run wait.
    """
    gates = canary.get("gates") or []
    if "deciding_gate" in canary:
        return next((gate for gate in gates if gate.get("name") == canary["deciding_gate"]), None)
    for gate in gates:
        if gate.get("evaluated", True) and not gate.get("passed"):
            return gate
    for gate in gates:
        if not gate.get("passed"):
            return gate
    return None


def key_figures(canary: dict) -> dict[str, float | int]:
    """Collect the canary's headline numbers that are present: sample sizes, accuracies and shadow agreement."""
    figures: dict[str, float | int] = {}
    for slice_name, prefix in (("production", "production"), ("test", "test")):
        comparison = canary.get(slice_name) or {}
        if comparison.get("n"):
            figures[f"{prefix}_samples"] = comparison["n"]
            figures[f"{prefix}_current_accuracy"] = comparison["current_accuracy"]
            figures[f"{prefix}_candidate_accuracy"] = comparison["candidate_accuracy"]
    shadow = canary.get("shadow") or {}
    if shadow.get("agreement") is not None:
        figures["shadow_agreement"] = shadow["agreement"]
    return figures


def approval_summary(run: dict, *, event: str, pending_since: float, now: float, stale: bool,
                     base_url: str | None) -> dict[str, Any]:
    """Describe a run that waits (or waited) for approval; the ``json`` format sends this as it is.

    ``report_url`` is the run's web page and ``run_url`` its JSON, both under ``base_url``;
    both are None when no base URL is known.
    """
    canary = run.get("canary") or {}
    gate = deciding_gate(canary)
    base = base_url.rstrip("/") if base_url else None
    return {
        "event": event,
        "run_id": run["id"],
        "state": run["state"],
        "base_version": run.get("base_version"),
        "pending_since": pending_since,
        "pending_s": round(now - pending_since, 1),
        "stale": stale,
        "canary_status": canary.get("status"),
        "deciding_gate": {"name": gate["name"], "message": gate.get("message")} if gate else None,
        "figures": key_figures(canary),
        "report_url": f"{base}/ui#run={run['id']}" if base else None,
        "run_url": f"{base}/v1/retrains/{run['id']}" if base else None,
    }


def _decision_text(summary: dict) -> str:
    gate = summary["deciding_gate"]
    status = summary["canary_status"] or "unknown"
    if gate is None:
        return f"canary {status}; every gate passed, so the approval policy asks for a person"
    return f"canary {status}; deciding gate {gate['name']}: {gate['message']}"


def _headline(summary: dict) -> str:
    waited = format_duration(summary["pending_s"])
    if summary["event"] == APPROVAL_RESOLVED:
        return f"Retrain run {summary['run_id']} no longer waits for approval (now {summary['state']})"
    if summary["stale"]:
        return f"STALE: retrain run {summary['run_id']} has waited {waited} for approval"
    return f"Retrain run {summary['run_id']} waits for approval"


def slack_payload(summary: dict) -> dict[str, Any]:
    """Build a Slack incoming-webhook body: ``text`` (the notification line) plus Block Kit ``blocks``."""
    text = f"{_headline(summary)} (base version {summary['base_version']}, {_decision_text(summary)})"
    fields = [
        {"type": "mrkdwn", "text": f"*Run*\n`{summary['run_id']}`"},
        {"type": "mrkdwn", "text": f"*Base version*\n{summary['base_version']}"},
        {"type": "mrkdwn", "text": f"*Canary*\n{summary['canary_status'] or 'unknown'}"},
        {"type": "mrkdwn", "text": f"*Waiting*\n{format_duration(summary['pending_s'])}"},
    ]
    figures = summary["figures"]
    for prefix, title in (("production", "Production accuracy"), ("test", "Test accuracy")):
        if f"{prefix}_samples" in figures:
            fields.append({"type": "mrkdwn", "text": (
                f"*{title}*\n{figures[f'{prefix}_current_accuracy']:.3f} → "
                f"{figures[f'{prefix}_candidate_accuracy']:.3f} ({figures[f'{prefix}_samples']} events)")})
    if "shadow_agreement" in figures:
        fields.append({"type": "mrkdwn", "text": f"*Shadow agreement*\n{figures['shadow_agreement']:.3f}"})
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_headline(summary)}*"}},
        # At most 7 fields, below Slack's limit of 10 per section.
        {"type": "section", "fields": fields},
        {"type": "section", "text": {"type": "mrkdwn", "text": _decision_text(summary)}},
    ]
    if summary["report_url"]:
        blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                    "text": f"<{summary['report_url']}|Open the canary report>"}})
    return {"text": text, "blocks": blocks}


def alertmanager_payload(summary: dict, *, runbook_url: str | None = None,
                         resolved_at: float | None = None) -> list[dict[str, Any]]:
    """Build the alert list that Alertmanager's ``POST /api/v2/alerts`` takes.

    A pending run is one alert with severity ``warning``, or ``critical`` once stale. A stale
    run's body also ends the ``warning`` alert. With ``resolved_at`` every alert the run
    may have raised gets that ``endsAt``, which resolves it.
    """
    annotations = {
        "summary": _headline(summary),
        "description": f"Base version {summary['base_version']}; {_decision_text(summary)}.",
    }
    if runbook_url:
        annotations["runbook_url"] = runbook_url

    def alert(severity: str, ends_at: float | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "labels": {"alertname": ALERT_NAME, "severity": severity, "run_id": summary["run_id"],
                       "service": SERVICE_LABEL},
            "annotations": dict(annotations),
            "startsAt": rfc3339(summary["pending_since"]),
        }
        if summary["report_url"]:
            body["generatorURL"] = summary["report_url"]
        if ends_at is not None:
            body["endsAt"] = rfc3339(ends_at)
        return body

    if resolved_at is not None:
        severities = ("warning", "critical") if summary["stale"] else ("warning",)
        return [alert(severity, resolved_at) for severity in severities]
    if summary["stale"]:
        now = summary["pending_since"] + summary["pending_s"]
        return [alert("warning", now), alert("critical", None)]
    return [alert("warning", None)]


# Sending

def _bearer_headers(token_env: str | None) -> dict[str, str]:
    if not token_env:
        return {}
    token = os.environ.get(token_env)
    if not token:
        raise DeliveryError(f"environment variable {token_env} (token_env) is not set or empty; "
                            "set it to the target's bearer token", retryable=False)
    return {"Authorization": f"Bearer {token}"}


def post_json(client: httpx.Client, url: str, body: Any, *, token_env: str | None, timeout_s: float) -> None:
    """POST ``body`` as JSON; raise DeliveryError unless the response is 2xx."""
    headers = _bearer_headers(token_env)
    try:
        response = client.post(url, json=body, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        raise DeliveryError(f"POST {url} timed out after {timeout_s:g} s", retryable=True) from None
    except httpx.HTTPError as exc:
        raise DeliveryError(f"POST {url} failed: {type(exc).__name__}: {exc}", retryable=True) from None
    if response.is_success:
        return
    status = response.status_code
    retryable = status >= 500 or status in (408, 429)
    text = response.text[:ERROR_TEXT_CHARS]
    raise DeliveryError(f"POST {url} returned HTTP {status}: {text}", retryable=retryable)


def run_command(argv: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Run ``argv`` without a shell, the given variables added to this process's environment."""
    try:
        result = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                                timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DeliveryError(f"command {argv[0]} timed out after {timeout_s:g} s", retryable=True) from None
    except OSError as exc:
        raise DeliveryError(f"command {argv[0]} could not start: {exc}", retryable=False) from None
    if result.returncode != 0:
        tail = (result.stderr or "").strip()[-ERROR_TEXT_CHARS:]
        raise DeliveryError(f"command {argv[0]} exited with status {result.returncode}: {tail}", retryable=True)


class Notifier:
    """Queue notifications and send them from one worker thread.

    The daemon calls ``approval_requested`` when its retrain worker leaves a run pending,
    ``check_pending`` on every scheduler tick, and ``version_changed`` after each promotion
    and rollback. ``check_pending`` reads the pending runs from the store, so runs that a
    `driftloop retrain` in a terminal left pending, or that the CLI approved in another
    process, are noticed too.

    ``listen_url`` is the monitor's own base URL, used for links when ``ui_base_url`` is unset.
    """

    def __init__(self, config: NotifyConfig, store: Store, metrics: MonitorMetrics, *,
                 listen_url: str | None = None, drain_timeout_s: float = 5.0):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.listen_url = listen_url
        self.drain_timeout_s = drain_timeout_s
        self._queue: queue.Queue[Delivery] = queue.Queue(maxsize=QUEUE_SIZE)
        self._retries: list[tuple[float, int, Delivery]] = []
        self._sequence = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, _PendingRun] = {}
        for name, token_env in self._token_envs():
            if not os.environ.get(token_env):
                logger.warning("notify target %s: environment variable %s (token_env) is not set; "
                               "its notifications will fail until it is", name, token_env)

    def _token_envs(self) -> list[tuple[str, str]]:
        targets = [*self.config.approval_webhooks, *self.config.version_hooks]
        return [(target.name, target.token_env) for target in targets if target.token_env]

    # Lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="driftloop-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is queued for up to ``drain_timeout_s`` seconds, then log and count what is left."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout=self.drain_timeout_s + 10.0)
        if self._thread.is_alive():
            logger.warning("notification worker did not stop within %.0f s", self.drain_timeout_s + 10.0)
        self._thread = None

    # Hooks

    @property
    def base_url(self) -> str | None:
        return self.config.ui_base_url or self.listen_url

    def approval_requested(self, run_id: str) -> None:
        """Send approval requests for a run that the daemon's retrain worker just left pending."""
        run = self.store.get_run(run_id)
        if run is None or run["state"] != PENDING_STATE:
            return
        self._track([run], time.time())

    def check_pending(self) -> None:
        """Update the approval gauges; send new, stale, repeated and resolved approval notifications."""
        runs = self.store.runs(states=[PENDING_STATE], limit=MAX_PENDING_RUNS)
        now = time.time()
        self._track(runs, now)
        pending_ids = {run["id"] for run in runs}
        with self._lock:
            left = [run_id for run_id in self._pending if run_id not in pending_ids]
            tracked = {run_id: self._pending.pop(run_id) for run_id in left}
            oldest = min((self._pending[run["id"]].pending_since for run in runs if run["id"] in self._pending),
                         default=None)
        self.metrics.pending_approvals.set(len(runs))
        self.metrics.oldest_pending_approval_age.set(now - oldest if oldest is not None else 0.0)

        for run in runs:
            self._check_stale(run, now)
        for run_id, info in tracked.items():
            run = self.store.get_run(run_id)
            if run is not None:
                self._resolve(run, info, now)

    def version_changed(self, version: str, adapter_dir: str | Path, previous: str | None, reason: str) -> None:
        """Call every version hook with the newly active version; ``reason`` is promote or rollback."""
        at = time.time()
        for hook in self.config.version_hooks:
            self._enqueue(self._version_delivery(hook, version, str(adapter_dir), previous, reason, at))

    # Approval notifications

    def _track(self, runs: list[dict], now: float) -> None:
        """Remember runs seen pending for the first time, and request approval for those never notified."""
        with self._lock:
            new = [run for run in runs if run["id"] not in self._pending]
            if not new:
                return
            history = self._history([run["id"] for run in new])
            for run in new:
                pending_since, seen = history.get(run["id"], (None, set()))
                info = _PendingRun(pending_since or run["updated_at"], seen=seen)
                info.stale_sent = APPROVAL_STALE in seen
                self._pending[run["id"]] = info
        for run in new:
            info = self._pending.get(run["id"])
            if info is not None and APPROVAL_REQUESTED not in info.seen:
                info.seen.add(APPROVAL_REQUESTED)
                self._send_approval(run, info, APPROVAL_REQUESTED, now)

    def _history(self, run_ids: list[str]) -> dict[str, tuple[float | None, set[str]]]:
        """Read from the audit log when each run became pending and which approval events were already sent.

        A restarted daemon so neither repeats a request nor loses the waiting time.
        """
        with self.store.session() as session:
            rows = session.execute(
                select(AuditRow.run_id, AuditRow.action, AuditRow.timestamp, AuditRow.detail)
                .where(AuditRow.run_id.in_(run_ids),
                       or_(AuditRow.action == "run_pending_approval", AuditRow.actor == "notify"))
                .order_by(AuditRow.id)
            ).all()
        history: dict[str, tuple[float | None, set[str]]] = {}
        for run_id, action, timestamp, detail in rows:
            since, seen = history.get(run_id, (None, set()))
            if action == "run_pending_approval":
                since = timestamp
            else:
                seen.add(json.loads(detail or "{}").get("event"))
            history[run_id] = (since, seen)
        return history

    def _check_stale(self, run: dict, now: float) -> None:
        info = self._pending.get(run["id"])
        if info is None:
            return
        if not info.stale_sent and now - info.pending_since >= self.config.stale_approval_after_s:
            info.stale_sent = True
            info.seen.add(APPROVAL_STALE)
            self._send_approval(run, info, APPROVAL_STALE, now)
        elif now - info.last_alert_at >= self.config.resend_interval_s:
            self._send_approval(run, info, APPROVAL_RESEND, now)

    def _send_approval(self, run: dict, info: _PendingRun, event: str, now: float) -> None:
        stale = info.stale_sent
        summary = approval_summary(run, event=event, pending_since=info.pending_since, now=now, stale=stale,
                                   base_url=self.base_url)
        info.last_alert_at = now
        for target in self.config.approval_webhooks:
            if event == APPROVAL_RESEND and target.format != "alertmanager":
                continue
            if target.format == "slack":
                body: Any = slack_payload(summary)
            elif target.format == "alertmanager":
                body = alertmanager_payload(summary, runbook_url=target.runbook_url)
            else:
                body = summary
            # A re-send is repeated within resend_interval_s anyway, so it gets one attempt.
            attempts = 1 if event == APPROVAL_RESEND else self.config.max_attempts
            self._enqueue(self._approval_delivery(target, event, run["id"], body, attempts,
                                                  audited=event != APPROVAL_RESEND))

    def _resolve(self, run: dict, info: _PendingRun, now: float) -> None:
        """Resolve the alerts of a run that no longer waits (approved, rejected or cancelled)."""
        logger.info("retrain run %s no longer waits for approval (now %s)", run["id"], run["state"])
        stale = info.stale_sent or now - info.pending_since >= self.config.stale_approval_after_s
        summary = approval_summary(run, event=APPROVAL_RESOLVED, pending_since=info.pending_since, now=now,
                                   stale=stale, base_url=self.base_url)
        for target in self.config.approval_webhooks:
            if target.format != "alertmanager":
                continue
            body = alertmanager_payload(summary, runbook_url=target.runbook_url, resolved_at=now)
            self._enqueue(self._approval_delivery(target, APPROVAL_RESOLVED, run["id"], body,
                                                  self.config.max_attempts))

    def _approval_delivery(self, target: ApprovalWebhookConfig, event: str, run_id: str, body: Any,
                           attempts: int, audited: bool = True) -> Delivery:
        timeout_s = self.config.timeout_s

        def send(client: httpx.Client) -> None:
            post_json(client, target.url, body, token_env=target.token_env, timeout_s=timeout_s)

        return Delivery(target.name, target.format, event, send, attempts, run_id=run_id, audited=audited)

    # Version hooks

    def _version_delivery(self, hook: VersionHookConfig, version: str, adapter_dir: str, previous: str | None,
                          reason: str, at: float) -> Delivery:
        timeout_s = hook.timeout_s or self.config.timeout_s
        if hook.type == "vllm":
            base = hook.url.rstrip("/")
            body = {"lora_name": hook.name_prefix + version, "lora_path": adapter_dir}

            def send(client: httpx.Client) -> None:
                post_json(client, f"{base}/v1/load_lora_adapter", body, token_env=hook.token_env,
                          timeout_s=timeout_s)

            follow_up = None
            if hook.unload_previous and previous and previous != version:
                follow_up = lambda: self._unload_delivery(hook, previous, timeout_s)  # noqa: E731
            # NOTE: without unload_previous, a rollback to a version vLLM still serves gets an
            # error response from vLLM, because that LoRA name is already loaded.
            return Delivery(hook.name, "vllm", VERSION_ACTIVATED, send, self.config.max_attempts,
                            version=version, follow_up=follow_up)
        if hook.type == "webhook":
            body = {"event": VERSION_ACTIVATED, "version": version, "adapter_dir": adapter_dir,
                    "previous": previous, "reason": reason, "at": rfc3339(at)}

            def send(client: httpx.Client) -> None:
                post_json(client, hook.url, body, token_env=hook.token_env, timeout_s=timeout_s)

            return Delivery(hook.name, "webhook", VERSION_ACTIVATED, send, self.config.max_attempts, version=version)
        env = {"DRIFTLOOP_VERSION": version, "DRIFTLOOP_ADAPTER_DIR": adapter_dir,
               "DRIFTLOOP_PREVIOUS_VERSION": previous or "", "DRIFTLOOP_REASON": reason}
        argv = list(hook.command)

        def send(client: httpx.Client) -> None:
            run_command(argv, env, timeout_s)

        return Delivery(hook.name, "command", VERSION_ACTIVATED, send, self.config.max_attempts, version=version)

    def _unload_delivery(self, hook: VersionHookConfig, previous: str, timeout_s: float) -> Delivery:
        url = hook.url.rstrip("/") + "/v1/unload_lora_adapter"
        body = {"lora_name": hook.name_prefix + previous}

        def send(client: httpx.Client) -> None:
            post_json(client, url, body, token_env=hook.token_env, timeout_s=timeout_s)

        return Delivery(hook.name, "vllm", ADAPTER_UNLOADED, send, self.config.max_attempts, version=previous)

    # Worker

    def _enqueue(self, delivery: Delivery) -> None:
        try:
            self._queue.put_nowait(delivery)
        except queue.Full:
            self.metrics.notify_failures.labels(delivery.target_type, delivery.event).inc()
            logger.error("notification %s to %s dropped: %d notifications already wait to be sent",
                         delivery.event, delivery.target_name, QUEUE_SIZE)

    def _backoff(self, attempts: int) -> float:
        """Return the wait before the next attempt: initial * 2^(attempts - 1), at most backoff_max_s."""
        return min(self.config.backoff_initial_s * 2 ** (attempts - 1), self.config.backoff_max_s)

    def _work(self) -> None:
        deadline: float | None = None
        with httpx.Client() as client:
            while True:
                if self._stopping.is_set() and deadline is None:
                    deadline = time.monotonic() + self.drain_timeout_s
                if deadline is not None:
                    if self._queue.empty() and not self._retries:
                        return
                    if time.monotonic() >= deadline:
                        self._give_up()
                        return
                delivery = self._next_delivery(deadline)
                if delivery is not None:
                    self._attempt(client, delivery)

    def _next_delivery(self, deadline: float | None) -> Delivery | None:
        """Return a due retry or the next queued delivery; wait at most until the next retry is due."""
        now = time.monotonic()
        if self._retries and self._retries[0][0] <= now:
            return heapq.heappop(self._retries)[2]
        wait = 0.2
        if self._retries:
            wait = min(wait, self._retries[0][0] - now)
        if deadline is not None:
            wait = min(wait, max(deadline - now, 0.0))
        try:
            return self._queue.get(timeout=max(wait, 0.001))
        except queue.Empty:
            return None

    def _attempt(self, client: httpx.Client, delivery: Delivery) -> None:
        delivery.attempts += 1
        try:
            delivery.send(client)
        except DeliveryError as exc:
            if exc.retryable and delivery.attempts < delivery.max_attempts:
                delay = self._backoff(delivery.attempts)
                logger.info("notification %s to %s: attempt %d of %d failed (%s); retrying in %.1f s",
                            delivery.event, delivery.target_name, delivery.attempts, delivery.max_attempts, exc, delay)
                heapq.heappush(self._retries, (time.monotonic() + delay, next(self._sequence), delivery))
            else:
                self._failed(delivery, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug in one delivery must not stop the worker
            logger.exception("notification %s to %s failed unexpectedly", delivery.event, delivery.target_name)
            self._failed(delivery, f"{type(exc).__name__}: {exc}")
            return
        self._delivered(delivery)

    def _delivered(self, delivery: Delivery) -> None:
        self.metrics.notifications.labels(delivery.target_type, delivery.event).inc()
        logger.info("notification %s sent to %s (%s)", delivery.event, delivery.target_name,
                    delivery.run_id or delivery.version)
        self._audit(delivery, "notify_sent")
        if delivery.follow_up is not None:
            follow_up = delivery.follow_up()
            if follow_up is not None:
                heapq.heappush(self._retries, (time.monotonic(), next(self._sequence), follow_up))

    def _failed(self, delivery: Delivery, error: str) -> None:
        self.metrics.notify_failures.labels(delivery.target_type, delivery.event).inc()
        logger.error("notification %s to %s (%s) failed after %d attempts: %s", delivery.event,
                     delivery.target_name, delivery.run_id or delivery.version, delivery.attempts, error)
        self._audit(delivery, "notify_failed", error=error)

    def _audit(self, delivery: Delivery, action: str, error: str | None = None) -> None:
        if not delivery.audited:
            return
        detail = {"target": delivery.target_name, "target_type": delivery.target_type, "event": delivery.event,
                  "attempts": delivery.attempts}
        if error is not None:
            detail["error"] = error
        try:
            self.store.audit("notify", action, run_id=delivery.run_id, version=delivery.version, detail=detail)
        except Exception:  # noqa: BLE001 - the audit write must not stop the worker
            logger.exception("could not write the audit entry of notification %s to %s", delivery.event,
                             delivery.target_name)

    def _give_up(self) -> None:
        """Count and log the deliveries still waiting when the drain time ran out."""
        left = [item[2] for item in self._retries]
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._retries.clear()
        for delivery in left:
            self._failed(delivery, f"not sent: the daemon stopped after {delivery.attempts} attempts")
        logger.warning("notification worker stopped with %d notifications unsent: %s", len(left),
                       ", ".join(f"{delivery.event} to {delivery.target_name}" for delivery in left))
