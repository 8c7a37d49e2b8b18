"""Two `driftloop run` replicas on one PostgreSQL database: one leader, and another takes over when it dies."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from monitor.config import parse_config
from monitor.store import Store
from retrain.bootstrap import bootstrap
from retrain.registry import Registry
from tests.conftest import REPO_ROOT, free_port, tiny_deployment_config

pytestmark = pytest.mark.slow


def wait_until(condition, timeout_s: float, what: str):
    """Poll ``condition`` until it returns a truthy value; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Replica:
    def __init__(self, name: str, root: Path, raw: dict):
        self.name = name
        self.port = free_port()
        state = root / name
        state.mkdir()
        config = {**raw, "state_dir": str(state),
                  "server": {"port": free_port(), "monitor_url": f"http://127.0.0.1:{self.port}"}}
        self.config_path = state / "driftloop.yaml"
        self.config_path.write_text(json.dumps(config))
        self.log_path = state / "replica.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "run", "--config", str(self.config_path), "--port", str(self.port)],
            cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str):
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5.0)
        except httpx.HTTPError:
            return None

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"replica {self.name} exited with {self.process.returncode}:\n{self.log_text()}")
        response = self.get("/readyz")
        return response is not None and response.status_code == 200

    def leader(self) -> bool | None:
        response = self.get("/v1/status")
        return response.json()["leader"]["leader"] if response is not None and response.status_code == 200 else None

    def metric(self, name: str) -> str:
        response = self.get("/metrics")
        lines = [line for line in response.text.splitlines() if line.startswith(name + " ")]
        return lines[0].split()[1] if lines else ""

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log.close()


def approved_run(config, store: Store, registry: Registry, run_id: str) -> None:
    """Record an approved run whose candidate is a copy of the active adapter, as a finished retrain leaves it."""
    candidate = config.shared_path / "runs" / run_id / "candidate"
    shutil.copytree(registry.active().adapter_dir, candidate)
    store.create_run(run_id, "approved", registry.active().name, {"reason": "test"})
    store.update_run(run_id, candidate_dir=str(candidate))


def test_one_leader_and_takeover(tmp_path, tiny_model_dir, clinc_dir, postgres_url):
    raw = tiny_deployment_config(tmp_path / "bootstrap-state", tiny_model_dir)
    raw.update(database_url=postgres_url, shared_dir=str(tmp_path / "shared"))
    raw["monitor"] = {**raw["monitor"], "check_interval_s": 1.0}
    raw["post_promotion"] = {"enabled": False}
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)

    replicas = [Replica(name, tmp_path, raw) for name in ("a", "b")]
    store = Store(postgres_url)
    registry = Registry(store, config.shared_path)
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            wait_until(replica.ready, 180, f"replica {replica.name} to be ready")
        # Leadership is tried at start-up and at every check.
        roles = wait_until(lambda: (lambda found: found if None not in found and sum(found) == 1 else None)(
            [replica.leader() for replica in replicas]), 30, "exactly one leader")
        leader, follower = (replicas[0], replicas[1]) if roles[0] else (replicas[1], replicas[0])
        assert leader.metric("driftloop_leader") == "1.0"
        assert follower.metric("driftloop_leader") == "0.0"
        assert leader.get("/readyz").json()["leader"] is True
        assert follower.get("/readyz").json()["leader"] is False

        # A scheduled decision (promotion of an approved run) happens on the leader only.
        approved_run(config, store, registry, "r-first")
        wait_until(lambda: "retrain run r-first promoted as version v2" in leader.log_text(), 60,
                   "the leader to promote r-first")
        assert store.get_run("r-first")["state"] == "active"
        assert "r-first promoted" not in follower.log_text()
        # The follower follows the registry: it compares against the promoted version too.
        wait_until(lambda: follower.get("/v1/status").json()["active_version"] == "v2", 30,
                   "the follower to load v2")

        os.kill(leader.process.pid, signal.SIGKILL)
        leader.process.wait()
        wait_until(lambda: follower.leader() is True, 60, "the follower to take over the leadership")
        assert follower.metric("driftloop_leader") == "1.0"
        assert "is now the leader" in follower.log_text()

        approved_run(config, store, registry, "r-second")
        wait_until(lambda: "retrain run r-second promoted as version v3" in follower.log_text(), 60,
                   "the new leader to promote r-second")
        assert store.get_run("r-second")["state"] == "active"
        assert registry.active().name == "v3"
    finally:
        for replica in replicas:
            replica.stop()
        store.close()
