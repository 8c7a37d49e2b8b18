"""Running the sidecar: readiness, the SIGTERM drain, resource limits, the Kubernetes example."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from monitor.api import create_app
from monitor.config import parse_config
from monitor.daemon import MonitorDaemon
from monitor.resources import (
    MIB,
    MemoryWatch,
    ResourceMetrics,
    TokenBucket,
    apply_thread_limits,
    embedding_cap,
    limit_sample,
)
from monitor.sampling import Observation, WindowSampler
from monitor.shutdown import ShutdownDrain
from monitor.store import Store
from retrain.bootstrap import bootstrap
from tests.conftest import REPO_ROOT, tiny_deployment_config

LONG_TEXT = ("please tell me every single detail about the transfer of money that i made yesterday evening "
             "from my savings account to the checking account of my brother who lives abroad {}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir, clinc_dir):
    """A bootstrapped tiny deployment; each test builds its config from ``raw``."""
    state = tmp_path_factory.mktemp("operations-state")
    raw = tiny_deployment_config(state, tiny_model_dir)
    raw["detectors"] = {"embedding": {"reference_sample": 60}, "enabled": ["token_length", "embedding", "confidence"]}
    bootstrap(parse_config(raw), log=lambda message: None)
    return raw


def with_changes(raw: dict, **sections) -> dict:
    """Return a copy of ``raw`` with each section's keys updated."""
    result = json.loads(json.dumps(raw))
    for section, values in sections.items():
        if isinstance(values, dict):
            result[section] = {**result.get(section, {}), **values}
        else:
            result[section] = values
    return result


def events(count: int, offset: int, text: str = "what is my balance {}") -> dict:
    rows = [{"id": f"op-{i}", "text": text.format(i), "label": "balance", "confidence": 0.9, "latency_ms": 4.0}
            for i in range(offset, offset + count)]
    return {"events": rows}


@pytest.fixture()
def fresh(deployment, tmp_path) -> dict:
    """The deployment's config with its own copy of the database, so tests see only their own events."""
    source = Path(deployment["state_dir"]) / "driftloop.db"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{source}{suffix}").is_file():
            shutil.copy(f"{source}{suffix}", tmp_path / f"driftloop.db{suffix}")
    return {**deployment, "database_url": f"sqlite:///{tmp_path / 'driftloop.db'}"}


@pytest.fixture()
def daemon(fresh):
    daemon = MonitorDaemon(parse_config(fresh), registry=CollectorRegistry())
    yield daemon
    daemon.stop(timeout_s=5)


# Readiness and ingest while starting or draining


def test_readyz_names_startup_phase(daemon):
    client = TestClient(create_app(daemon))
    waiting = client.get("/readyz")
    assert waiting.status_code == 503
    assert waiting.json()["status"] == "starting"
    assert waiting.json()["reason"] == "waiting to start"
    refused = client.post("/v1/events", json=events(1, 0))
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"

    daemon.start(background=False)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["active_version"] == "v1"


