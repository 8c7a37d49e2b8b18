"""Retrain data assembly and one whole run on the tiny model: train, canary, approve, promote."""

import threading
import time

import pytest
from prometheus_client import generate_latest

from monitor.config import parse_config
from monitor.daemon import MonitorDaemon
from retrain.bootstrap import bootstrap
from retrain.jobs import approve_run, reject_run
from tests.conftest import create_database, drop_database, post_labelled_events, tiny_deployment_config


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def config(request, tmp_path_factory, tiny_model_dir, clinc_dir):
    """A bootstrapped tiny deployment, once on SQLite and once on PostgreSQL: the whole loop runs on both."""
    state = tmp_path_factory.mktemp("jobs-state")
    raw = tiny_deployment_config(state, tiny_model_dir)
    server_url = None
    if request.param == "postgresql":
        server_url = request.getfixturevalue("postgres_server_url")
        raw["database_url"] = create_database(server_url)
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)
    yield config
    if server_url is not None:
        drop_database(server_url, raw["database_url"])


def retrained(daemon, count: int, offset: int) -> str:
    """Post ``count`` labelled events, run a retrain to its end and return the run id."""
    post_labelled_events(daemon, count, offset=offset)
    run_id = daemon.start_retrain({"reason": "test"}, actor="test")
    daemon.job_thread.join(timeout=120)
    return run_id


def test_run_waits_for_approval_then_promotes(config):
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    assert daemon.ready, daemon.startup_error
    try:
        run_id = retrained(daemon, 60, 0)
        run = daemon.store.get_run(run_id)
        assert run["state"] == "pending_approval", run["error"]
        assert run["canary"]["test"]["n"] > 0
        assert run["canary"]["production"]["n"] > 0
        assert run["canary"]["status"] == "passed"
        assert run["canary"]["deciding_gate"] is None
        assert len(run["canary"]["test"]["accuracy_diff_ci"]) == 2
        assert run["canary"]["test"]["per_class"]
        assert run["canary"]["production"]["mcnemar_midp"] < run["canary"]["production"]["mcnemar_p"]
        assert run["canary"]["shadow"]["flips"]
        assert run["canary"]["latency"]["n"] > 0
        assert run["training"]["steps"] > 0

        approve_run(daemon.store, run_id, actor="alice", comment="looks good")
        daemon.tick()
        assert daemon.registry.active().name == "v2"
        assert daemon.active_name == "v2"
        assert daemon.store.get_run(run_id)["promoted_version"] == "v2"
        assert (daemon.registry.profile_dir("v2") / "profile.json").is_file()
        actions = [entry["action"] for entry in daemon.store.audit_log()]
        for expected in ("retrain_triggered", "run_training", "run_evaluating", "run_approved", "promote"):
            assert expected in actions

        previous, target = daemon.rollback(None, actor="oncall")
        assert (previous, target) == ("v2", "v1")
        assert daemon.active_name == "v1"
        assert daemon.store.get_run(run_id)["state"] == "rolled_back"
        metrics = generate_latest(daemon.metrics.registry).decode()
        assert "driftloop_rollbacks_total 1.0" in metrics
        assert 'driftloop_retrain_state{driftloop_retrain_state="rolled_back"} 1.0' in metrics

        # Rollbacks by the CLI, in another process, are counted at the daemon's next check.
        daemon.registry.rollback("v2", actor="cli")
        daemon.registry.rollback(None, actor="cli")
        daemon.tick()
        assert daemon.active_name == "v1"
        assert "driftloop_rollbacks_total 3.0" in generate_latest(daemon.metrics.registry).decode()
    finally:
        daemon.stop()


def test_check_waits_for_running_promotion(config, caplog):
    """A check right after an approval returns with the new version active, also while the approval poll promotes it."""
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    try:
        run_id = retrained(daemon, 30, 6000)
        assert daemon.store.get_run(run_id)["state"] == "pending_approval"
        base = daemon.active_name
        promoting = threading.Event()
        install = daemon._install_profile

        def slow_install(*args):
            promoting.set()
            time.sleep(1.0)
            install(*args)

        daemon._install_profile = slow_install
        approve_run(daemon.store, run_id, actor="alice")
        # The scheduler's approval poll starts the promotion within a second, before the check below.
        assert promoting.wait(timeout=10)
        daemon.tick()
        run = daemon.store.get_run(run_id)
        assert run["state"] == "active"
        assert daemon.active_name == run["promoted_version"]
        assert run["promoted_version"] != base
        assert "promoting approved runs failed" not in caplog.text
        # The next tests in this module expect the first version to be active.
        daemon.rollback(base, actor="test")
    finally:
        daemon.stop()


def test_reject_and_double_approve(config):
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    try:
        run_id = retrained(daemon, 30, 1000)
        reject_run(daemon.store, run_id, actor="bob", comment="not now")
        assert daemon.store.get_run(run_id)["state"] == "rejected"
        with pytest.raises(Exception, match="only pending_approval"):
            approve_run(daemon.store, run_id, actor="bob")
    finally:
        daemon.stop()


def test_restart_keeps_labels_since_activation(config):
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    try:
        post_labelled_events(daemon, 10, offset=3000)
        before = daemon.status()["labelled_since_activation"]
        assert before >= 10
    finally:
        daemon.stop()
    restarted = MonitorDaemon(config)
    restarted.start(background=False)
    try:
        assert restarted.status()["labelled_since_activation"] == before
    finally:
        restarted.stop()


def test_startup_failure_calls_back(config):
    broken = config.model_copy(update={"model": config.model.model_copy(update={"base": "/nonexistent/model"})})
    failures = []
    daemon = MonitorDaemon(broken)
    daemon.start(background=False, on_failure=lambda: failures.append(daemon.startup_error))
    try:
        assert not daemon.ready
        assert failures == [daemon.startup_error]
        assert "/nonexistent/model" in daemon.startup_error
    finally:
        daemon.stop()


def test_restart_marks_interrupted_run_failed(config):
    daemon = MonitorDaemon(config)
    daemon.store.create_run("r-interrupted", "training", "v1", {"reason": "test"})
    daemon.start(background=False)
    try:
        run = daemon.store.get_run("r-interrupted")
        assert run["state"] == "failed"
        assert "restarted" in run["error"]
    finally:
        daemon.stop()


def test_http_approve_promotes(config, monkeypatch):
    from fastapi.testclient import TestClient

    from monitor.api import create_app

    monkeypatch.setenv("DRIFTLOOP_API_TOKEN", "s3cret")
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    try:
        client = TestClient(create_app(daemon))
        run_id = retrained(daemon, 40, 2000)
        assert client.get(f"/v1/retrains/{run_id}").json()["state"] == "pending_approval"

        anonymous = client.post(f"/v1/retrains/{run_id}/approve", json={"comment": "ship it"})
        assert anonymous.status_code == 401
        response = client.post(f"/v1/retrains/{run_id}/approve", json={"comment": "ship it", "by": "carol"},
                               headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 200, response.text
        version = response.json()["version"]
        assert daemon.registry.active().name == version
        assert client.get("/v1/versions").json()["active"] == version
        approvals = [entry for entry in client.get("/v1/audit").json()["entries"] if entry["action"] == "run_approved"]
        assert approvals[-1]["actor"] == "carol"
        assert approvals[-1]["detail"]["comment"] == "ship it"
        again = client.post(f"/v1/retrains/{run_id}/approve", headers={"Authorization": "Bearer s3cret"})
        assert again.status_code == 409
    finally:
        daemon.stop()
