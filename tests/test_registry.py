import json
import logging

import pytest

from monitor.cli import main
from monitor.errors import RegistryError
from monitor.store import Store
from retrain.registry import Registry


def make_candidate(folder, labels=("a", "b")):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    (folder / "train.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    return folder


@pytest.fixture()
def registry(tmp_path, database_url):
    store = Store(database_url)
    yield Registry(store, tmp_path / "state")
    store.close()


def test_register_names_are_sequential(registry, tmp_path):
    first = registry.register(make_candidate(tmp_path / "c1"), parent=None, run_id=None, actor="test")
    second = registry.register(make_candidate(tmp_path / "c2"), parent="v1", run_id=None, actor="test")
    assert (first.name, second.name) == ("v1", "v2")
    assert second.adapter_dir.is_dir()
    assert not (tmp_path / "c2").exists()


def test_incomplete_candidate_rejected(registry, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    with pytest.raises(RegistryError, match="adapter_config.json"):
        registry.register(folder, parent=None, run_id=None, actor="test")


def test_activate_and_rollback(registry, tmp_path):
    for index in (1, 2, 3):
        registry.register(make_candidate(tmp_path / f"c{index}"), parent=None, run_id=None, actor="test")
    registry.activate("v1", actor="test")
    registry.activate("v3", actor="test", action="promote")
    assert registry.active().name == "v3"
    previous, target = registry.rollback(None, actor="oncall")
    assert (previous, target) == ("v3", "v1")
    assert registry.active().name == "v1"
    registry.rollback("v2", actor="oncall")
    assert registry.active().name == "v2"


def test_rollback_errors(registry, tmp_path):
    with pytest.raises(RegistryError, match="no active version"):
        registry.rollback(None, actor="oncall")
    registry.register(make_candidate(tmp_path / "c1"), parent=None, run_id=None, actor="test")
    registry.activate("v1", actor="test")
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback(None, actor="oncall")
    with pytest.raises(RegistryError, match="'v9' not found"):
        registry.rollback("v9", actor="oncall")


def test_repeated_rollback_steps_back(registry, tmp_path):
    store = registry.store
    for index in (1, 2, 3):
        run_id = f"r{index}"
        store.create_run(run_id, "active", base_version=None, trigger={})
        registry.register(make_candidate(tmp_path / f"c{index}"), parent=None, run_id=run_id, actor="test")
    registry.activate("v1", actor="test")
    registry.activate("v2", actor="test", action="promote")
    registry.activate("v3", actor="test", action="promote")

    assert registry.rollback(None, actor="oncall") == ("v3", "v2")
    assert store.get_run("r3")["state"] == "rolled_back"
    assert store.get_run("r2")["state"] == "active"
    # A second rollback keeps going back; it never returns to the version just left.
    assert registry.rollback(None, actor="oncall") == ("v2", "v1")
    assert store.get_run("r2")["state"] == "rolled_back"
    with pytest.raises(RegistryError, match="v1 has no earlier version"):
        registry.rollback(None, actor="oncall")

    # An explicit --to a newer version goes on top of the history.
    assert registry.rollback("v3", actor="oncall") == ("v1", "v3")
    assert store.get_run("r3")["state"] == "active"
    assert registry.rollback(None, actor="oncall") == ("v3", "v1")


def test_names_never_reused_after_folder_removal(registry, tmp_path):
    registry.register(make_candidate(tmp_path / "c1"), parent=None, run_id=None, actor="test")
    registry.register(make_candidate(tmp_path / "c2"), parent=None, run_id=None, actor="test")
    assert registry.register(make_candidate(tmp_path / "c3"), parent=None, run_id=None, actor="test").name == "v3"


def test_cli_rollback_and_history(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    store = Store(f"sqlite:///{tmp_path / 'state' / 'driftloop.db'}")
    registry = Registry(store, tmp_path / "state")
    for index in (1, 2):
        registry.register(make_candidate(tmp_path / f"c{index}"), parent=None, run_id=None, actor="test")
    registry.activate("v1", actor="test")
    registry.activate("v2", actor="test", action="promote")

    assert main(["rollback", "--config", str(config), "--by", "alice", "--comment", "bad canary"]) == 0
    assert registry.active().name == "v1"
    assert main(["history", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "rollback" in output
    assert "actor=alice" in output

    # --limit keeps the latest entries, printed oldest first.
    assert main(["history", "--config", str(config), "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert " promote " in lines[0]
    assert " rollback " in lines[1]


def test_cli_approve_unknown_run_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    Store(f"sqlite:///{tmp_path / 'state' / 'driftloop.db'}").close()
    assert main(["approve", "r-missing", "--config", str(config)]) == 2
    assert "r-missing" in capsys.readouterr().err


def test_cli_without_state_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'nowhere'}\n")
    assert main(["runs", "--config", str(config)]) == 2
    assert "no driftloop state at" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_cli_rejects_negative_limit(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["history", "--limit", "-3"])
    assert caught.value.code == 2
    assert "invalid value -3: expected at least 1" in capsys.readouterr().err


def test_cli_bad_config_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("monitor:\n  window_size: 1\n")
    assert main(["versions", "--config", str(config)]) == 2
    assert "monitor.window_size" in capsys.readouterr().err


def test_server_sources_name_the_run_and_the_waiting_candidates(registry, tmp_path):
    store = registry.store
    assert registry.active_for_server() is None
    for run_id, state in (("r1", "pending_approval"), ("r2", "awaiting_data"), ("r3", "rejected"),
                          ("r4", "pending_approval")):
        store.create_run(run_id, "queued", "v1", {})
        folder = make_candidate(tmp_path / "runs" / run_id) if run_id != "r4" else tmp_path / "runs" / "r4-deleted"
        store.update_run(run_id, state=state, candidate_dir=str(folder))

    waiting = registry.candidates_for_server(("pending_approval", "awaiting_data"))
    # r3 is no longer waiting and r4's folder is gone; the newest comes first.
    assert sorted(waiting) == [("r1", str(tmp_path / "runs" / "r1")), ("r2", str(tmp_path / "runs" / "r2"))]

    version = registry.register(tmp_path / "runs" / "r1", parent=None, run_id="r1", actor="test")
    registry.activate(version.name, actor="test")
    assert registry.active_for_server() == ("v1", str(version.adapter_dir), "r1")


def test_cli_hides_alembic_context_lines(tmp_path, caplog):
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    Store(f"sqlite:///{tmp_path / 'state' / 'driftloop.db'}").close()
    with caplog.at_level(logging.INFO):
        assert main(["history", "--config", str(config)]) == 0
    alembic = [record.getMessage() for record in caplog.records if record.name.startswith("alembic")]
    assert alembic == []
