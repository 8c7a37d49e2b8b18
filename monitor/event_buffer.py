"""Events held in memory while the database is unreachable, written in arrival order once it returns.

Only prediction events are buffered. A label, an approval or any other decision
that cannot be stored is an error to its caller, never held, so a crash cannot
lose one that was acknowledged. Buffered events are lost if the process ends
before the database returns, and the shutdown log reports how many.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.errors import DriftloopError
from monitor.store import Store, redacted_url

logger = logging.getLogger(__name__)


class BufferFullError(DriftloopError):
    """The database is unreachable and the event buffer has no room for a batch."""


class EventBuffer:
    """A bounded FIFO of event rows (as ``Store.insert_events`` takes them) that failed to be stored."""

    def __init__(self, capacity: int, registry: CollectorRegistry):
        self.capacity = capacity
        self._rows: deque[dict[str, Any]] = deque()
        self._ids: set[str] = set()
        self._guard = threading.Lock()
        self.buffered = Gauge("driftloop_store_buffered_events", "Events held in memory because the database was "
                              "unreachable, waiting to be written.", registry=registry)
        self.errors = Counter("driftloop_store_errors_total", "Database operations that failed because the "
                              "database was unreachable, by operation.", ["operation"], registry=registry)

    def __len__(self) -> int:
        return len(self._rows)

    def contains(self, event_id: str) -> bool:
        return event_id in self._ids

    def has_room(self, count: int) -> bool:
        return len(self._rows) + count <= self.capacity

    def check_room(self, count: int, store: Store) -> None:
        """Raise BufferFullError when ``count`` more events do not fit."""
        if not self.has_room(count):
            raise BufferFullError(
                f"the database {redacted_url(store.url)} is unreachable and the event buffer is full "
                f"({len(self._rows)} of {self.capacity} events, database.buffer_events); this batch of {count} "
                "events was not accepted: resend it once the database is back"
            )

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Hold ``rows``; the caller has checked the room, so a batch may exceed the capacity by itself at most."""
        with self._guard:
            for row in rows:
                self._rows.append(row)
                self._ids.add(row["id"])
            self.buffered.set(len(self._rows))
        logger.warning("database unreachable: holding %d events in memory (%d of %d buffered)",
                       len(rows), len(self._rows), self.capacity)

    def flush(self, store: Store) -> int:
        """Write the held events oldest first; return how many. The driver's error propagates, keeping the rest."""
        written = 0
        while True:
            with self._guard:
                batch = [self._rows[index] for index in range(min(len(self._rows), 500))]
            if not batch:
                break
            store.insert_events(batch)
            with self._guard:
                for _ in batch:
                    row = self._rows.popleft()
                    self._ids.discard(row["id"])
                self.buffered.set(len(self._rows))
            written += len(batch)
        if written:
            logger.info("database reachable again: wrote %d buffered events", written)
        return written
