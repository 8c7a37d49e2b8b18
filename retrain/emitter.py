"""Send prediction events to the monitor sidecar in batches, off the request path.

The serving process calls ``EventEmitter.emit`` once per prediction. ``emit`` only puts the
event on a bounded in-memory queue. A background thread takes events off the queue, groups
them into batches and POSTs each batch as ``{"events": [...]}`` to ``{url}/v1/events``.
Events are best effort: a full queue, a failed request or a rejection drops them, and each
drop is counted by reason.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter

logger = logging.getLogger(__name__)

EVENTS_PATH = "/v1/events"

# Label values of driftloop_server_events_dropped_total.
DROP_QUEUE_FULL = "queue_full"
DROP_SEND_FAILED = "send_failed"
DROP_REJECTED = "rejected"
DROP_REASONS = (DROP_QUEUE_FULL, DROP_SEND_FAILED, DROP_REJECTED)

# Minimum time between two WARNING lines about failed sends.
WARNING_INTERVAL_S = 10.0


class EventEmitter:
    """Bounded queue plus sender thread that POSTs prediction events to the monitor.

    ``url`` is the monitor's base URL, for example ``http://127.0.0.1:8081``. With ``url=None``
    sending is disabled: ``emit`` returns False and the event is neither queued nor counted.

    A batch is sent when it has ``batch_size`` events or when ``flush_interval_s`` seconds
    have passed since its first event was taken off the queue. Counters are available as the
    attributes ``sent``, ``dropped`` and ``dropped_by_reason``. They are also registered as
    Prometheus counters on ``registry``. When ``registry`` is None the emitter creates a
    private ``CollectorRegistry``, exposed as the ``registry`` attribute, so that several
    emitters in one process do not collide on the global default registry.
    """

    def __init__(
        self,
        url: str | None,
        *,
        batch_size: int = 64,
        flush_interval_s: float = 0.5,
        max_queue: int = 10000,
        timeout_s: float = 2.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be positive, got {flush_interval_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")

        self.url = url.rstrip("/") if url else None
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.registry = registry if registry is not None else CollectorRegistry()

        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lifecycle_lock = threading.Lock()

        self._counts_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        self.dropped_by_reason = {reason: 0 for reason in DROP_REASONS}

        # Failures since the last WARNING line, reported in the next one.
        self._failures_since_warning = 0
        self._events_lost_since_warning = 0
        self._last_warning_at: float | None = None

        self._sent_total = Counter(
            "driftloop_server_events_sent_total",
            "Prediction events accepted by the monitor.",
            registry=self.registry,
        )
        self._dropped_total = Counter(
            "driftloop_server_events_dropped_total",
            "Prediction events not delivered to the monitor, by reason "
            "(queue_full, send_failed, rejected).",
            ["reason"],
            registry=self.registry,
        )
        for reason in DROP_REASONS:
            self._dropped_total.labels(reason=reason)

    @property
    def enabled(self) -> bool:
        """True when a monitor URL is configured."""
        return self.url is not None

    @property
    def queued(self) -> int:
        """Approximate number of events waiting in the queue."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the sender thread. Calling it again, or with sending disabled, does nothing."""
        with self._lifecycle_lock:
            if self._closed:
                raise RuntimeError("EventEmitter.start() called after close()")
            if self._thread is not None or self.url is None:
                return
            self._thread = threading.Thread(
                target=self._run, name="driftloop-event-emitter", daemon=True
            )
            self._thread.start()
            logger.info(
                "event emitter started: url=%s batch_size=%d flush_interval_s=%s max_queue=%d",
                self.url,
                self.batch_size,
                self.flush_interval_s,
                self.max_queue,
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Send the queued events, then stop the sender thread.

        Waits at most ``timeout_s`` seconds. Events still queued after that are left to the
        daemon thread, which ends with the process. Later ``emit`` calls return False.
        """
        with self._lifecycle_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread

        self._stop.set()
        if thread is None:
            return
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning(
                "event emitter did not finish within %.1f s, %d events still queued",
                timeout_s,
                self._queue.qsize(),
            )
        else:
            logger.info(
                "event emitter stopped: sent=%d dropped=%s", self.sent, self.dropped_by_reason
            )

    def emit(self, event: dict[str, Any]) -> bool:
        """Queue one event for sending and return whether it was queued.

        Never blocks. When the queue is full the event is dropped and counted as
        ``queue_full``. Returns False without counting when sending is disabled or the
        emitter is closed. Events queued before ``start`` are sent once it runs.
        """
        if self.url is None or self._closed:
            return False
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._count_dropped(DROP_QUEUE_FULL, 1)
            return False
        return True

    def _count_dropped(self, reason: str, count: int) -> None:
        if count <= 0:
            return
        with self._counts_lock:
            self.dropped += count
            self.dropped_by_reason[reason] += count
        self._dropped_total.labels(reason=reason).inc(count)

    def _count_sent(self, count: int) -> None:
        if count <= 0:
            return
        with self._counts_lock:
            self.sent += count
        self._sent_total.inc(count)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                batch = self._next_batch()
                if batch:
                    self._send(client, batch)
                elif self._stop.is_set():
                    return

    def _next_batch(self) -> list[dict[str, Any]]:
        """Take up to batch_size events, waiting at most flush_interval_s after the first.

        Returns an empty list when no event arrived within 0.1 s. After
        ``close`` the wait is skipped, so the queue drains as fast as it can be sent.
        """
        try:
            # A short wait, so that the thread notices close() soon after the queue empties.
            first = self._queue.get(timeout=min(self.flush_interval_s, 0.1))
        except queue.Empty:
            return []

        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_size:
            remaining = 0.0 if self._stop.is_set() else deadline - time.monotonic()
            try:
                if remaining > 0:
                    batch.append(self._queue.get(timeout=remaining))
                else:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _send(self, client: httpx.Client, batch: list[dict[str, Any]]) -> None:
        # Each event is encoded on its own, so one event that is not valid JSON (NaN,
        # an unserialisable value) is dropped as rejected without losing the rest.
        encoded: list[str] = []
        for event in batch:
            try:
                encoded.append(json.dumps(event, allow_nan=False))
            except (TypeError, ValueError) as exc:
                self._count_dropped(DROP_REJECTED, 1)
                self._warn_rate_limited(f"event {event.get('id')!r} is not valid JSON: {exc}", 1)
        if not encoded:
            return

        body = '{"events":[' + ",".join(encoded) + "]}"
        try:
            response = client.post(
                self.url + EVENTS_PATH,
                content=body.encode("utf-8"),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            self._count_dropped(DROP_SEND_FAILED, len(encoded))
            self._warn_rate_limited(f"{type(exc).__name__}: {exc}", len(encoded))
            return

        if response.is_success:
            self._count_sent(len(encoded))
            return

        if response.status_code == 422:
            rejected = _count_rejected(response, len(encoded))
            self._count_sent(len(encoded) - rejected)
            self._count_dropped(DROP_REJECTED, rejected)
            self._warn_rate_limited(
                f"monitor rejected {rejected} of {len(encoded)} events: {response.text[:300]}",
                rejected,
            )
            return

        self._count_dropped(DROP_SEND_FAILED, len(encoded))
        self._warn_rate_limited(
            f"HTTP {response.status_code}: {response.text[:300]}", len(encoded)
        )

    def _warn_rate_limited(self, error: str, events_lost: int) -> None:
        """Log a failed send at WARNING, at most once per WARNING_INTERVAL_S.

        Failures in between are only counted, and the next line reports their number.
        Only the sender thread calls this, so the counters need no lock.
        """
        self._failures_since_warning += 1
        self._events_lost_since_warning += events_lost
        now = time.monotonic()
        if self._last_warning_at is not None and now - self._last_warning_at < WARNING_INTERVAL_S:
            return
        logger.warning(
            "sending events to %s failed (%d failures, %d events dropped since the last "
            "message; %d dropped in total): %s",
            self.url + EVENTS_PATH,
            self._failures_since_warning,
            self._events_lost_since_warning,
            self.dropped,
            error,
        )
        self._last_warning_at = now
        self._failures_since_warning = 0
        self._events_lost_since_warning = 0


def _count_rejected(response: httpx.Response, batch_len: int) -> int:
    """Return how many events of a batch the monitor rejected in a 422 response.

    Reads ``rejected`` (a list of per-event errors or a number) or ``accepted`` (a number)
    from the JSON body. Any other body, such as FastAPI's ``{"detail": [...]}`` for a request
    that failed validation as a whole, means that the whole batch was rejected.
    """
    try:
        body = response.json()
    except ValueError:
        return batch_len
    if not isinstance(body, dict):
        return batch_len

    rejected = body.get("rejected")
    if isinstance(rejected, list):
        return min(len(rejected), batch_len)
    if isinstance(rejected, int) and not isinstance(rejected, bool):
        return max(0, min(rejected, batch_len))

    accepted = body.get("accepted")
    if isinstance(accepted, int) and not isinstance(accepted, bool):
        return batch_len - max(0, min(accepted, batch_len))
    return batch_len
