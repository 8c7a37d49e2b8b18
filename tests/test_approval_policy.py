"""Approval policies on the tiny model: which state a canary leads to, and inconclusive runs evaluated again."""

import shutil

import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError
from retrain.bootstrap import bootstrap
from monitor.errors import DriftloopError
from retrain.jobs import approve_run, state_after_canary
from tests.conftest import post_labelled_events, started_daemon, tiny_deployment_config


@pytest.mark.parametrize("approval, status, state", [
    ("manual", "passed", "pending_approval"),
    ("manual", "inconclusive", "pending_approval"),
    ("manual", "failed", "rejected_by_gate"),
    ("auto-if-gates-pass", "passed", "approved"),
    ("auto-if-gates-pass", "inconclusive", "pending_approval"),
    ("auto-if-gates-pass", "failed", "rejected_by_gate"),
    ("auto", "passed", "approved"),
    ("auto", "inconclusive", "awaiting_data"),
    ("auto", "failed", "rejected_by_gate"),
])
def test_state_after_canary(approval, status, state):
    assert state_after_canary(approval, status) == state


def test_unknown_policy_names_the_value():
    with pytest.raises(ConfigError, match="approval.*'whenever'"):
        parse_config({"approval": "whenever"})


def deployment(tmp_path_factory, tiny_model_dir, approval, **canary):
    state = tmp_path_factory.mktemp(f"policy-{approval}")
    raw = tiny_deployment_config(state, tiny_model_dir)
    raw["approval"] = approval
    raw["canary"].update(canary)
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)
    daemon = started_daemon(config)
    return daemon


def retrain(daemon) -> dict:
    run_id = daemon.start_retrain({"reason": "test"}, actor="test")
    daemon.job_thread.join(timeout=120)
    return daemon.store.get_run(run_id)


def test_auto_if_gates_pass_promotes_a_passed_canary(tmp_path_factory, tiny_model_dir, clinc_dir):
    daemon = deployment(tmp_path_factory, tiny_model_dir, "auto-if-gates-pass")
    try:
        post_labelled_events(daemon, 60)
        run = retrain(daemon)
        assert run["canary"]["status"] == "passed", run["canary"]["gates"]
        assert run["state"] == "active"
        assert daemon.active_name == "v2"
        approval = [entry for entry in daemon.store.audit_log() if entry["action"] == "run_approved"][-1]
        assert approval["actor"] == "policy:auto-if-gates-pass"
        # The profile was built before approval and moved into place, and the run folder is gone.
        assert (daemon.registry.profile_dir("v2") / "profile.json").is_file()
        assert not (daemon.config.state_path / "runs" / run["id"]).exists()
    finally:
        daemon.stop()


def test_auto_waits_for_data_then_promotes(tmp_path_factory, tiny_model_dir, clinc_dir):
    daemon = deployment(tmp_path_factory, tiny_model_dir, "auto", min_production_samples=30, recheck_new_samples=10)
    try:
        post_labelled_events(daemon, 40)
        run = retrain(daemon)
        assert run["canary"]["status"] == "inconclusive"
        assert run["state"] == "awaiting_data"
        assert (daemon.config.state_path / "runs" / run["id"] / "profile" / "profile.json").is_file()
        judged = run["canary"]["production"]["n"]
        assert judged < 30

        daemon.tick()  # no new labels: nothing to do
        assert daemon.job_thread is None or not daemon.job_thread.is_alive()
        assert daemon.store.get_run(run["id"])["canary"]["evaluations"] == 1

        post_labelled_events(daemon, 200, offset=1000)
        daemon.tick()
        daemon.job_thread.join(timeout=120)
        run = daemon.store.get_run(run["id"])
        assert run["canary"]["evaluations"] == 2
        assert run["canary"]["production"]["n"] >= 30
        assert run["canary"]["status"] == "passed", run["canary"]["gates"]
        assert run["state"] == "active"
        assert daemon.active_name == "v2"
        actions = [entry["action"] for entry in daemon.store.audit_log() if entry["run_id"] == run["id"]]
        assert actions.count("run_evaluating") == 2
        assert "run_awaiting_data" in actions
    finally:
        daemon.stop()


def test_waiting_runs_are_superseded_by_a_promotion(tmp_path_factory, tiny_model_dir, clinc_dir):
    daemon = deployment(tmp_path_factory, tiny_model_dir, "manual", min_production_samples=500)
    try:
        post_labelled_events(daemon, 40)
        first = retrain(daemon)
        assert first["state"] == "pending_approval"
        assert first["canary"]["status"] == "inconclusive"
        post_labelled_events(daemon, 40, offset=500)
        second = retrain(daemon)
        assert second["state"] == "pending_approval"
        approve_run(daemon.store, second["id"], actor="alice")
        daemon.tick()
        assert daemon.active_name == "v2"
        first = daemon.store.get_run(first["id"])
        assert first["state"] == "superseded"
        assert not (daemon.config.state_path / "runs" / first["id"]).exists()
        with pytest.raises(DriftloopError, match="is superseded"):
            approve_run(daemon.store, first["id"], actor="alice")
    finally:
        daemon.stop()


def test_recheck_of_a_replaced_base_supersedes(tmp_path_factory, tiny_model_dir, clinc_dir):
    daemon = deployment(tmp_path_factory, tiny_model_dir, "auto", min_production_samples=500, recheck_new_samples=5)
    try:
        post_labelled_events(daemon, 40)
        run = retrain(daemon)
        assert run["state"] == "awaiting_data"
        # The run's base is a registered version that is not active (as after a rollback past it).
        copy = tmp_path_factory.mktemp("copy") / "adapter"
        shutil.copytree(daemon.registry.active().adapter_dir, copy)
        other = daemon.registry.register(copy, parent="v1", run_id=None, actor="test")
        daemon.store.update_run(run["id"], base_version=other.name)
        post_labelled_events(daemon, 60, offset=2000)
        daemon.tick()
        daemon.job_thread.join(timeout=120)
        assert daemon.store.get_run(run["id"])["state"] == "superseded"
    finally:
        daemon.stop()


def test_cli_approval_promoted_quickly(tmp_path_factory, tiny_model_dir, clinc_dir, capsys):
    import time

    import yaml

    from monitor.cli import main

    state = tmp_path_factory.mktemp("policy-cli")
    raw = tiny_deployment_config(state, tiny_model_dir)
    raw["approval"] = "manual"
    raw["monitor"]["check_interval_s"] = 3600  # no scheduled check runs during the test
    config_file = state / "driftloop.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)
    daemon = started_daemon(config)
    try:
        daemon._refresh_leadership()  # the first scheduled check would; this test has none
        post_labelled_events(daemon, 60)
        run = retrain(daemon)
        assert run["state"] == "pending_approval"

        assert main(["--config", str(config_file), "approve", run["id"], "--by", "owner", "--comment", "ok"]) == 0
        assert "promotes it within about a second" in capsys.readouterr().out
        deadline = time.monotonic() + 30
        while daemon.active_name != "v2" and time.monotonic() < deadline:
            time.sleep(0.1)

        assert daemon.active_name == "v2"
        assert daemon.store.get_run(run["id"])["state"] == "active"
    finally:
        daemon.stop()
