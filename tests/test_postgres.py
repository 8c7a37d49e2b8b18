"""The store's queries on SQLite and PostgreSQL, and the behaviours where the two differ."""

import threading
import time

import pytest
from sqlalchemy import create_engine, text

from monitor.errors import DriftloopError
from monitor.ingest import validate_events
from monitor.store import EVENT_COLUMNS, DatabaseUnavailableError, EventRow, Store, open_store, redacted_url


def event(event_id: str, window: str = "w1", received_at: float | None = None, **values) -> dict:
    return {"id": event_id, "timestamp": 1.0, "received_at": received_at or time.time(), "text": f"text {event_id}",
            "predicted_label": "transfer", "confidence": 0.75, "latency_ms": 3.0, "version": "v1",
            "window_id": window, **values}


@pytest.fixture()
def store(database_url):
    store = Store(database_url)
    yield store
    store.close()


def test_events_duplicates_and_pending_labels(store):
    store.add_pending_labels({"e2": "balance"})
    store.add_pending_labels({"e2": "transfer"})  # a later label for the same id replaces the earlier
    assert store.count_pending_labels() == 1

    inserted, duplicates, applied = store.insert_events([event("e1"), event("e2")])
    assert (inserted, duplicates, applied) == (2, [], 1)
    assert store.count_pending_labels() == 0
    inserted, duplicates, applied = store.insert_events([event("e1"), event("e3")])
    assert (inserted, duplicates, applied) == (1, ["e1"], 0)

    assert store.set_labels({"e1": "transfer"}) == 1
    assert store.count_labelled() == 2
    assert store.window_accuracy("w1") == (2, 1.0)
    assert [row[0] for row in store.labelled_events()] == ["e1", "e2"]


def test_insert_spans_statements_and_optional_fields(store):
    store._max_parameters = 999  # SQLite before 3.32: 90 events a statement
    store.insert_events([event(f"b{index}") for index in range(0, 200, 2)])
    rows = [event(f"b{index}") for index in range(200)]
    for row in rows[::3]:
        for name in ("latency_ms", "version", "window_id"):
            del row[name]

    inserted, duplicates, applied = store.insert_events(rows)

    assert (inserted, applied) == (100, 0)
    assert duplicates == [f"b{index}" for index in range(0, 200, 2)]
    assert store.known_event_ids([f"b{index}" for index in range(200)]) == {f"b{index}" for index in range(200)}
    assert {row["id"] for row in store.events_of_window("w1")} == {
        f"b{index}" for index in range(200) if index % 2 == 0 or index % 3 != 0}


def test_event_columns_cover_the_table():
    assert sorted(EVENT_COLUMNS) == sorted(column.name for column in EventRow.__table__.columns)


def test_timestamps_keep_double_precision(store):
    stamp = 1_750_000_000.123456
    store.insert_events([event("e1", received_at=stamp)])
    assert store.count_labelled(since=stamp) == 0
    store.set_labels({"e1": "transfer"})
    assert store.count_labelled(since=stamp) == 1
    assert store.count_labelled(since=stamp + 1e-6) == 0


def test_pending_labels_expire(store):
    store.add_pending_labels({"late": "transfer"})
    assert store.expire_pending_labels(older_than=time.time() - 60) == 0
    assert store.expire_pending_labels(older_than=time.time() + 1) == 1


def test_windows_and_watch(store):
    for index, ended in enumerate((10.0, 20.0, 30.0)):
        store.insert_window({"window_id": f"w{index}", "started_at": ended - 5, "ended_at": ended, "n_events": 40,
                             "status": "ok", "drifted": index == 2}, version="v1")
    assert [window["window_id"] for window in store.windows(limit=2)] == ["w2", "w1"]
    assert [window["window_id"] for window in store.last_windows_of_version("v1", 2)] == ["w1", "w2"]
    assert [window["window_id"] for window in store.windows_of_version("v1", since=15.0)] == ["w1", "w2"]
    assert store.window("w2")["drifted"] is True

    store.start_watch("v2", "v1", "r1", {"events": 0})
    store.update_watch("v2", "passed", {"events": 1000})
    watch = store.watch("v2")
    assert watch["status"] == "passed"
    assert watch["result"] == {"events": 1000}
    # Starting the watch again replaces the row.
    store.start_watch("v2", "v1", "r2", {"events": 5})
    assert store.watch("v2")["run_id"] == "r2"
    assert store.watch("v2")["status"] == "watching"