def test_draining_refuses_ingest(daemon):
    daemon.start(background=False)
    client = TestClient(create_app(daemon))
    daemon.draining = True

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "draining", "reason": "the sidecar is shutting down"}
    for path, body in (("/v1/events", events(2, 0)), ("/v1/labels", {"labels": [{"id": "op-0", "label": "transfer"}]})):
        response = client.post(path, json=body)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        assert "shutting down" in response.json()["error"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert daemon.store.known_event_ids(["op-0", "op-1"]) == set()


def test_drain_evaluates_closed_windows(daemon):
    daemon.start(background=False)
    # Two full windows of 40 and a part-filled third one.
    result = daemon.ingest_events(events(90, 1000))
    assert not result.errors
    assert len(daemon.pending) == 2
    closed = [window.id for window in daemon.pending]
    open_window = daemon.window.id

    drain = ShutdownDrain(daemon, grace_s=60, on_done=lambda: None, on_force=lambda: None)
    summary = drain.drain()

    assert summary["windows_evaluated"] == closed
    assert [window["window_id"] for window in daemon.store.windows(limit=10)] == list(reversed(closed))
    assert summary["windows_left"] == [{"id": open_window, "events": 10, "closed": False}]
    entry = daemon.store.audit_log(limit=1, latest=True)[0]
    assert entry["action"] == "windows_not_evaluated"
    assert entry["detail"]["windows"][0]["id"] == open_window
    assert daemon.draining


def test_window_close_mid_batch_duplicates(daemon):
    """Ids already stored do not count: the window closes at exactly window_size new events."""
    daemon.start(background=False)
    daemon.ingest_events(events(30, 3000))
    first = daemon.window.id
    # 25 events: the first 5 are stored already, 10 of the 20 new ones fill the window (40).
    result = daemon.ingest_events(events(25, 3025))

    assert result.duplicates == [f"op-{i}" for i in range(3025, 3030)]
    assert [window.id for window in daemon.pending] == [first]
    assert daemon.pending[0].sampler.count == 40
    assert daemon.window.sampler.count == 10
    stored_first = {row["id"] for row in daemon.store.events_of_window(first)}
    assert stored_first == {f"op-{i}" for i in range(3000, 3040)}
    stored_second = {row["id"] for row in daemon.store.events_of_window(daemon.window.id)}
    assert stored_second == {f"op-{i}" for i in range(3040, 3050)}


def test_drain_out_of_time_records_windows(daemon):
    daemon.start(background=False)
    daemon.ingest_events(events(80, 2000))
    closed = [window.id for window in daemon.pending]
    now = [100.0]
    drain = ShutdownDrain(daemon, grace_s=10, on_done=lambda: None, on_force=lambda: None, clock=lambda: now[0])
    drain.started_at = 92.0  # 8 of 10 s are gone, and the 2 s close reserve takes the rest

    summary = drain.drain()

    assert summary["windows_evaluated"] == []
    assert [window["id"] for window in summary["windows_left"]] == closed
    assert daemon.store.windows(limit=10) == []
    assert daemon.store.known_event_ids([f"op-{i}" for i in range(2000, 2080)]) == {f"op-{i}" for i in range(2000, 2080)}


def _restarted(config_raw: dict) -> MonitorDaemon:
    restarted = MonitorDaemon(parse_config(config_raw), registry=CollectorRegistry())
    restarted.start(background=False)
    assert restarted.ready, restarted.startup_error
    return restarted


def test_restart_takes_back_windows_left_by_shutdown(fresh):
    first = MonitorDaemon(parse_config(fresh), registry=CollectorRegistry())
    first.start(background=False)
    first.ingest_events(events(95, 3000))  # two closed windows of 40 and 15 events in the open one
    closed = [window.id for window in first.pending]
    open_window = first.window.id
    now = [100.0]
    drain = ShutdownDrain(first, grace_s=10, on_done=lambda: None, on_force=lambda: None, clock=lambda: now[0])
    drain.started_at = 92.0  # no time to evaluate
    drain.drain()
    first.stop(timeout_s=5)

    second = _restarted(fresh)
    try:
        assert [window.id for window in second.pending] == closed
        assert [window.sampler.count for window in second.pending] == [40, 40]
        assert second.window.id == open_window
        assert second.window.sampler.count == 15
        # The open window goes on filling under its id and closes at the window size.
        second.ingest_events(events(25, 4000))
        assert [window.id for window in second.pending] == [*closed, open_window]
        second.tick()
        assert {window["window_id"] for window in second.store.windows(limit=10)} == {*closed, open_window}
        entry = second.store.audit_log(limit=5, latest=True)
        restored = [item for item in entry if item["action"] == "windows_restored"][-1]
        assert [item["id"] for item in restored["detail"]["windows"]] == [*closed, open_window]
    finally:
        second.stop(timeout_s=5)

    # A second restart does not take the same windows again.
    third = _restarted(fresh)
    try:
        assert not third.pending
        assert third.window.sampler.count == 0
    finally:
        third.stop(timeout_s=5)


def test_labels_since_window_start_include_the_first_batch(daemon):
    """The trigger counts labels since the streak's first window started; that window's first batch counts."""
    daemon.start(background=False)
    daemon.ingest_events(events(40, 5000))
    window = daemon.pending[-1]
    result = daemon.ingest_labels({"labels": [{"id": f"op-{i}", "label": "balance"} for i in range(5000, 5040)]})
    assert result.accepted == 40

    assert daemon.store.count_labelled(since=window.sampler.started_at) == 40


def store_old_events(daemon: MonitorDaemon, days: float) -> list[str]:
    """Store two events received ``days`` ago, as a replica would have, and return their ids."""
    received = time.time() - days * 86400
    rows = [{"id": f"aged-{index}", "timestamp": received, "received_at": received, "text": "old balance question",
             "predicted_label": "balance", "confidence": 0.9, "latency_ms": 3.0, "version": daemon.active_name,
             "window_id": "w-aged"} for index in range(2)]
    daemon.store.insert_events(rows)
    return [row["id"] for row in rows]


def retention_deleted(daemon: MonitorDaemon) -> float:
    return daemon.metrics.registry.get_sample_value("driftloop_retention_deleted_total",
                                                    {"record": "unlabelled_event"})


def test_leader_check_deletes_expired_events(daemon):
    daemon.start(background=False)
    aged = store_old_events(daemon, days=8)
    daemon.ingest_events(events(5, 6000))

    daemon.tick()

    assert daemon.store.known_event_ids(aged) == set()
    assert len(daemon.store.known_event_ids([f"op-{i}" for i in range(6000, 6005)])) == 5
    assert retention_deleted(daemon) == 2


def test_follower_keeps_expired_events(daemon, monkeypatch):
    daemon.start(background=False)
    monkeypatch.setattr(daemon.leadership, "refresh", lambda: False)
    aged = store_old_events(daemon, days=8)

    daemon.tick()

    assert daemon.store.known_event_ids(aged) == set(aged)
    assert retention_deleted(daemon) == 0


def test_restart_leaves_windows_of_another_version(fresh, caplog):
    store = Store(fresh["database_url"])
    store.audit("daemon", "windows_not_evaluated", version="v0",
                detail={"reason": "sidecar shutdown", "host": socket.gethostname(),
                        "windows": [{"id": "w-old", "events": 12, "closed": True}]})
    store.close()

    with caplog.at_level("WARNING", logger="monitor.daemon"):
        restarted = _restarted(fresh)
    try:
        assert not restarted.pending
        assert "they belong to version v0, and version v1 is active" in caplog.text
    finally:
        restarted.stop(timeout_s=5)


def test_drain_refuses_new_retrain(daemon):
    daemon.start(background=False)
    daemon.draining = True
    assert daemon._retrain_refused("2 drifted windows in a row")
    assert daemon.store.audit_log(limit=1, latest=True)[0]["action"] == "retrain_refused"
    assert daemon.resource_metrics.retrains_refused.labels("shutdown")._value.get() == 1
    assert daemon.store.runs(limit=1) == []


# SIGTERM to a real `driftloop run` during a retrain


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, timeout_s: float, what: str, process, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"driftloop run exited with {process.returncode} while waiting for {what}:\n"
                                 + log.read_text())
        try:
            value = check()
        except Exception:  # noqa: BLE001 - the server may not listen yet
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; log:\n" + log.read_text()[-5000:])


