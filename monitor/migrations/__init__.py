"""Schema migrations of the store (Alembic), run at start-up in place of ``create_all``.

Revisions live in ``versions/``. A database made by a driftloop release before
migrations has the tables but no ``alembic_version`` table: it is stamped at
the revision its tables match, then upgraded like any other.
"""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent
# Session-level advisory lock key that serialises migrations of replicas starting together.
POSTGRES_MIGRATION_LOCK = 0x64726C6D  # "drlm"
# Tables that tell apart the schemas made by create_all before migrations, newest first.
LEGACY_SCHEMAS = (("promotion_watches", "0002"), ("events", "0001"))


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Build the Alembic config of the bundled revisions; with ``connection``, migrations run on it."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """Return the revision stamped in the database, or None when it has no ``alembic_version`` table."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def legacy_revision(connection: Connection) -> str | None:
    """Return the revision whose tables a database without ``alembic_version`` has, or None when it is empty."""
    tables = set(inspect(connection).get_table_names())
    for table, revision in LEGACY_SCHEMAS:
        if table in tables:
            return revision
    return None


def upgrade_database(engine: Engine) -> str:
    """Bring the database to the newest revision; return that revision.

    Does nothing when the database is already there. Otherwise it takes a lock, so
    replicas (PostgreSQL) or processes (SQLite) that start together migrate once.
    """
    head = head_revision()
    if current_revision(engine) == head:
        return head
    with _migration_lock(engine):
        with engine.begin() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            if current == head:
                return head
            config = alembic_config(connection)
            if current is None:
                legacy = legacy_revision(connection)
                if legacy is not None:
                    logger.info("database has the tables of schema revision %s but no alembic_version table "
                                "(made before migrations); stamping it at %s", legacy, legacy)
                    command.stamp(config, legacy)
                    current = legacy
            logger.info("upgrading the database schema from revision %s to %s", current or "none (empty)", head)
            command.upgrade(config, "head")
    return head


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": POSTGRES_MIGRATION_LOCK})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": POSTGRES_MIGRATION_LOCK})
                connection.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        # NOTE: other backends migrate without a lock; start one process first.
        yield
        return
    with open(f"{database}.migrate-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