def test_old_events_and_windows_deleted(store):
    store.insert_events([event(f"old{index}", received_at=100.0 + index) for index in range(7)]
                        + [event("new", received_at=500.0)])
    store.set_labels({"old0": "transfer", "old1": "balance"})
    for window_id, ended in (("w-old", 100.0), ("w-new", 500.0)):
        store.insert_window({"window_id": window_id, "started_at": ended - 5, "ended_at": ended, "n_events": 4,
                             "status": "ok", "drifted": False}, version="v1")

    assert store.delete_old_events(400.0, labelled=False, limit=3) == 3
    assert store.delete_old_events(400.0, labelled=False, limit=3) == 2
    assert store.delete_old_events(400.0, labelled=False, limit=3) == 0
    assert store.known_event_ids([f"old{index}" for index in range(7)] + ["new"]) == {"old0", "old1", "new"}
    assert store.delete_old_events(400.0, labelled=True, limit=10) == 2
    assert store.known_event_ids(["old0", "old1", "new"]) == {"new"}
    assert store.delete_old_windows(400.0, limit=10) == 1
    assert [window["window_id"] for window in store.windows()] == ["w-new"]


def test_transition_run_has_one_winner(store):
    """Concurrent compare-and-set transitions of one run: exactly one succeeds."""
    store.create_run("r1", "pending_approval", "v1", {"reason": "test"})
    barrier = threading.Barrier(8)
    results = []

    def approve(index: int) -> None:
        barrier.wait()
        results.append(store.transition_run("r1", ("pending_approval",), "approved", actor=f"user{index}",
                                            action="run_approved"))

    threads = [threading.Thread(target=approve, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert [entry["action"] for entry in store.audit_log(run_id="r1")] == ["run_approved"]


def test_audit_ids_increase(store):
    for index in range(3):
        store.audit("test", "rollback" if index else "activate", version=f"v{index}")
    assert store.last_audit_id() == 3
    assert store.audit_ids(["rollback"]) == [2, 3]
    assert [entry["id"] for entry in store.audit_log(limit=2, latest=True)] == [2, 3]


def test_ingest_rejects_nul_and_long_version():
    """PostgreSQL cannot store NUL and enforces column lengths, so ingest rejects such events first."""
    rows = [{"id": "a\x00b", "text": "hello", "label": "x", "confidence": 0.9},
            {"id": "ok1", "text": "hel\x00lo", "label": "x", "confidence": 0.9},
            {"id": "ok2", "text": "hello", "label": "x", "confidence": 0.9, "version": "v" * 129}]
    result = validate_events({"events": rows}, ["x"], max_items=10, max_text_chars=100)
    assert [error.field for error in result.errors] == ["events[0].id", "events[1].text", "events[2].version"]
    assert not result.valid


def test_unreachable_database_names_url_without_password():
    url = "postgresql+psycopg://driftloop:s3cret@127.0.0.1:1/driftloop"
    with pytest.raises(DatabaseUnavailableError) as caught:
        Store(url)
    message = str(caught.value)
    assert "s3cret" not in message
    assert "postgresql+psycopg://driftloop:***@127.0.0.1:1/driftloop" in message


def test_open_store_retries_with_backoff(caplog):
    url = "postgresql+psycopg://driftloop:s3cret@127.0.0.1:1/driftloop"
    delays = []
    with pytest.raises(DatabaseUnavailableError, match="gave up after 4 attempts"):
        open_store(url, attempts=4, initial_delay_s=0.5, max_delay_s=1.5, sleep=delays.append)
    assert delays == [0.5, 1.0, 1.5]
    assert "attempt 1 of 4" in caplog.text
    assert "s3cret" not in caplog.text


def test_invalid_url_is_named():
    with pytest.raises(DriftloopError, match="database_url is not a valid SQLAlchemy URL") as caught:
        Store("nonsense:secret")
    assert "secret" not in str(caught.value)
    assert redacted_url("postgresql://u:p@h/d") == "postgresql://u:***@h/d"


def test_postgres_string_lengths_enforced(postgres_url):
    """PostgreSQL rejects values longer than a column's length, which SQLite stores."""
    store = Store(postgres_url)
    try:
        with pytest.raises(Exception, match="too long"):
            store.create_run("r" * 65, "queued", None, {})
    finally:
        store.close()


def test_postgres_float_columns_are_double(postgres_url):
    Store(postgres_url).close()
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        kinds = dict(connection.execute(text(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'events'")).all())
    engine.dispose()
    assert kinds["received_at"] == "double precision"
    assert kinds["timestamp"] == "double precision"


# A database lost while running, and one unreachable at start-up.

@pytest.fixture()
def own_postgres():
    """A PostgreSQL server of this test alone, so the test may stop and start it."""
    from tests.conftest import PostgresServer, create_database, postgres_bin_dir, postgres_unavailable

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        postgres_unavailable("the database-loss test needs the PostgreSQL server binaries (initdb, pg_ctl)")
    server = PostgresServer(bin_dir)
    server.start()
    try:
        yield server, create_database(server.url())
    finally:
        try:
            server.stop()
        except RuntimeError:
            pass  # already stopped by a failed test
        server.remove()


def post_events(client, start: int, count: int, labels: list[str]):
    rows = [{"id": f"outage-{index}", "text": f"please move money between accounts {index}",
             "label": labels[0], "confidence": 0.9} for index in range(start, start + count)]
    return client.post("/v1/events", json={"events": rows})


def metric(daemon, name: str, **labels) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_database_loss_buffers_events_and_flushes(own_postgres, tmp_path, tiny_model_dir, clinc_dir, caplog):
    from fastapi.testclient import TestClient

    from monitor.api import create_app
    from monitor.config import parse_config
    from retrain.bootstrap import bootstrap
    from tests.conftest import started_daemon, tiny_deployment_config

    server, url = own_postgres
    caplog.set_level("INFO", logger="monitor.event_buffer")
    raw = tiny_deployment_config(tmp_path / "state", tiny_model_dir)
    raw["database_url"] = url
    raw["database"] = {"buffer_events": 30}
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)
    daemon = started_daemon(config)
    try:
        client = TestClient(create_app(daemon))
        labels = daemon.labels
        assert post_events(client, 0, 5, labels).status_code == 200

        server.stop()
        # Events are accepted into the buffer while the database is away.
        response = post_events(client, 5, 20, labels)
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 20
        assert metric(daemon, "driftloop_store_buffered_events") == 20
        assert metric(daemon, "driftloop_store_errors_total", operation="ingest_events") >= 1
        assert "holding 20 events in memory" in caplog.text
        # A resent event that is still buffered is a duplicate, not a second copy.
        again = post_events(client, 24, 1, labels)
        assert again.json()["duplicates"] == 1

        # A full buffer rejects the batch with 503 instead of dropping it.
        full = post_events(client, 100, 11, labels)
        assert full.status_code == 503
        assert "event buffer is full (20 of 30 events, database.buffer_events)" in full.json()["error"]
        assert metric(daemon, "driftloop_store_buffered_events") == 20

        # Labels and approvals are never held: the caller gets an error.
        labelled = client.post("/v1/labels", json={"labels": [{"id": "outage-0", "label": labels[0]}]})
        assert labelled.status_code == 503
        assert "no label of this request was stored" in labelled.json()["error"]
        status = client.get("/v1/status").json()
        assert status["store"] == {"reachable": False, "buffered_events": 20}
        daemon.tick()  # a check with the database away logs and counts, and does not raise
        assert metric(daemon, "driftloop_store_errors_total", operation="scheduled_check") >= 1

        server.start()
        daemon.tick()
        assert metric(daemon, "driftloop_store_buffered_events") == 0
        assert "wrote 20 buffered events" in caplog.text
        assert daemon.store.known_event_ids([f"outage-{index}" for index in range(25)]) == \
            {f"outage-{index}" for index in range(25)}
        labelled = client.post("/v1/labels", json={"labels": [{"id": "outage-7", "label": labels[0]}]})
        assert labelled.status_code == 200
        assert labelled.json()["accepted"] == 1
        assert daemon.leadership.is_leader
    finally:
        daemon.stop()


def test_run_exits_when_database_unreachable(tmp_path, capsys):
    from monitor.cli import main
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    config = tmp_path / "c.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"database_url: postgresql+psycopg://driftloop:hunter2@127.0.0.1:{port}/driftloop\n"
        "database: {connect_attempts: 2, connect_backoff_initial_s: 0.1, connect_backoff_max_s: 0.2}\n"
    )
    assert main(["run", "--config", str(config), "--port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert f"cannot connect to the database postgresql+psycopg://driftloop:***@127.0.0.1:{port}/driftloop" in error
    assert "gave up after 2 attempts" in error
    assert "hunter2" not in error