@pytest.mark.slow
def test_sigterm_cancels_retrain_and_exits(fresh, tmp_path):
    import httpx

    grace = 20.0
    raw = with_changes(
        fresh,
        monitor={"window_size": 40, "sample_size": 40, "check_interval_s": 1, "shutdown_grace_s": grace},
        detectors={"enabled": ["token_length"], "embedding": {"reference_sample": 60}},
        trigger={"consecutive_windows": 1, "min_labels": 10, "cooldown_s": 0},
        retrain={"replay_per_label": 2, "sweep": {"enabled": False},
                 "training": {"epochs": 1000, "early_stopping_patience": 1000}},
    )
    config_path = tmp_path / "driftloop.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DRIFTLOOP_") or key == "DRIFTLOOP_DATA"}
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "monitor.cli", "run", "--config", str(config_path),
                                    "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 180, "readiness", process, log)
        labels = httpx.get(f"{base}/v1/versions", timeout=5).json()
        assert labels["active"] == "v1"
        # Labels first: they wait for their events, so the drifted windows are labelled when evaluated.
        # The trigger counts labelled events received after the window's first event, hence two batches.
        ids = [f"long-{i}" for i in range(80)]
        posted = httpx.post(f"{base}/v1/labels", json={"labels": [{"id": i, "label": "transfer"} for i in ids]},
                            timeout=10)
        assert posted.json()["pending"] == 80
        batch = [{"id": event_id, "text": LONG_TEXT.format(i), "label": "transfer", "confidence": 0.9}
                 for i, event_id in enumerate(ids)]
        assert httpx.post(f"{base}/v1/events", json={"events": batch[:1]}, timeout=10).status_code == 200
        assert httpx.post(f"{base}/v1/events", json={"events": batch[1:]}, timeout=10).status_code == 200

        def training_run():
            runs = httpx.get(f"{base}/v1/retrains", timeout=5).json()["runs"]
            return runs[0] if runs and runs[0]["state"] == "training" else None

        run = wait_for(training_run, 120, "a retrain in state training", process, log)
        metrics_text = wait_for(lambda: (lambda text: text if "driftloop_retrain_step " in text and
                                         "driftloop_retrain_step 0.0" not in text else None)(
            httpx.get(f"{base}/metrics", timeout=5).text), 60, "training steps", process, log)
        assert "driftloop_retrain_state{driftloop_retrain_state=\"training\"} 1.0" in metrics_text
        late = [{"id": f"late-{i}", "text": f"what is my balance {i}", "label": "balance", "confidence": 0.8}
                for i in range(5)]
        assert httpx.post(f"{base}/v1/events", json={"events": late}, timeout=10).status_code == 200

        sent = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=grace + 30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()

    assert process.returncode == 0, output
    assert elapsed < grace, output
    assert "draining" in output
    state = Path(raw["state_dir"])
    store = Store(raw["database_url"])
    try:
        finished = store.get_run(run["id"])
        assert finished["state"] == "cancelled"
        assert finished["error"] == "cancelled: sidecar shutdown"
        every_id = ids + [event["id"] for event in late]
        assert store.known_event_ids(every_id) == set(every_id)
    finally:
        store.close()
    assert not (state / "runs" / run["id"]).exists()


