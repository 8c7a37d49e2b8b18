"""SQLAlchemy tables and the queries the monitor and the retraining side share.

The store contains facts, not decisions: events with their delayed labels, window
reports, retraining runs, adapter versions with the active pointer, and the
audit log. SQLite is the default and PostgreSQL is tested too. Other SQLAlchemy
URLs may work. The schema is created and upgraded by the Alembic revisions in
``monitor.migrations``.

Portability rules the queries follow: timestamps are Unix seconds in double
precision columns, identifiers fit their ``String`` lengths (PostgreSQL enforces
them, SQLite does not), upserts use ``INSERT ... ON CONFLICT`` of the dialect
instead of ``session.merge``, which reads before it writes and so races between
replicas, and a check that must not race is one ``UPDATE ... WHERE`` statement.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from monitor.errors import DriftloopError

logger = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    timestamp: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    text: Mapped[str] = mapped_column(Text)
    predicted_label: Mapped[str] = mapped_column(String(256))
    confidence: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    version: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    window_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    true_label: Mapped[str | None] = mapped_column(String(256), nullable=True)
    labelled_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


# The events table's columns in the order ``_event_values`` gives them: the labels last.
EVENT_FIELDS = ("id", "timestamp", "received_at", "text", "predicted_label", "confidence", "latency_ms", "version",
                "window_id")
EVENT_COLUMNS = (*EVENT_FIELDS, "true_label", "labelled_at")
_event_fields = itemgetter(*EVENT_FIELDS)


def _event_values(row: dict[str, Any], pending: tuple[str, float] | None) -> tuple:
    """Return one event's column values; ``pending`` is a label (and its time) that waited for the event."""
    try:
        fields = _event_fields(row)
    except KeyError:  # a row that leaves out optional fields
        fields = tuple(row.get(name) for name in EVENT_FIELDS)
    if pending is None:
        pending = (row.get("true_label"), row.get("labelled_at"))
    return (*fields, *pending)


class PendingLabelRow(Base):
    """A delayed label that arrived before its event; applied when the event is stored."""

    __tablename__ = "pending_labels"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    label: Mapped[str] = mapped_column(String(256))
    received_at: Mapped[float] = mapped_column(Float, index=True)


class WindowRow(Base):
    __tablename__ = "windows"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float] = mapped_column(Float, index=True)
    evaluated_at: Mapped[float] = mapped_column(Float, index=True)
    n_events: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    drifted: Mapped[bool] = mapped_column(Boolean)
    report: Mapped[str] = mapped_column(Text)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    base_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    candidate_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    promoted_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    trigger: Mapped[str] = mapped_column(Text, default="{}")
    training: Mapped[str] = mapped_column(Text, default="{}")
    canary: Mapped[str] = mapped_column(Text, default="{}")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class VersionRow(Base):
    __tablename__ = "versions"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    adapter_dir: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("runs.id"), nullable=True)
    train_data: Mapped[str | None] = mapped_column(Text, nullable=True)


class ActiveRow(Base):
    """One row: the registry's active-version pointer."""

    __tablename__ = "active_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(128), ForeignKey("versions.name"))
    changed_at: Mapped[float] = mapped_column(Float)


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    timestamp: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")


class WatchRow(Base):
    """The post-promotion watch of one promoted version: its baseline and its latest verdict."""

    __tablename__ = "promotion_watches"
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    previous: Mapped[str | None] = mapped_column(String(128), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32), index=True)
    baseline: Mapped[str] = mapped_column(Text, default="{}")
    result: Mapped[str] = mapped_column(Text, default="{}")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the server and the CLI read while the daemon writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def redacted_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


class DatabaseUnavailableError(DriftloopError):
    """The database could not be reached: the connection was refused, lost or timed out."""


# SQLSTATE codes of a PostgreSQL server that is shutting down or starting up (class 08 is
# "connection exception").
_POSTGRES_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")
_SQLITE_UNAVAILABLE_MESSAGES = ("database is locked", "unable to open database file", "disk i/o error")


