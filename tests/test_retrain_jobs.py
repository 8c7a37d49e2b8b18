"""Retrain runs inside the daemon: sweep and lineage, cancel, bad input, and a crash mid-training."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from monitor.cli import main
from monitor.config import parse_config
from monitor.daemon import MonitorDaemon, new_run_id
from retrain.bootstrap import bootstrap
from retrain.jobs import RetrainJob, approve_run, cancel_run
from tests.conftest import post_labelled_events, tiny_deployment_config
from tests.test_training_runs import save_tokenizer_variant

REPOSITORY = Path(__file__).resolve().parents[1]
# A run that trains until it is cancelled or killed.
LONG_RUN = {"retrain": {"sweep": {"enabled": False}, "training": {"epochs": 1000, "early_stopping_patience": 1000}}}


def merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        merged[key] = merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


@pytest.fixture()
def deployment(tmp_path, tiny_model_dir):
    """A bootstrapped state on a private copy of the tiny model; returns (raw config, config file)."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    raw = tiny_deployment_config(tmp_path / "state", model)
    path = tmp_path / "driftloop.yaml"
    path.write_text(yaml.safe_dump(raw))
    bootstrap(parse_config(raw), log=lambda message: None)
    return raw, path


@pytest.fixture()
def daemon(deployment):
    raw, _ = deployment
    running = MonitorDaemon(parse_config(raw))
    running.start(background=False)
    assert running.ready, running.startup_error
    post_labelled_events(running, 60)
    yield running
    running.stop()


def run_job(daemon: MonitorDaemon, config) -> dict:
    """Run one retrain the way the daemon's worker does, in this thread, and return the run."""
    run_id = new_run_id()
    active = daemon.registry.active()
    daemon.store.create_run(run_id, "queued", active.name, {"reason": "test"})
    RetrainJob(run_id=run_id, config=config, store=daemon.store, registry=daemon.registry, dataset=daemon.dataset,
               base=active, since=None).run()
    return daemon.store.get_run(run_id)