# Resource limits


@pytest.fixture()
def restore_threads():
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    torch_threads = torch.get_num_threads()
    pools = {info["prefix"]: info["num_threads"] for info in threadpool_info()}
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    yield
    torch.set_num_threads(torch_threads)
    threadpool_limits(limits=pools)
    if parallelism is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def test_thread_limits_applied(restore_threads):
    import torch
    from threadpoolctl import threadpool_info

    resources = parse_config({"resources": {"inference_threads": 1, "blas_threads": 1,
                                            "tokenizers_parallelism": True}}).resources
    applied = apply_thread_limits(resources)

    assert torch.get_num_threads() == 1
    assert applied["torch_threads"] == 1
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    pools = threadpool_info()
    assert pools
    assert {info["num_threads"] for info in pools} == {1}


def test_daemon_applies_inference_threads(fresh, restore_threads):
    import torch

    torch.set_num_threads(2)
    daemon = MonitorDaemon(parse_config(with_changes(fresh, resources={"inference_threads": 1})),
                           registry=CollectorRegistry())
    try:
        daemon.start(background=False)
        assert daemon.ready, daemon.startup_error
        assert torch.get_num_threads() == 1
    finally:
        daemon.stop(timeout_s=5)


def test_memory_watch_crossings(caplog):
    readings = iter([100 * MIB, 10 * MIB])
    metrics = ResourceMetrics(CollectorRegistry())
    watch = MemoryWatch(64, metrics, measure=lambda: next(readings))
    caplog.set_level("INFO", logger="monitor.resources")

    assert watch.over_limit()
    assert metrics.memory_over_soft_limit._value.get() == 1
    assert metrics.resident_memory._value.get() == 100 * MIB
    assert not watch.over_limit()
    assert metrics.memory_over_soft_limit._value.get() == 0
    messages = [record.getMessage() for record in caplog.records]
    assert "above resources.memory_soft_limit_mb" in messages[0]
    assert "below resources.memory_soft_limit_mb again" in messages[1]


