"""Leader election among sidecar replicas that share one database.

Every replica ingests its own traffic and evaluates its own windows. Only the
leader makes the scheduled decisions: it applies the trigger policy to the
windows of all replicas, starts and runs retrains, promotes approved runs,
evaluates waiting runs again and judges the post-promotion watch.

On PostgreSQL the leader is the replica that holds a session-level advisory
lock (``pg_try_advisory_lock``) on a connection kept open for as long as it
leads. The server releases the lock when that session ends, so when the leader
dies another replica gets the lock at its next scheduled check. On SQLite there
is one replica, and it is always the leader.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from monitor.store import Store, redacted_url

logger = logging.getLogger(__name__)

# Advisory lock key of the leadership; advisory locks are per database, so
# deployments in separate databases of one server do not compete.
LEADER_LOCK_KEY = 0x64726C6C  # "drll"


def replica_name() -> str:
    """Name this replica in logs and status: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    """Whether this replica is the leader, kept current by ``refresh`` at every scheduled check.

    NOTE: a leader whose database connection hangs without closing keeps the lock
    until the server notices the dead session. How long that takes depends on the
    server's TCP keepalive settings (tcp_keepalives_idle, tcp_keepalives_interval,
    tcp_keepalives_count). A killed process closes its socket at once.
    """

    def __init__(self, store: Store, registry: CollectorRegistry, replica: str | None = None):
        self.replica = replica or replica_name()
        self.elected = store.dialect == "postgresql"
        self._url = store.url
        self._engine = None
        self._connection: Connection | None = None
        self._guard = threading.Lock()
        self.is_leader = not self.elected
        self.gauge = Gauge("driftloop_leader", "1 when this replica is the leader, which makes the scheduled "
                           "decisions and runs retrains; 0 otherwise.", registry=registry)
        self.gauge.set(1 if self.is_leader else 0)

    def refresh(self) -> bool:
        """Check that the leadership is still held, or try to take it; return whether this replica leads."""
        if not self.elected:
            return True
        with self._guard:
            if self._connection is not None and not self._still_held():
                self._drop("the connection that held the leader lock failed")
            if self._connection is None:
                self._try_acquire()
            self.gauge.set(1 if self.is_leader else 0)
            return self.is_leader

    def _still_held(self) -> bool:
        try:
            self._connection.exec_driver_sql("SELECT 1")
            return True
        except DBAPIError as exc:
            logger.warning("leader lock connection failed: %s", exc.orig or exc)
            return False

    def _try_acquire(self) -> None:
        if self._engine is None:
            # A connection of its own, outside the store's pool, lives as long as the leadership.
            self._engine = create_engine(self._url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            connection = self._engine.connect()
        except DBAPIError as exc:
            logger.warning("cannot reach the database %s to try the leader lock: %s", redacted_url(self._url),
                           exc.orig or exc)
            return
        try:
            acquired = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}).scalar()
        except DBAPIError as exc:
            logger.warning("leader lock attempt failed: %s", exc.orig or exc)
            connection.close()
            return
        if not acquired:
            connection.close()
            return
        self._connection = connection
        self.is_leader = True
        logger.info("replica %s is now the leader: it makes the scheduled decisions and runs retrains", self.replica)

    def _drop(self, reason: str) -> None:
        was_leader = self.is_leader
        self.is_leader = False
        if self._connection is not None:
            try:
                self._connection.close()
            except DBAPIError:
                pass
            self._connection = None
        if was_leader:
            logger.warning("replica %s is no longer the leader: %s", self.replica, reason)

    def release(self) -> None:
        """Give up the leadership (closing its connection releases the lock) and close the engine."""
        if not self.elected:
            return
        with self._guard:
            self._drop("the replica stopped")
            self.gauge.set(0)
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def describe(self) -> dict:
        return {"leader": self.is_leader, "replica": self.replica,
                "election": "postgresql advisory lock" if self.elected else "single replica (SQLite)"}
