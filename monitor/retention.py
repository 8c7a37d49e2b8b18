"""Retention of stored events and window reports: the leader deletes what is older than the config allows.

Three settings of ``database`` apply, each in seconds and 0 for no limit:

* ``event_retention_s``: unlabelled events, by the time they were received;
* ``labelled_event_retention_s``: labelled events, the training and judging data of retrains;
* ``window_retention_s``: window reports, by the time their window ended.

Runs, the audit log, versions and their canary reports are kept. Deletes go in batches of
BATCH_ROWS rows, at most BATCHES_PER_PASS per kind in one pass. A pass that leaves rows due
runs again at the next check; otherwise the next pass comes after INTERVAL_S.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Callable

from monitor.config import DatabaseConfig
from monitor.store import Store

logger = logging.getLogger(__name__)

BATCH_ROWS = 5000
BATCHES_PER_PASS = 10
INTERVAL_S = 300.0


@dataclass(frozen=True)
class Kind:
    """One kind of record under retention: its metric label, its setting, and how to delete a batch of it."""

    name: str
    setting: str
    delete: Callable[[Store, float, int], int]


KINDS = (
    Kind("unlabelled_event", "event_retention_s",
         lambda store, cutoff, limit: store.delete_old_events(cutoff, labelled=False, limit=limit)),
    Kind("labelled_event", "labelled_event_retention_s",
         lambda store, cutoff, limit: store.delete_old_events(cutoff, labelled=True, limit=limit)),
    Kind("window", "window_retention_s",
         lambda store, cutoff, limit: store.delete_old_windows(cutoff, limit=limit)),
)


class Retention:
    """Passes that delete expired records when due; ``deleted`` is a counter with a ``record`` label."""

    def __init__(self, settings: DatabaseConfig, store: Store, deleted, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.deleted = deleted
        self.clock = clock
        self.due_at = 0.0
        for kind in KINDS:
            deleted.labels(kind.name)

    def run_if_due(self) -> dict[str, int]:
        """Run a pass when one is due and return the rows deleted per kind (empty when none was due)."""
        now = self.clock()
        if now < self.due_at:
            return {}
        counts, backlog = {}, False
        for kind in KINDS:
            keep_s = getattr(self.settings, kind.setting)
            if not keep_s:
                continue
            cutoff = now - keep_s
            count, full_batches = 0, 0
            while full_batches < BATCHES_PER_PASS:
                removed = kind.delete(self.store, cutoff, BATCH_ROWS)
                count += removed
                if removed < BATCH_ROWS:
                    break
                full_batches += 1
            backlog = backlog or full_batches == BATCHES_PER_PASS
            if count:
                self.deleted.labels(kind.name).inc(count)
                logger.info("retention: deleted %d %s records from before %s (database.%s)", count, kind.name,
                            datetime.datetime.fromtimestamp(cutoff, datetime.timezone.utc).isoformat(timespec="seconds"),
                            kind.setting)
            counts[kind.name] = count
        self.due_at = now if backlog else now + INTERVAL_S
        return counts