def test_memory_limit_refuses_retrain(fresh):
    # Any Python process with torch loaded is above 64 MiB resident.
    daemon = MonitorDaemon(parse_config(with_changes(fresh, resources={"memory_soft_limit_mb": 64})),
                           registry=CollectorRegistry())
    try:
        daemon.start(background=False)
        assert daemon._retrain_refused("2 drifted windows in a row")
        entry = daemon.store.audit_log(limit=1, latest=True)[0]
        assert entry["action"] == "retrain_refused"
        assert "memory_soft_limit_mb (64 MiB)" in entry["detail"]["reason"]
        assert daemon.resource_metrics.retrains_refused.labels("memory")._value.get() == 1
        assert daemon.store.runs(limit=1) == []
    finally:
        daemon.stop(timeout_s=5)


def test_no_memory_limit_allows_retrain(daemon):
    daemon.start(background=False)
    assert not daemon._retrain_refused("2 drifted windows in a row")


@pytest.mark.parametrize("rate, span, expected", [
    (None, 100.0, None),
    (2.0, 100.0, 200),
    (2.0, 104.0, 200),   # 208 rounds down to a multiple of 50
    (1.0, 10.0, 30),     # below min_samples, so min_samples
    (100.0, 100.0, 500),  # above the sample size, so the sample size
], ids=["no-budget", "exact", "rounded-down", "floor", "ceiling"])
def test_embedding_cap(rate, span, expected):
    assert embedding_cap(rate, span, sample_size=500, min_samples=30) == expected


def test_limit_sample_keeps_window_figures():
    sampler = WindowSampler(100, seed=0)
    for i in range(100):
        sampler.add(Observation(f"e{i}", f"text {i}", "balance", confidence=i / 100, latency_ms=float(i)))

    limited = limit_sample(sampler, 40, seed=3)

    ids = [obs.event_id for obs in limited.sample]
    assert len(ids) == 40
    assert len(set(ids)) == 40
    assert set(ids) <= {obs.event_id for obs in sampler.sample}
    assert ids == [obs.event_id for obs in limit_sample(sampler, 40, seed=3).sample]
    assert limited.count == 100
    assert limited.mean_confidence == sampler.mean_confidence
    assert limited.latency_quantiles() == sampler.latency_quantiles()
    assert len(sampler.sample) == 100
    assert limit_sample(sampler, None, seed=3) is sampler


@pytest.mark.parametrize("budget, tested, cap", [(None, 40, None), (0.5, 30, 30)], ids=["no-budget", "budget"])
def test_window_reports_embedded_sample(fresh, budget, tested, cap):
    daemon = MonitorDaemon(parse_config(with_changes(fresh, resources={"embedding_max_texts_per_s": budget})),
                           registry=CollectorRegistry())
    try:
        daemon.start(background=False)
        daemon.ingest_events(events(40, 3000))
        daemon.tick()
        window = daemon.store.windows(limit=1)[0]
        assert window["n_sampled"] == tested
        assert window["sampled_texts"] == 40
        assert window["embedding_cap"] == cap
        assert daemon.resource_metrics.window_embedded._value.get() == tested
    finally:
        daemon.stop(timeout_s=5)


# Configuration: environment variables and the generated reference page


def test_env_overrides_file(tmp_path):
    from monitor.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("server:\n  monitor_url: http://127.0.0.1:8081\n  port: 8080\nmonitor:\n  shutdown_grace_s: 30\n")
    environ = {"DRIFTLOOP_DATABASE_URL": "postgresql://driftloop:secret@127.0.0.1:5432/driftloop",
               "DRIFTLOOP_SERVER__MONITOR_URL": "null", "DRIFTLOOP_MONITOR__SHUTDOWN_GRACE_S": "12.5",
               "DRIFTLOOP_RESOURCES__INFERENCE_THREADS": "2", "DRIFTLOOP_SERVER__PORT": "",
               "DRIFTLOOP_DATA": "/data", "DRIFTLOOP_API_TOKEN": "token"}

    config = load_config(path, environ=environ)

    assert config.db_url == "postgresql://driftloop:secret@127.0.0.1:5432/driftloop"
    assert config.server.monitor_url is None
    assert config.monitor.shutdown_grace_s == 12.5
    assert config.resources.inference_threads == 2
    assert config.server.port == 8080