def wait_for(predicate, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def prepare_long_run(raw: dict) -> tuple[Path, object]:
    """Write a config whose retrain trains until stopped, and post labelled events for it."""
    long_run = merge(raw, LONG_RUN)
    path = Path(raw["state_dir"]).parent / "long.yaml"
    path.write_text(yaml.safe_dump(long_run))
    config = parse_config(long_run)
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    post_labelled_events(daemon, 60)
    daemon.stop()
    return path, config


def start_terminal_retrain(path: Path) -> tuple[subprocess.Popen, list[str]]:
    """Start `driftloop retrain` in a child process and return once it logs a training step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPOSITORY)}
    process = subprocess.Popen([sys.executable, "-m", "monitor.cli", "retrain", "--config", str(path), "--no-progress"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if ": step " in line:
            break
    return process, lines


def kill_if_running(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_run_records_sweep_lineage_and_job_states(daemon):
    run_id = daemon.start_retrain({"reason": "test"}, actor="test")
    daemon.job_thread.join(timeout=300)
    run = daemon.store.get_run(run_id)
    assert run["state"] == "pending_approval", run["error"]
    assert run["job"] == "succeeded"

    sweep = run["training"]["sweep"]
    assert [(row["rank"], row["start"]) for row in sweep] == [(4, "scratch"), (8, "scratch"), (16, "scratch"),
                                                             (32, "scratch"), (8, "warm")]
    chosen = [row for row in sweep if row["chosen"]]
    assert len(chosen) == 1
    assert run["training"]["rank"] == chosen[0]["rank"]

    record = yaml.safe_load((Path(run["candidate_dir"]) / "training.yaml").read_text())
    assert record["run_id"] == run_id
    assert record["base_version"] == "v1"
    assert record["sweep"] == sweep
    assert record["data"]["sha256"]["train"] == record["data_sha256"]
    assert record["data"]["train"] == record["n_train"]
    assert record["data"]["validation"] == record["n_validation"]
    assert sum(record["data"]["class_counts"].values()) == record["n_train"]
    assert {"reference.jsonl", "validation.jsonl", "train.jsonl"} <= {path.name for path in Path(run["candidate_dir"]).iterdir()}

    actions = [entry["action"] for entry in daemon.store.audit_log() if entry["run_id"] == run_id]
    assert actions[:5] == ["retrain_triggered", "run_training", "run_evaluating", "canary_passed", "run_pending_approval"]
    metrics = generate_latest(daemon.metrics.registry).decode()
    assert "driftloop_retrain_validation_loss " in metrics
    assert 'driftloop_retrain_state{driftloop_retrain_state="pending_approval"} 1.0' in metrics


def test_http_cancel_stops_a_running_job(deployment, monkeypatch):
    from fastapi.testclient import TestClient

    from monitor.api import create_app

    raw, _ = deployment
    config = parse_config(merge(raw, LONG_RUN))
    monkeypatch.setenv("DRIFTLOOP_API_TOKEN", "s3cret")
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    try:
        post_labelled_events(daemon, 60)
        client = TestClient(create_app(daemon))
        run_id = daemon.start_retrain({"reason": "test"}, actor="test")
        wait_for(lambda: daemon.metrics.retrain_step._value.get() > 0)

        assert client.post(f"/v1/retrains/{run_id}/cancel").status_code == 401
        response = client.post(f"/v1/retrains/{run_id}/cancel", json={"by": "dana", "comment": "wrong data"},
                               headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "cancelling"
        daemon.job_thread.join(timeout=30)
        assert not daemon.job_thread.is_alive()

        run = daemon.store.get_run(run_id)
        assert (run["state"], run["job"]) == ("cancelled", "cancelled")
        assert not (config.state_path / "runs" / run_id).exists()
        assert daemon.registry.active().name == "v1"
        entries = [entry for entry in daemon.store.audit_log() if entry["run_id"] == run_id]
        cancel = next(entry for entry in entries if entry["action"] == "cancel_requested")
        assert (cancel["actor"], cancel["detail"]["comment"]) == ("dana", "wrong data")
        assert entries[-1]["action"] == "run_cancelled"
        again = client.post(f"/v1/retrains/{run_id}/cancel", headers={"Authorization": "Bearer s3cret"})
        assert again.status_code == 409
        assert "is cancelled" in again.json()["error"]
        # The daemon goes on: a new run can start, and events are still accepted.
        post_labelled_events(daemon, 5, offset=500)
    finally:
        daemon.stop()


def test_cli_cancel_pending_and_errors(daemon, deployment, capsys):
    _, path = deployment
    config = parse_config(merge(deployment[0], {"retrain": {"sweep": {"enabled": False}}}))
    run = run_job(daemon, config)
    assert run["state"] == "pending_approval", run["error"]
    candidate = Path(run["candidate_dir"])
    assert candidate.is_dir()

    assert main(["cancel", run["id"], "--config", str(path), "--by", "erin"]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert daemon.store.get_run(run["id"])["state"] == "cancelled"
    assert not candidate.exists()

    assert main(["cancel", run["id"], "--config", str(path)]) == 2
    assert (f"retrain run {run['id']} is cancelled; only queued, training, evaluating, awaiting_data, pending_approval, approved "
            "runs can be cancelled") in capsys.readouterr().err
    assert main(["cancel", "r-missing", "--config", str(path)]) == 2
    assert "retrain run 'r-missing' not found" in capsys.readouterr().err
    with pytest.raises(Exception, match="is cancelled, only pending_approval or awaiting_data runs can be approved"):
        approve_run(daemon.store, run["id"], actor="erin")


def test_cancel_wins_over_a_late_state_change(daemon):
    """A cancel request between two steps of the worker is never overwritten by the worker."""
    run_id = new_run_id()
    daemon.store.create_run(run_id, "queued", "v1", {})
    assert cancel_run(daemon.store, run_id, actor="test")["state"] == "cancelling"
    job = RetrainJob(run_id=run_id, config=daemon.config, store=daemon.store, registry=daemon.registry,
                     dataset=daemon.dataset, base=daemon.registry.active(), since=None)
    assert job.run() == "cancelled"
    assert daemon.store.get_run(run_id)["state"] == "cancelled"


def corrupt_weights(daemon, raw):
    weights = daemon.registry.active().adapter_dir / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    return parse_config(raw), lambda: weights.write_bytes(original)


def missing_base_model(daemon, raw):
    model = Path(raw["model"]["base"])
    moved = model.with_name("moved-away")
    model.rename(moved)
    return parse_config(raw), lambda: moved.rename(model)


def tokenizer_without_pad_and_eos(daemon, raw):
    model = Path(raw["model"]["base"])
    original = model.with_name("original")
    model.rename(original)
    save_tokenizer_variant(original, model, pad=False, eos=None)

    def restore():
        shutil.rmtree(model)
        original.rename(model)

    return parse_config(raw), restore


def rank_too_large(daemon, raw):
    changes = {"retrain": {"warm_start": False, "sweep": {"enabled": False}, "training": {"rank": 64}}}
    return parse_config(merge(raw, changes)), lambda: None


def unknown_label(daemon, raw):
    # A label set that changed under stored events: ingest would refuse it today.
    daemon.store.set_labels({"job-3": "not-a-label"})
    return parse_config(raw), lambda: None


@pytest.mark.parametrize(("breaker", "expected"), [
    (corrupt_weights, "adapter_model.safetensors is unreadable"),
    (missing_base_model, "could not be loaded"),
    (tokenizer_without_pad_and_eos, "neither a pad_token nor an eos_token"),
    (rank_too_large, "rank 64 does not fit the model"),
    (unknown_label, "first unknown label: 'not-a-label'"),
])
def test_bad_input_fails_run_only(daemon, deployment, breaker, expected):
    raw, _ = deployment
    active = daemon.registry.active()
    before = digest(active.adapter_dir)
    config, restore = breaker(daemon, raw)
    try:
        run = run_job(daemon, config)
    finally:
        restore()
    assert run["state"] == "failed"
    assert expected in run["error"]
    assert not (config.state_path / "runs" / run["id"]).exists()
    assert daemon.registry.active() == active
    assert digest(active.adapter_dir) == before
    assert daemon.ready
    post_labelled_events(daemon, 3, offset=900)


def test_killed_mid_training_then_restarted(deployment):
    raw, _ = deployment
    path, config = prepare_long_run(raw)
    registry_view = MonitorDaemon(config)
    active = registry_view.registry.active()
    before = digest(active.adapter_dir)
    registry_view.store.close()

    process, lines = start_terminal_retrain(path)
    try:
        assert process.poll() is None, "".join(lines)
        # Kill the child without warning while it trains.
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        kill_if_running(process)

    restarted = MonitorDaemon(config)
    [run] = restarted.store.runs(limit=1)
    assert run["state"] == "training"
    work_dir = config.state_path / "runs" / run["id"]
    # A save that died half-way leaves a temporary folder; the restart removes it.
    (work_dir / ".candidate.tmp-dead").mkdir(parents=True, exist_ok=True)
    restarted.start(background=False)
    try:
        assert restarted.ready, restarted.startup_error
        run = restarted.store.get_run(run["id"])
        assert (run["state"], run["job"]) == ("failed", "failed")
        assert f"its process (driftloop retrain, pid {process.pid}) ended while the run was training" in run["error"]
        assert not work_dir.exists()
        assert restarted.registry.active() == active
        assert digest(active.adapter_dir) == before
        assert [version.name for version in restarted.registry.versions()] == ["v1"]
        # The next retrain starts normally.
        assert restarted.start_retrain({"reason": "after the crash"}, actor="test")
        restarted.cancel_retrain(restarted.store.runs(limit=1)[0]["id"], actor="test")
        restarted.job_thread.join(timeout=60)
    finally:
        restarted.stop()


def test_ctrl_c_cancels_a_terminal_retrain(deployment):
    raw, _ = deployment
    path, _ = prepare_long_run(raw)
    process, lines = start_terminal_retrain(path)
    try:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        kill_if_running(process)
    output = "".join(lines) + output
    assert process.returncode == 1, output
    assert ": cancelled" in output
    store = MonitorDaemon(parse_config(raw)).store
    [run] = store.runs(limit=1)
    assert run["state"] == "cancelled"
    assert run["error"] == "cancelled: interrupted in the terminal"


def test_run_thread_cap(daemon, deployment):
    import torch

    config = parse_config(merge(deployment[0], {"retrain": {"sweep": {"enabled": False}, "training": {"num_threads": 1}}}))
    seen = set()
    run_id = new_run_id()
    daemon.store.create_run(run_id, "queued", "v1", {})
    before = torch.get_num_threads()
    job = RetrainJob(run_id=run_id, config=config, store=daemon.store, registry=daemon.registry, dataset=daemon.dataset,
                     base=daemon.registry.active(), since=None,
                     on_progress=lambda progress: seen.add(torch.get_num_threads()))
    assert job.run() == "pending_approval"
    assert seen == {1}
    assert torch.get_num_threads() == before


def test_recovery_spares_live_owner(deployment):
    from retrain.jobs import run_owner

    raw, _ = deployment
    config = parse_config(raw)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    daemon = MonitorDaemon(config)
    try:
        owner = run_owner("driftloop retrain", pid=sleeper.pid)
        daemon.store.create_run("r-terminal", "training", "v1", {"owner": owner})
        daemon.start(background=False)
        assert daemon.store.get_run("r-terminal")["state"] == "training"
        with pytest.raises(Exception, match="r-terminal is training"):
            daemon.start_retrain({"reason": "test"})

        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait(timeout=30)
        post_labelled_events(daemon, 20)
        run_id = daemon.start_retrain({"reason": "test"})
        run = daemon.store.get_run("r-terminal")
        assert run["state"] == "failed"
        assert run["error"] == f"its process (driftloop retrain, pid {sleeper.pid}) ended while the run was training"
        daemon.cancel_retrain(run_id, actor="test")
        daemon.job_thread.join(timeout=60)
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, signal.SIGKILL)
            sleeper.wait(timeout=30)
        daemon.stop()


def test_labels_after_drift_start_retrain(deployment):
    """A streak waiting for labels starts its retrain at the next check once they arrive, with no new window."""
    from types import SimpleNamespace

    raw, _ = deployment
    config = parse_config(merge(raw, {"trigger": {"consecutive_windows": 2, "min_labels": 30, "cooldown_s": 0},
                                      **LONG_RUN}))
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    try:
        daemon._refresh_leadership()  # the first scheduled check would; check_interval_s is an hour here
        report = SimpleNamespace(started_at=time.time() - 60, status="ok", drifted=True, drifted_signals=["embedding"])
        daemon._apply_policy("w-1", report)
        daemon._apply_policy("w-2", report)
        daemon._recheck_trigger()
        assert daemon.store.runs() == []
        assert "labels_needed" in [entry["action"] for entry in daemon.store.audit_log()]
        assert daemon.metrics.registry.get_sample_value("driftloop_retrain_labels_needed") == 30

        post_labelled_events(daemon, 30)
        daemon._recheck_trigger()

        [run] = daemon.store.runs()
        assert run["trigger"]["windows"] == ["w-1", "w-2"]
        assert run["trigger"]["signals"] == ["embedding"]
        assert run["trigger"]["labelled"] == 30
        daemon.cancel_retrain(run["id"], actor="test")
        daemon.job_thread.join(timeout=60)
    finally:
        daemon.stop()


def test_retrain_without_labels_rejected(deployment, capsys):
    raw, path = deployment
    assert main(["retrain", "--config", str(path), "--no-progress"]) == 2
    assert "no labelled production events since version v1 became active" in capsys.readouterr().err
    assert MonitorDaemon(parse_config(raw)).store.runs() == []


def _set_updated_at(store, run_id: str, stamp: float) -> None:
    """Backdate a run's updated_at, which Store.update_run always sets to now."""
    from sqlalchemy import update

    from monitor.store import RunRow

    with store.session() as session:
        session.execute(update(RunRow).where(RunRow.id == run_id).values(updated_at=stamp))


def test_recovery_fails_run_of_reused_pid(tmp_path):
    """A restarted container may give the new sidecar the pid of the one that died in a run."""
    from monitor.store import Store
    from retrain.jobs import recover_interrupted_runs, run_owner

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    alive = run_owner("daemon")
    store.create_run("r-alive", "training", "v1", {"owner": alive})
    store.create_run("r-reused", "training", "v1", {"owner": {**alive, "started_at": alive["started_at"] - 3600}})
    store.create_run("r-old-record", "training", "v1", {"owner": {key: alive[key] for key in ("process", "pid", "host")}})

    changed = recover_interrupted_runs(store, tmp_path)

    assert [run["id"] for run in changed] == ["r-reused"]
    assert store.get_run("r-reused")["state"] == "failed"
    assert store.get_run("r-alive")["state"] == "training"
    assert store.get_run("r-old-record")["state"] == "training"
    store.close()


def test_recovery_spares_owner_on_another_host(tmp_path):
    """A terminal retrain beside another replica: its run is spared while it touches updated_at."""
    from monitor.store import Store
    from retrain.jobs import OWNER_SILENT_AFTER_S, recover_interrupted_runs

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    owner = {"process": "driftloop retrain", "pid": 4242, "host": "another-host.example"}
    store.create_run("r-fresh", "training", "v1", {"owner": owner})
    store.create_run("r-silent", "training", "v1", {"owner": owner})
    _set_updated_at(store, "r-silent", time.time() - OWNER_SILENT_AFTER_S - 1)

    changed = recover_interrupted_runs(store, tmp_path)

    assert [run["id"] for run in changed] == ["r-silent"]
    assert store.get_run("r-fresh")["state"] == "training"
    assert store.get_run("r-silent")["state"] == "failed"
    store.close()


def test_working_run_sends_heartbeat(tmp_path, monkeypatch):
    import retrain.jobs as jobs
    from monitor.store import Store

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create_run("r-beat", "training", "v1", {})
    _set_updated_at(store, "r-beat", 1.0)
    job = RetrainJob(run_id="r-beat", config=parse_config({"state_dir": str(tmp_path)}), store=store, registry=None,
                     dataset=None, base=None, since=None)

    job.should_stop()
    assert store.get_run("r-beat")["updated_at"] == 1.0  # not due yet
    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.0)
    job.should_stop()
    assert store.get_run("r-beat")["updated_at"] > time.time() - 60
    store.close()
