"""EventEmitter against a real HTTP receiver and a closed port, both on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry

from retrain.emitter import EventEmitter


class _EventsHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length))
        server: EventReceiver = self.server  # type: ignore[assignment]
        with server.lock:
            server.requests.append((self.path, body))
        status, payload = server.respond(body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:  # noqa: A002 (http.server signature)
        pass


class EventReceiver(ThreadingHTTPServer):
    """Monitor stand-in that records each POST body and responds with ``respond(body)``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EventsHandler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict]] = []
        self.respond = lambda body: (200, {"accepted": len(body["events"])})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def events(self) -> list[dict]:
        with self.lock:
            return [event for _, body in self.requests for event in body["events"]]


@pytest.fixture
def receiver():
    server = EventReceiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def closed_port_url():
    """URL of a port on 127.0.0.1 that is bound but not listening, so connects are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _make_emitter(url, **kwargs) -> EventEmitter:
    kwargs.setdefault("registry", CollectorRegistry())
    return EventEmitter(url, **kwargs)


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _sample(registry: CollectorRegistry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_emitter_sends_batches_in_order(receiver):
    emitter = _make_emitter(receiver.url, batch_size=10, flush_interval_s=0.2)
    emitter.start()
    for index in range(25):
        assert emitter.emit({"id": f"e{index}", "value": index})
    emitter.close(timeout_s=10)

    assert [event["id"] for event in receiver.events()] == [f"e{index}" for index in range(25)]
    assert {path for path, _ in receiver.requests} == {"/v1/events"}
    assert all(len(body["events"]) <= 10 for _, body in receiver.requests)
    assert emitter.sent == 25
    assert emitter.dropped == 0
    assert _sample(emitter.registry, "driftloop_server_events_sent_total") == 25


def test_emitter_flushes_partial_batch_after_interval(receiver):
    emitter = _make_emitter(receiver.url, batch_size=64, flush_interval_s=0.2)
    emitter.start()
    try:
        for index in range(3):
            emitter.emit({"id": f"e{index}"})

        assert _wait_for(lambda: len(receiver.events()) == 3)
        # The receiver records the events before the emitter has read the response.
        assert _wait_for(lambda: emitter.sent == 3)
        assert len(receiver.requests) == 1
    finally:
        emitter.close()


def test_emitter_unreachable_monitor_counts_send_failed(closed_port_url):
    emitter = _make_emitter(closed_port_url, batch_size=50, flush_interval_s=0.1)
    emitter.start()

    started = time.perf_counter()
    queued = [emitter.emit({"id": f"e{index}"}) for index in range(1000)]
    elapsed = time.perf_counter() - started
    emitter.close(timeout_s=10)

    # Loose bound: emit() only enqueues, so 1000 calls take milliseconds.
    assert elapsed < 1.0
    assert all(queued)
    assert emitter.sent == 0
    assert emitter.dropped == 1000
    assert emitter.dropped_by_reason["send_failed"] == 1000
    assert (
        _sample(emitter.registry, "driftloop_server_events_dropped_total", reason="send_failed")
        == 1000
    )


def test_emitter_full_queue_drops_without_blocking(closed_port_url):
    emitter = _make_emitter(closed_port_url, max_queue=5)

    # Not started, so nothing drains the queue.
    queued = [emitter.emit({"id": f"e{index}"}) for index in range(20)]

    assert queued.count(True) == 5
    assert queued.count(False) == 15
    assert emitter.dropped_by_reason["queue_full"] == 15
    assert (
        _sample(emitter.registry, "driftloop_server_events_dropped_total", reason="queue_full")
        == 15
    )
    emitter.close()


def test_emitter_counts_rejected_from_422_list(receiver):
    receiver.respond = lambda body: (
        422,
        {"accepted": len(body["events"]) - 2, "rejected": [{"index": 0}, {"index": 3}]},
    )
    emitter = _make_emitter(receiver.url, batch_size=10, flush_interval_s=0.1)
    emitter.start()
    for index in range(10):
        emitter.emit({"id": f"e{index}"})
    emitter.close(timeout_s=10)

    assert len(receiver.events()) == 10
    assert emitter.dropped_by_reason["rejected"] == 2
    assert emitter.sent == 8
    assert _sample(emitter.registry, "driftloop_server_events_dropped_total", reason="rejected") == 2


def test_emitter_422_without_counts_rejects_batch(receiver):
    receiver.respond = lambda body: (422, {"detail": [{"loc": ["body", "events"]}]})
    emitter = _make_emitter(receiver.url, batch_size=10, flush_interval_s=0.1)
    emitter.start()
    for index in range(4):
        emitter.emit({"id": f"e{index}"})
    emitter.close(timeout_s=10)

    assert emitter.dropped_by_reason["rejected"] == 4
    assert emitter.sent == 0


def test_emitter_server_error_counts_send_failed(receiver):
    receiver.respond = lambda body: (500, {"detail": "database is locked"})
    emitter = _make_emitter(receiver.url, batch_size=10, flush_interval_s=0.1)
    emitter.start()
    for index in range(7):
        emitter.emit({"id": f"e{index}"})
    emitter.close(timeout_s=10)

    assert emitter.dropped_by_reason["send_failed"] == 7
    assert emitter.dropped_by_reason["rejected"] == 0
    assert emitter.sent == 0


def test_emitter_rejects_event_that_is_not_json(receiver):
    emitter = _make_emitter(receiver.url, batch_size=10, flush_interval_s=0.1)
    emitter.start()
    emitter.emit({"id": "good-1", "confidence": 0.5})
    emitter.emit({"id": "nan", "confidence": math.nan})
    emitter.emit({"id": "object", "payload": object()})
    emitter.emit({"id": "good-2", "confidence": 0.7})
    emitter.close(timeout_s=10)

    assert [event["id"] for event in receiver.events()] == ["good-1", "good-2"]
    assert emitter.sent == 2
    assert emitter.dropped_by_reason["rejected"] == 2


def test_emitter_rate_limits_failure_warnings(closed_port_url, caplog):
    emitter = _make_emitter(closed_port_url, batch_size=1, flush_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="retrain.emitter"):
        emitter.start()
        for index in range(5):
            emitter.emit({"id": f"e{index}"})
        emitter.close(timeout_s=10)

    failure_lines = [r for r in caplog.records if "sending events to" in r.getMessage()]
    assert emitter.dropped_by_reason["send_failed"] == 5
    assert len(failure_lines) == 1
    assert closed_port_url in failure_lines[0].getMessage()


def test_emitter_disabled_without_url():
    emitter = _make_emitter(None)
    emitter.start()

    assert not emitter.enabled
    assert emitter.emit({"id": "e0"}) is False
    assert emitter.sent == 0
    assert emitter.dropped == 0
    emitter.close()


def test_emitter_emit_after_close_returns_false(receiver):
    emitter = _make_emitter(receiver.url)
    emitter.start()
    emitter.close()

    assert emitter.emit({"id": "late"}) is False
    assert emitter.dropped == 0


def test_emitter_rejects_invalid_settings():
    with pytest.raises(ValueError, match="batch_size"):
        EventEmitter("http://127.0.0.1:1", batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        EventEmitter("http://127.0.0.1:1", max_queue=0)