def test_env_error_names_variable(tmp_path):
    from monitor.config import load_config
    from monitor.errors import ConfigError

    with pytest.raises(ConfigError) as bad_port:
        load_config(None, environ={"DRIFTLOOP_SERVER__PORT": "eighty"})
    assert "server.port (from DRIFTLOOP_SERVER__PORT): invalid value 'eighty'" in str(bad_port.value)

    with pytest.raises(ConfigError) as clash:
        load_config(None, environ={"DRIFTLOOP_SERVER__PORT": "8081"})
    assert "server.port (from DRIFTLOOP_SERVER__PORT): 8081 is also monitor.port" in str(clash.value)

    with pytest.raises(ConfigError) as typo:
        load_config(None, environ={"DRIFTLOOP_SERVER__MONITOR_ULR": "http://127.0.0.1:1"})
    assert "DRIFTLOOP_SERVER__MONITOR_ULR names no config key" in str(typo.value)

    with pytest.raises(ConfigError) as listed:
        load_config(None, environ={"DRIFTLOOP_DETECTORS__ENABLED": "token_length"})
    assert "DRIFTLOOP_DETECTORS__ENABLED" in str(listed.value)

    with pytest.raises(ConfigError) as top_level_typo:
        load_config(None, environ={"DRIFTLOOP_DATABASEURL": "postgresql+psycopg://db/driftloop"})
    assert "DRIFTLOOP_DATABASEURL names no config key; did you mean DRIFTLOOP_DATABASE_URL?" in str(top_level_typo.value)
    assert "postgresql" not in str(top_level_typo.value)


def test_env_other_variables_left_alone(tmp_path):
    from monitor.config import load_config

    environ = {"DRIFTLOOP_DATA": str(tmp_path), "DRIFTLOOP_API_TOKEN": "secret", "DRIFTLOOP_SLACK_TOKEN": "secret",
               "DRIFTLOOP_REQUIRE_POSTGRES": "1", "DRIFTLOOP_TEST_POSTGRES_URL": "postgresql+psycopg://db/test"}
    assert load_config(None, environ=environ).state_dir == load_config(None, environ={}).state_dir


def test_env_error_hides_database_url():
    from monitor import config as config_module

    # database_url accepts any string, so a failing value needs a stricter stand-in check.
    error = {"loc": ("database_url",), "msg": "Value error, must be a URL", "type": "value_error",
             "input": "postgresql://driftloop:secret@db/driftloop"}
    message = config_module._format_error(error, {"database_url": "DRIFTLOOP_DATABASE_URL"})
    assert message == "database_url (from DRIFTLOOP_DATABASE_URL): invalid value (not shown): must be a URL"
    assert "secret" not in message


def test_configuration_page_is_current():
    from monitor.config_docs import DOC_PATH, render

    assert DOC_PATH.read_text() == render(), "docs/configuration.md is stale; run python -m monitor.config_docs"


def test_every_key_documented():
    from monitor.config import Config, config_fields, is_section
    from monitor.config_docs import DOC_PATH, undocumented_keys

    assert undocumented_keys() == []
    page = DOC_PATH.read_text()
    for key, field in config_fields(Config):
        if not is_section(field):
            assert f"| `{key}` |" in page, f"{key} has no row in docs/configuration.md"


def test_example_config_lists_every_key():
    """config/driftloop.yaml, which the README calls the list of every key, names each one."""
    import yaml

    from monitor.config import Config, config_fields, is_section

    example = yaml.safe_load((REPO_ROOT / "config" / "driftloop.yaml").read_text())

    def present(key: str) -> bool:
        node = example
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [key for key, field in config_fields(Config)
               if not is_section(field) and "[]" not in key and not present(key)]
    assert missing == [], f"config/driftloop.yaml lacks {missing}"


def test_missing_description_is_found(monkeypatch):
    from monitor.config import MonitorConfig
    from monitor.config_docs import undocumented_keys

    monkeypatch.setattr(MonitorConfig.model_fields["port"], "description", None)
    assert "monitor.port" in undocumented_keys()


# The Kubernetes example


K8S = REPO_ROOT / "deploy" / "kubernetes"