def is_connection_error(exc: BaseException) -> bool:
    """True for errors of an unreachable database (refused, lost or locked), which a later retry may overcome.

    Errors in the statement itself, such as a missing table or a constraint, are False.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    kinds = {cls.__name__ for cls in type(orig).__mro__}
    if "InterfaceError" in kinds:
        return True
    if "OperationalError" not in kinds:
        return False
    module = type(orig).__module__
    if module.startswith("sqlite3"):
        return any(message in str(orig).lower() for message in _SQLITE_UNAVAILABLE_MESSAGES)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    # A client-side failure to connect (refused, timed out) has no SQLSTATE.
    return state is None or state.startswith("08") or state in _POSTGRES_UNAVAILABLE_STATES


class Store:
    """Session factory plus the queries; safe to share between threads.

    Opening a store connects, and upgrades the schema to the newest migration.
    Raises DatabaseUnavailableError, naming the URL without its password, when
    the database cannot be reached.
    """

    def __init__(self, url: str, *, migrate: bool = True):
        from monitor.migrations import upgrade_database

        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            # The value is not repeated, because it may contain a password.
            raise DriftloopError("database_url is not a valid SQLAlchemy URL (value not shown); expected e.g. "
                                 "sqlite:////path/driftloop.db or "
                                 "postgresql+psycopg://user:password@host:5432/driftloop") from None
        self.dialect = parsed.get_backend_name()
        database = parsed.database
        if self.dialect == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {}
        if self.dialect == "postgresql" and "connect_timeout" not in parsed.query:
            # Without it a connection to an unreachable host waits for the operating system's TCP timeout.
            options["connect_args"] = {"connect_timeout": 10}
        try:
            # A pooled connection to a server can go stale; a file database cannot, so SQLite skips the ping.
            self.engine = create_engine(url, pool_pre_ping=self.dialect != "sqlite", **options)
        except Exception as exc:  # noqa: BLE001 - a missing driver or a bad option; reported with the URL
            raise DriftloopError(f"cannot open the database {redacted_url(url)}: {exc}") from None
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            if migrate:
                upgrade_database(self.engine)
        except DBAPIError as exc:
            self.engine.dispose()
            if is_connection_error(exc):
                raise DatabaseUnavailableError(
                    f"cannot connect to the database {redacted_url(url)}: {_first_line(exc.orig)}"
                ) from None
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The maximum number of parameters in one statement. SQLite before 3.32 allows 999.
        self._max_parameters = 65535 if self.dialect == "postgresql" else 999
        if self.dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 32):
            self._max_parameters = 32766
        self._any_pending_label = select(select(PendingLabelRow.__table__.c.event_id).limit(1).exists())

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Run ``SELECT 1``; raises the driver's error when the database is unreachable."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def _upsert(self, session: Session, row_type: type[Base], values: dict[str, Any], keys: tuple[str, ...]) -> None:
        """Insert ``values``, or update the row with the same ``keys`` to them, in one statement."""
        if self.dialect not in ("sqlite", "postgresql"):
            session.merge(row_type(**values))
            return
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        statement = dialect.insert(row_type).values(**values)
        changes = {name: statement.excluded[name] for name in values if name not in keys}
        session.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=changes))

    # Events and labels

    def insert_events(
        self, rows: Iterable[dict[str, Any]], place: Callable[[list[dict[str, Any]]], dict[str, list[str]]] | None = None
    ) -> tuple[int, list[str], int]:
        """Insert events and attach their pending labels, in one transaction.

        Returns (inserted count, ids that already existed, pending labels applied). One
        ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` skips the stored ids and returns
        the ids it inserted. So a duplicate from another replica, or from a replayed buffer
        whose first commit reached the database, needs no SELECT beforehand.

        ``place`` receives the inserted rows in their order, before the commit. It returns
        ``{window_id: ids}`` for rows that belong to another window than the ``window_id`` they
        were written with (a window that closed in the middle of the batch), and those rows are
        moved in the same transaction.
        """
        rows = list(rows)
        if not rows:
            return 0, [], 0
        ids = [row["id"] for row in rows]
        events, labels = EventRow.__table__, PendingLabelRow.__table__
        with self.engine.begin() as connection:
            pending: dict[str, tuple[str, float]] = {}
            # Labels usually come after their events, so the table is usually empty: a check
            # without parameters is cheaper than the IN query with a hundred of them.
            if connection.execute(self._any_pending_label).scalar():
                found = connection.execute(
                    select(labels.c.event_id, labels.c.label, labels.c.received_at).where(labels.c.event_id.in_(ids)))
                pending = {event_id: (label, received_at) for event_id, label, received_at in found}
            values = [_event_values(row, pending.get(row["id"])) for row in rows]
            inserted = self._insert_new_events(connection, values)
            moved = place([row for row in rows if row["id"] in inserted]) if place else {}
            for window_id, moved_ids in moved.items():
                connection.execute(update(events).where(events.c.id.in_(moved_ids)).values(window_id=window_id))
            applied = [event_id for event_id in pending if event_id in inserted]
            if applied:
                connection.execute(delete(labels).where(labels.c.event_id.in_(applied)))
        return len(inserted), [event_id for event_id in ids if event_id not in inserted], len(applied)

    def _insert_new_events(self, connection: Connection, values: list[tuple]) -> set[str]:
        """Insert the events (as ``_event_values`` tuples) whose id is not stored yet; return the ids inserted.

        On SQLite and PostgreSQL this is one multi-row ``INSERT ... ON CONFLICT (id) DO NOTHING
        RETURNING id`` in the driver's own SQL. SQLAlchemy's executemany with RETURNING builds
        each row's parameters in Python, and on a batch of 100 events that was the largest
        single cost of ingest (profile in docs/operations.md).
        """
        table = EventRow.__table__
        placeholder = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(self.engine.dialect.paramstyle)
        if self.dialect not in ("sqlite", "postgresql") or placeholder is None:
            existing = set(connection.scalars(select(table.c.id).where(table.c.id.in_([row[0] for row in values]))))
            fresh = [dict(zip(EVENT_COLUMNS, row)) for row in values if row[0] not in existing]
            if fresh:
                connection.execute(insert(table), fresh)
            return {row["id"] for row in fresh}
        per_statement = max(1, self._max_parameters // len(EVENT_COLUMNS))
        tuple_sql = "(" + ", ".join([placeholder] * len(EVENT_COLUMNS)) + ")"
        inserted: set[str] = set()
        for start in range(0, len(values), per_statement):
            chunk = values[start:start + per_statement]
            sql = (f"INSERT INTO {table.name} ({', '.join(EVENT_COLUMNS)}) "
                   f"VALUES {', '.join([tuple_sql] * len(chunk))} ON CONFLICT (id) DO NOTHING RETURNING id")
            parameters = tuple(chain.from_iterable(chunk))
            inserted.update(event_id for (event_id,) in connection.exec_driver_sql(sql, parameters))
        return inserted

    def known_event_ids(self, ids: list[str]) -> set[str]:
        # A Core query on a plain connection: an ORM session adds a millisecond or so that buys nothing here.
        table = EventRow.__table__
        with self.engine.connect() as connection:
            return set(connection.execute(select(table.c.id).where(table.c.id.in_(ids))).scalars())

    def add_pending_labels(self, labels: dict[str, str]) -> None:
        """Keep labels whose events have not arrived; a later label for the same id replaces the earlier."""
        now = time.time()
        with self.session() as session:
            for event_id, label in labels.items():
                self._upsert(session, PendingLabelRow, {"event_id": event_id, "label": label, "received_at": now},
                             ("event_id",))

    def count_pending_labels(self) -> int:
        with self.session() as session:
            return int(session.scalar(select(func.count()).select_from(PendingLabelRow)) or 0)

    def expire_pending_labels(self, older_than: float) -> int:
        """Delete pending labels received before ``older_than``; return how many."""
        with self.session() as session:
            result = session.execute(delete(PendingLabelRow).where(PendingLabelRow.received_at < older_than))
            return int(result.rowcount or 0)

    def delete_old_events(self, received_before: float, *, labelled: bool, limit: int) -> int:
        """Delete at most ``limit`` of the labelled or the unlabelled events received before ``received_before``.

        Returns how many were deleted. A caller deletes in batches, so that no transaction
        holds the write lock for long.
        """
        events = EventRow.__table__
        labels = events.c.true_label.is_not(None) if labelled else events.c.true_label.is_(None)
        return self._delete_batch(events, events.c.received_at < received_before, labels, limit=limit)

    def delete_old_windows(self, ended_before: float, *, limit: int) -> int:
        """Delete at most ``limit`` window reports of windows that ended before ``ended_before``; return how many."""
        windows = WindowRow.__table__
        return self._delete_batch(windows, windows.c.ended_at < ended_before, limit=limit)

    def _delete_batch(self, table, *conditions, limit: int) -> int:
        batch = select(table.c.id).where(*conditions).limit(limit)
        with self.engine.begin() as connection:
            return int(connection.execute(delete(table).where(table.c.id.in_(batch))).rowcount or 0)

    def set_labels(self, labels: dict[str, str]) -> int:
        now = time.time()
        with self.session() as session:
            for event_id, label in labels.items():
                session.execute(
                    update(EventRow).where(EventRow.id == event_id).values(true_label=label, labelled_at=now)
                )
        return len(labels)

    def count_labelled(self, since: float | None = None) -> int:
        with self.session() as session:
            query = select(func.count()).select_from(EventRow).where(EventRow.true_label.is_not(None))
            if since is not None:
                query = query.where(EventRow.received_at >= since)
            return int(session.scalar(query) or 0)

    def labelled_events(self, since: float | None = None) -> list[tuple[str, str, str]]:
        """Return (event id, text, true label) of labelled events, oldest first."""
        with self.session() as session:
            query = select(EventRow.id, EventRow.text, EventRow.true_label).where(EventRow.true_label.is_not(None))
            if since is not None:
                query = query.where(EventRow.received_at >= since)
            return [tuple(row) for row in session.execute(query.order_by(EventRow.received_at))]

    def recent_texts(self, limit: int) -> list[str]:
        with self.session() as session:
            query = select(EventRow.text).order_by(EventRow.received_at.desc()).limit(limit)
            return list(session.scalars(query))

    def window_accuracy(self, window_id: str) -> tuple[int, float | None]:
        """Return (labelled events, realized accuracy) of one window."""
        with self.session() as session:
            rows = session.execute(
                select(EventRow.predicted_label, EventRow.true_label).where(
                    EventRow.window_id == window_id, EventRow.true_label.is_not(None)
                )
            ).all()
        if not rows:
            return 0, None
        return len(rows), sum(predicted == true for predicted, true in rows) / len(rows)

    def assign_window(self, event_ids: list[str], window_id: str) -> None:
        with self.session() as session:
            session.execute(update(EventRow).where(EventRow.id.in_(event_ids)).values(window_id=window_id))

    # Windows

    def insert_window(self, report: dict[str, Any], version: str | None) -> None:
        with self.session() as session:
            session.add(
                WindowRow(
                    id=report["window_id"],
                    version=version,
                    started_at=report["started_at"],
                    ended_at=report["ended_at"],
                    evaluated_at=time.time(),
                    n_events=report["n_events"],
                    status=report["status"],
                    drifted=bool(report["drifted"]),
                    report=json.dumps(report),
                )
            )

    def window(self, window_id: str) -> dict[str, Any] | None:
        """Return one window report with its version, or None when the id is unknown."""
        with self.session() as session:
            row = session.get(WindowRow, window_id)
            return json.loads(row.report) | {"version": row.version} if row else None

    def window_events(self, window_id: str) -> list[dict[str, Any]]:
        """Return the events of one window in arrival order: text, prediction, confidence, latency, label."""
        with self.session() as session:
            rows = session.execute(
                select(EventRow.text, EventRow.predicted_label, EventRow.confidence, EventRow.latency_ms,
                       EventRow.true_label)
                .where(EventRow.window_id == window_id)
                .order_by(EventRow.received_at)
            ).all()
        keys = ("text", "predicted_label", "confidence", "latency_ms", "true_label")
        return [dict(zip(keys, row)) for row in rows]

    def windows(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.session() as session:
            rows = session.scalars(select(WindowRow).order_by(WindowRow.ended_at.desc()).limit(limit)).all()
            return [json.loads(row.report) | {"version": row.version} for row in rows]

    # Runs

    def create_run(self, run_id: str, state: str, base_version: str | None, trigger: dict[str, Any]) -> None:
        now = time.time()
        with self.session() as session:
            session.add(
                RunRow(
                    id=run_id,
                    state=state,
                    created_at=now,
                    updated_at=now,
                    base_version=base_version,
                    trigger=json.dumps(trigger),
                )
            )

    def update_run(self, run_id: str, **values: Any) -> None:
        values = _run_values(values)
        with self.session() as session:
            session.execute(update(RunRow).where(RunRow.id == run_id).values(**values))

    def touch_run(self, run_id: str) -> None:
        """Set the run's updated_at to now: the heartbeat of the process working on it."""
        with self.session() as session:
            session.execute(update(RunRow).where(RunRow.id == run_id).values(updated_at=time.time()))

    def transition_run(self, run_id: str, from_states: Iterable[str], state: str, *, actor: str, action: str,
                       detail: dict[str, Any] | None = None, **values: Any) -> bool:
        """Move a run to ``state`` only if it is in one of ``from_states``; write the audit row with it.

        The check and the update are one UPDATE statement, so two callers (an approval and a
        cancel, or two approvals) cannot both win. Returns False, changing nothing, when the
        run is missing or in another state.
        """
        values = _run_values({**values, "state": state})
        with self.session() as session:
            result = session.execute(
                update(RunRow).where(RunRow.id == run_id, RunRow.state.in_(list(from_states))).values(**values)
            )
            if result.rowcount != 1:
                return False
            self.audit(actor, action, run_id=run_id, version=None, detail=detail, session=session)
        return True

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.get(RunRow, run_id)
            return _run_dict(row) if row else None

    def runs(self, states: Iterable[str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self.session() as session:
            query = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
            if states is not None:
                query = query.where(RunRow.state.in_(list(states)))
            return [_run_dict(row) for row in session.scalars(query)]

    # Post-promotion watches

    def windows_of_version(self, version: str, since: float, limit: int = 10000) -> list[dict[str, Any]]:
        """Return the window reports of ``version`` that ended at or after ``since``, oldest first."""
        with self.session() as session:
            rows = session.scalars(
                select(WindowRow).where(WindowRow.version == version, WindowRow.ended_at >= since)
                .order_by(WindowRow.ended_at).limit(limit)
            ).all()
            return [json.loads(row.report) | {"version": row.version} for row in rows]

    def windows_evaluated_since(self, since: float, limit: int = 10000) -> list[dict[str, Any]]:
        """Return the window reports of every replica evaluated at or after ``since``, by end time.

        Each report also has its ``version`` and ``evaluated_at``.
        """
        with self.session() as session:
            rows = session.scalars(
                select(WindowRow).where(WindowRow.evaluated_at >= since)
                .order_by(WindowRow.ended_at, WindowRow.id).limit(limit)
            ).all()
            return [json.loads(row.report) | {"version": row.version, "evaluated_at": row.evaluated_at}
                    for row in rows]

    def last_windows_of_version(self, version: str, count: int) -> list[dict[str, Any]]:
        """Return the ``count`` latest window reports of ``version``, oldest first."""
        with self.session() as session:
            rows = session.scalars(
                select(WindowRow).where(WindowRow.version == version).order_by(WindowRow.ended_at.desc()).limit(count)
            ).all()
            return [json.loads(row.report) | {"version": row.version} for row in reversed(rows)]

    def start_watch(self, version: str, previous: str | None, run_id: str | None, baseline: dict[str, Any],
                    status: str = "watching") -> None:
        now = time.time()
        with self.session() as session:
            self._upsert(session, WatchRow,
                         {"version": version, "previous": previous, "run_id": run_id, "started_at": now,
                          "updated_at": now, "status": status, "baseline": json.dumps(baseline),
                          "result": json.dumps({})},
                         ("version",))

    def update_watch(self, version: str, status: str, result: dict[str, Any]) -> None:
        with self.session() as session:
            row = session.get(WatchRow, version)
            if row is not None:
                row.status = status
                row.result = json.dumps(result)
                row.updated_at = time.time()

    def watch(self, version: str) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.get(WatchRow, version)
            if row is None:
                return None
            return {"version": row.version, "previous": row.previous, "run_id": row.run_id,
                    "started_at": row.started_at, "updated_at": row.updated_at, "status": row.status,
                    "baseline": json.loads(row.baseline), "result": json.loads(row.result)}

    # Audit

    def audit(self, actor: str, action: str, *, run_id: str | None = None, version: str | None = None,
              detail: dict[str, Any] | None = None, session: Session | None = None) -> None:
        row = AuditRow(
            timestamp=time.time(),
            actor=actor,
            action=action,
            run_id=run_id,
            version=version,
            detail=json.dumps(detail or {}),
        )
        if session is not None:
            session.add(row)
            return
        with self.session() as own:
            own.add(row)

    def last_audit_entry(self, actions: Iterable[str], *, detail_key: str, detail_value: Any,
                         scan: int = 200) -> dict[str, Any] | None:
        """Return the newest audit entry with one of ``actions`` whose detail has ``detail_key`` equal to
        ``detail_value``, among the newest ``scan`` entries with those actions; None when there is none."""
        with self.session() as session:
            rows = session.scalars(select(AuditRow).where(AuditRow.action.in_(list(actions)))
                                   .order_by(AuditRow.id.desc()).limit(scan))
            for row in rows:
                detail = json.loads(row.detail)
                if detail.get(detail_key) == detail_value:
                    return {"id": row.id, "timestamp": row.timestamp, "actor": row.actor, "action": row.action,
                            "run_id": row.run_id, "version": row.version, "detail": detail}
        return None

    def events_of_window(self, window_id: str) -> list[dict[str, Any]]:
        """Return the stored events of one window in arrival order."""
        table = EventRow.__table__
        with self.engine.connect() as connection:
            result = connection.execute(select(table.c.id, table.c.text, table.c.predicted_label, table.c.confidence,
                                               table.c.latency_ms, table.c.version, table.c.received_at)
                                        .where(table.c.window_id == window_id)
                                        .order_by(table.c.received_at, table.c.id))
            return [dict(row._mapping) for row in result]

    def audit_ids(self, actions: Iterable[str], since_id: int = 0) -> list[int]:
        """Return the ids of audit entries with one of ``actions`` after ``since_id``, oldest first."""
        with self.session() as session:
            query = select(AuditRow.id).where(AuditRow.id > since_id, AuditRow.action.in_(list(actions)))
            return list(session.scalars(query.order_by(AuditRow.id)))

    def last_audit_id(self) -> int:
        with self.session() as session:
            return int(session.scalar(select(func.max(AuditRow.id))) or 0)

    def audit_log(self, since_id: int = 0, limit: int = 200, latest: bool = False,
                  run_id: str | None = None) -> list[dict[str, Any]]:
        """Return audit entries oldest first: the first ``limit`` after ``since_id``, or the last ``limit``.

        With ``run_id``, only the entries of that retraining run.
        """
        with self.session() as session:
            query = select(AuditRow).where(AuditRow.id > since_id)
            if run_id is not None:
                query = query.where(AuditRow.run_id == run_id)
            if latest:
                query = query.order_by(AuditRow.id.desc()).limit(limit)
            else:
                query = query.order_by(AuditRow.id).limit(limit)
            rows = sorted(session.scalars(query).all(), key=lambda row: row.id)
            return [
                {
                    "id": row.id,
                    "timestamp": row.timestamp,
                    "actor": row.actor,
                    "action": row.action,
                    "run_id": row.run_id,
                    "version": row.version,
                    "detail": json.loads(row.detail),
                }
                for row in rows
            ]


def open_store(url: str, *, attempts: int, initial_delay_s: float, max_delay_s: float,
               sleep=time.sleep) -> Store:
    """Open the store, retrying an unreachable database with exponential backoff.

    Each failed attempt logs a warning with the URL (password hidden) and the error.
    After ``attempts`` failures the last DatabaseUnavailableError is raised, with the
    number of attempts and the time spent added to its message.
    """
    delay = initial_delay_s
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return Store(url)
        except DatabaseUnavailableError as exc:
            if attempt == attempts:
                raise DatabaseUnavailableError(
                    f"{exc} (gave up after {attempts} attempts in {time.monotonic() - started:.0f} s; "
                    "check database_url and that the database server is running, or raise "
                    "database.connect_attempts)"
                ) from None
            logger.warning("database unreachable (attempt %d of %d): %s; retrying in %.1f s",
                           attempt, attempts, exc, delay)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")


def _first_line(error: BaseException | None) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def job_status(state: str) -> str:
    """Map a run state to the job's coarse status: queued, running, succeeded, failed or cancelled.

    A run whose training and canary finished has succeeded as a job, whatever the approval decides.
    A run cancelled at any point, even while it waited for approval, is cancelled.
    """
    if state == "queued":
        return "queued"
    if state in ("training", "evaluating", "cancelling"):
        return "running"
    if state in ("failed", "cancelled"):
        return state
    return "succeeded"


def _run_values(values: dict[str, Any]) -> dict[str, Any]:
    """Encode a run update's JSON columns and stamp its time."""
    encoded = {key: json.dumps(value) if key in ("trigger", "training", "canary") and not isinstance(value, str) else value
               for key, value in values.items()}
    encoded["updated_at"] = time.time()
    return encoded


def _run_dict(row: RunRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "job": job_status(row.state),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "base_version": row.base_version,
        "candidate_dir": row.candidate_dir,
        "promoted_version": row.promoted_version,
        "trigger": json.loads(row.trigger or "{}"),
        "training": json.loads(row.training or "{}"),
        "canary": json.loads(row.canary or "{}"),
        "error": row.error,
    }
