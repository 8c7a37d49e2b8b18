"""Alembic migrations on SQLite and PostgreSQL: the revisions build the models' schema, and older databases upgrade."""

import json

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from monitor.cli import main
from monitor.migrations import alembic_config, current_revision, head_revision
from monitor.store import Base, Store


def schema_differences(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    return differences


def legacy_database(url: str, *, with_watches: bool) -> None:
    """Create the tables as a driftloop release before migrations did (create_all), with rows in them.

    Without watches it is the schema of the release before the post-promotion watch. Neither
    had the index on windows.evaluated_at.
    """
    engine = create_engine(url)
    tables = [table for table in Base.metadata.sorted_tables if with_watches or table.name != "promotion_watches"]
    Base.metadata.create_all(engine, tables=tables)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_windows_evaluated_at"))
        connection.execute(text(
            "INSERT INTO events (id, timestamp, received_at, text, predicted_label, confidence, window_id, true_label) "
            "VALUES ('e1', 1.5, 2.5, 'move my money', 'transfer', 0.9, 'w1', 'transfer')"))
        connection.execute(text("INSERT INTO runs (id, state, created_at, updated_at, base_version, trigger, training, "
                                "canary) VALUES ('r1', 'active', 1, 2, NULL, '{}', '{}', '{}')"))
        connection.execute(text("INSERT INTO versions (name, number, created_at, adapter_dir, run_id) "
                                "VALUES ('v1', 1, 3, '/adapters/v1', 'r1')"))
        connection.execute(text("INSERT INTO active_version (id, version, changed_at) VALUES (1, 'v1', 4)"))
        connection.execute(text("INSERT INTO audit (timestamp, actor, action, version, detail) "
                                "VALUES (5, 'alice', 'activate', 'v1', '{\"previous\": null}')"))
    engine.dispose()


def test_revisions_build_models_schema(database_url):
    Store(database_url).close()
    assert schema_differences(database_url) == []


def test_empty_database_reaches_head(database_url):
    store = Store(database_url)
    try:
        assert current_revision(store.engine) == head_revision()
        assert head_revision() == "0003"
    finally:
        store.close()


@pytest.mark.parametrize("with_watches, stamped", [(False, "0001"), (True, "0002")], ids=["before-watch", "with-watch"])
def test_legacy_database_upgrades_with_rows(database_url, caplog, with_watches, stamped):
    legacy_database(database_url, with_watches=with_watches)
    caplog.set_level("INFO", logger="monitor.migrations")
    store = Store(database_url)
    try:
        assert f"stamping it at {stamped}" in caplog.text
        assert current_revision(store.engine) == head_revision()
        assert store.labelled_events() == [("e1", "move my money", "transfer")]
        assert store.get_run("r1")["state"] == "active"
        [entry] = store.audit_log()
        assert entry["actor"] == "alice"
        assert entry["detail"] == {"previous": None}
        # The table of the second revision works, and new audit ids follow the old ones.
        store.start_watch("v1", None, "r1", {"events": 0})
        assert store.watch("v1")["run_id"] == "r1"
        store.audit("bob", "rollback", version="v1")
        assert store.last_audit_id() == 2
    finally:
        store.close()
    assert schema_differences(database_url) == []


def test_downgrade_then_upgrade_keeps_rows(database_url):
    Store(database_url).close()
    legacy_rows = Store(database_url)
    legacy_rows.create_run("r9", "queued", None, {"reason": "test"})
    legacy_rows.close()
    engine = create_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    assert "promotion_watches" not in inspect(engine).get_table_names()
    engine.dispose()
    store = Store(database_url)
    try:
        assert store.get_run("r9")["trigger"] == {"reason": "test"}
        assert current_revision(store.engine) == "0003"
    finally:
        store.close()


def test_cli_db_current_and_upgrade(database_url, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "database_url": database_url}))
    legacy_database(database_url, with_watches=False)

    assert main(["db", "current", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "schema at revision 0001 (tables made before migrations, not stamped yet); newest is 0003" in output

    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert "schema at revision 0003 (newest)" in capsys.readouterr().out
    assert main(["db", "current", "--config", str(config)]) == 0
    assert "schema at revision 0003 (newest)" in capsys.readouterr().out
