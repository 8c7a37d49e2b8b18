"""`driftloop run` refuses to start next to another daemon, before it changes any state."""

import socket

import pytest

from monitor.cli import main
from monitor.daemon import lock_state_dir
from monitor.store import Store


@pytest.fixture()
def setup(tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {state}\n")
    store = Store(f"sqlite:///{state / 'driftloop.db'}")
    # A run that a live daemon is training; a daemon that starts up would mark it failed.
    store.create_run("r-live", "training", base_version="v1", trigger={})
    yield config, state, store
    store.close()


def test_run_on_taken_port_changes_nothing(setup, capsys):
    config, _state, store = setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["run", "--config", str(config), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port} (monitor.port)" in error
    assert store.get_run("r-live")["state"] == "training"


def test_second_daemon_is_locked_out(setup, capsys):
    config, state, store = setup
    lock = lock_state_dir(state)
    try:
        assert main(["run", "--config", str(config)]) == 2
    finally:
        lock.close()
    error = capsys.readouterr().err
    assert "another monitor daemon" in error
    assert str(state) in error
    assert store.get_run("r-live")["state"] == "training"


def test_lock_is_released_on_close(tmp_path):
    first = lock_state_dir(tmp_path)
    first.close()
    second = lock_state_dir(tmp_path)
    second.close()


def test_run_exits_when_startup_fails(tmp_path, capsys, caplog):
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ndata:\n  source: files\n  train_path: missing.jsonl\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level("INFO")

    assert main(["run", "--config", str(config), "--port", str(port)]) == 1

    error = capsys.readouterr().err
    assert "monitor startup failed" in error
    assert "data.train_path: file not found" in error
    messages = [record.getMessage() for record in caplog.records]
    assert f"monitor listening on http://127.0.0.1:{port}" in messages
    assert "monitor stopped" in messages


def test_sigterm_stops_server_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nserver:\n  monitor_url: null\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "model server stopped" in output