def k8s_documents() -> dict[str, dict]:
    documents = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def test_k8s_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = []
    for kind, document in k8s_documents().items():
        if kind in ("ServiceMonitor", "Kustomization"):
            # No schema ships for custom resources; they are checked by hand below.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(document, version, strict=True)
            continue
        kubernetes_validate.validate(document, version, strict=True)
        checked.append(kind)
    assert sorted(checked) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Service"]

    broken = json.loads(json.dumps(k8s_documents()["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_k8s_references_agree():
    documents = k8s_documents()
    deployment, service = documents["Deployment"], documents["Service"]
    pod = deployment["spec"]["template"]
    containers = {container["name"]: container for container in pod["spec"]["containers"]}
    config = parse_config(yaml.safe_load(documents["ConfigMap"]["data"]["driftloop.yaml"]))

    assert pod["spec"]["terminationGracePeriodSeconds"] > config.monitor.shutdown_grace_s
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    monitor = containers["sidecar"]
    assert monitor["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert monitor["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert monitor["ports"][0]["containerPort"] == config.monitor.port
    assert containers["model-server"]["ports"][0]["containerPort"] == config.server.port
    for container in containers.values():
        assert {"requests", "limits"} <= container["resources"].keys()
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["state"] == config.state_dir
    token = next(item for item in monitor["env"] if item["name"] == config.auth.token_env)
    assert token["valueFrom"]["secretKeyRef"]["key"] in documents["Secret"]["stringData"]
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    scraped = {endpoint["port"] for endpoint in documents["ServiceMonitor"]["spec"]["endpoints"]}
    assert scraped == service_ports
    assert documents["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    listed = set(documents["Kustomization"]["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}


# Ingest validation fast path


HEAD = [f"label_{i}" for i in range(151)]


def probability_event(probabilities) -> dict:
    return {"events": [{"id": "p-1", "text": "what is my balance", "probabilities": probabilities}]}


def spread(top: int = 3) -> list:
    values = [0.5 / 150] * 151
    values[top] = 0.5
    return values


@pytest.mark.parametrize("position, value, field, message", [
    (150, float("nan"), "probabilities[150]", "finite"),
    (150, float("inf"), "probabilities[150]", "finite"),
    (150, -0.01, "probabilities[150]", "[0, 1]"),
    (150, 1.5, "probabilities[150]", "[0, 1]"),
    (100, True, "probabilities[100]", "finite"),
    (7, "0.1", "probabilities[7]", "finite"),
], ids=["nan-last", "inf-last", "negative-last", "above-one", "bool", "string"])
def test_probability_checks_find_bad_value(position, value, field, message):
    from monitor.ingest import validate_events

    probabilities = spread()
    probabilities[position] = value
    result = validate_events(probability_event(probabilities), HEAD, max_items=10, max_text_chars=100)
    assert result.valid == []
    assert result.errors[0].field == f"events[0].{field}"
    assert message in result.errors[0].error


def test_probability_integers_accepted():
    from monitor.ingest import validate_events

    probabilities = [0] * 151
    probabilities[42] = 1
    result = validate_events(probability_event(probabilities), HEAD, max_items=10, max_text_chars=100)
    assert result.errors == []
    assert result.valid[0]["predicted_label"] == "label_42"
    assert result.valid[0]["confidence"] == 1.0


def test_probability_tie_takes_first():
    from monitor.ingest import validate_events

    probabilities = [0.0] * 151
    probabilities[9] = probabilities[20] = 0.5
    result = validate_events(probability_event(probabilities), HEAD, max_items=10, max_text_chars=100)
    assert result.valid[0]["predicted_label"] == "label_9"


def test_embedding_budget_bucket():
    now = [0.0]
    budget = TokenBucket(rate=20.0, burst=100.0, clock=lambda: now[0])

    assert budget.take(100)
    assert not budget.take(40)  # empty
    now[0] = 1.0
    assert not budget.take(40)  # 20 texts gained in one second
    now[0] = 2.0
    assert budget.take(40)
    now[0] = 100.0
    assert budget.take(100)
    assert not budget.take(1)  # the bucket keeps at most the burst
    with pytest.raises(ValueError, match="rate=0"):
        TokenBucket(rate=0, burst=10)

    starting = TokenBucket(rate=20.0, burst=100.0, initial=30.0, clock=lambda: now[0])
    assert starting.take(30)
    assert not starting.take(1)


def test_time_budget_charges_into_debt():
    now = [0.0]
    budget = TokenBucket(rate=0.1, burst=6.0, clock=lambda: now[0])  # 10% of the time, over a minute

    budget.charge(8.0)  # an evaluation longer than the burst
    assert budget.available() == pytest.approx(-2.0)
    now[0] = 19.0
    assert budget.available() < 0  # 1.9 s repaid of 2
    now[0] = 21.0
    assert budget.available() == pytest.approx(0.1)
    now[0] = 1000.0
    assert budget.available() == 6.0


def test_windows_over_budget_skipped(fresh, caplog):
    raw = with_changes(fresh, resources={"embedding_max_texts_per_s": 1.0})
    daemon = MonitorDaemon(parse_config(raw), registry=CollectorRegistry())
    daemon.start(background=False)
    try:
        daemon.ingest_events(events(200, 6000))  # five windows of 40 within milliseconds
        with caplog.at_level("WARNING", logger="monitor.daemon"):
            daemon.tick()

        evaluated = daemon.store.windows(limit=10)
        # The bucket starts with detectors.min_samples texts: the first window is tested, the rest skipped.
        assert len(evaluated) == 1
        assert daemon.resource_metrics.windows_skipped._value.get() == 4
        assert caplog.text.count("embedding budget spent") == 1
        assert daemon.store.known_event_ids([f"op-{i}" for i in range(6000, 6200)]) == {
            f"op-{i}" for i in range(6000, 6200)}
    finally:
        daemon.stop(timeout_s=5)


def test_windows_over_time_budget_skipped(fresh, caplog):
    raw = with_changes(fresh, resources={"evaluation_max_share": 1e-6})  # 60 µs a minute
    daemon = MonitorDaemon(parse_config(raw), registry=CollectorRegistry())
    daemon.start(background=False)
    try:
        daemon.ingest_events(events(120, 7000))  # three windows of 40
        with caplog.at_level("WARNING", logger="monitor.daemon"):
            daemon.tick()

        # The first evaluation takes longer than the whole burst, so the other two are skipped.
        assert len(daemon.store.windows(limit=10)) == 1
        assert daemon.resource_metrics.windows_skipped._value.get() == 2
        assert caplog.text.count("evaluation time budget spent") == 1
        assert "resources.evaluation_max_share" in caplog.text
    finally:
        daemon.stop(timeout_s=5)


def test_counted_warning_logs_once_per_interval(caplog):
    from monitor.daemon import CountedWarning

    now = [0.0]
    warning = CountedWarning(interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="monitor.daemon"):
        assert warning.add("skipped %d windows in %.0f s (%s)", "w1")
        for index in range(5):
            now[0] += 1.0
            assert not warning.add("skipped %d windows in %.0f s (%s)", f"w{index + 2}")
        now[0] = 61.0
        assert warning.add("skipped %d windows in %.0f s (%s)", "w7")

    assert "skipped 1 windows in 0 s (w1)" in caplog.text
    assert "skipped 6 windows in 60 s (w7)" in caplog.text


def test_window_of_replaced_version_is_skipped(daemon, caplog):
    daemon.start(background=False)
    daemon.ingest_events(events(40, 7000))
    [window] = list(daemon.pending)
    window.version = "v0"  # as if the active version changed after the window closed

    with caplog.at_level("WARNING", logger="monitor.daemon"):
        daemon.tick()

    assert daemon.store.windows(limit=10) == []
    assert daemon.resource_metrics.windows_skipped._value.get() == 1
    assert "of a version no longer active" in caplog.text
    assert "version v0" in caplog.text


def test_reload_notice_sends_token(fresh, monkeypatch):
    from fastapi import FastAPI, Request

    from tests.conftest import ServerThread

    seen = []
    app = FastAPI()

    @app.post("/v1/admin/reload")
    async def reload(request: Request):
        seen.append(request.headers.get("authorization"))
        return {"version": "v1"}

    with ServerThread(app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        config = parse_config(with_changes(fresh, server={"host": "127.0.0.1", "port": port}))
        monkeypatch.setenv(config.auth.token_env, "s3cret")
        MonitorDaemon(config, registry=CollectorRegistry())._notify_server()

    assert seen == ["Bearer s3cret"]
