"""Retention passes on a real SQLite store: batches, the backlog, settings of 0, and the metric."""

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from monitor import retention
from monitor.config import DatabaseConfig
from monitor.retention import Retention
from monitor.store import Store

DAY = 86400.0
NOW = 100 * DAY


def event(event_id: str, received_at: float) -> dict:
    return {"id": event_id, "timestamp": received_at, "received_at": received_at, "text": f"text {event_id}",
            "predicted_label": "transfer", "confidence": 0.8, "latency_ms": 2.0, "version": "v1", "window_id": "w1"}


@pytest.fixture()
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'retention.db'}")
    # 7 unlabelled events and 2 labelled ones are 10 days old, 1 event is an hour old.
    store.insert_events([event(f"old{index}", NOW - 10 * DAY) for index in range(9)] + [event("recent", NOW - 3600)])
    store.set_labels({"old7": "transfer", "old8": "balance"})
    for window_id, ended in (("w-old", NOW - 100 * 3600), ("w-recent", NOW - 3600)):
        store.insert_window({"window_id": window_id, "started_at": ended - 60, "ended_at": ended, "n_events": 5,
                             "status": "ok", "drifted": False}, version="v1")
    yield store
    store.close()


def deleted_counter() -> Counter:
    return Counter("driftloop_retention_deleted_total", "test", ["record"], registry=CollectorRegistry())


def counted(counter: Counter, record: str) -> float:
    return counter.labels(record)._value.get()


def test_pass_deletes_expired_records(store, caplog):
    settings = DatabaseConfig(event_retention_s=7 * DAY, labelled_event_retention_s=30 * DAY, window_retention_s=2 * DAY)
    counter = deleted_counter()
    clock = [NOW]
    keeper = Retention(settings, store, counter, clock=lambda: clock[0])

    with caplog.at_level(logging.INFO, logger="monitor.retention"):
        counts = keeper.run_if_due()

    assert counts == {"unlabelled_event": 7, "labelled_event": 0, "window": 1}
    assert store.known_event_ids([f"old{index}" for index in range(9)] + ["recent"]) == {"old7", "old8", "recent"}
    assert [window["window_id"] for window in store.windows()] == ["w-recent"]
    assert counted(counter, "unlabelled_event") == 7
    assert counted(counter, "window") == 1
    assert counted(counter, "labelled_event") == 0
    assert "deleted 7 unlabelled_event records" in caplog.text
    assert "(database.event_retention_s)" in caplog.text

    clock[0] = NOW + retention.INTERVAL_S - 1
    assert keeper.run_if_due() == {}
    clock[0] = NOW + 21 * DAY + retention.INTERVAL_S
    assert keeper.run_if_due()["labelled_event"] == 2


def test_zero_keeps_everything(store):
    settings = DatabaseConfig(event_retention_s=0, labelled_event_retention_s=0, window_retention_s=0)

    assert Retention(settings, store, deleted_counter(), clock=lambda: NOW).run_if_due() == {}
    assert len(store.known_event_ids([f"old{index}" for index in range(9)])) == 9
    assert len(store.windows()) == 2


def test_backlog_runs_again_next_check(store, monkeypatch):
    monkeypatch.setattr(retention, "BATCH_ROWS", 2)
    monkeypatch.setattr(retention, "BATCHES_PER_PASS", 2)
    settings = DatabaseConfig(event_retention_s=DAY, labelled_event_retention_s=0, window_retention_s=0)
    keeper = Retention(settings, store, deleted_counter(), clock=lambda: NOW)

    assert keeper.run_if_due() == {"unlabelled_event": 4}
    assert keeper.due_at == NOW
    assert keeper.run_if_due() == {"unlabelled_event": 3}
    assert keeper.due_at == NOW + retention.INTERVAL_S
