"""Graceful shutdown of the sidecar: the drain that runs between SIGTERM and exit.

The drain has ``monitor.shutdown_grace_s`` seconds in all. It

1. marks the daemon draining, so /readyz and ingest return 503 and no retrain starts;
2. pauses the schedule and asks a running retrain to stop before its next step, which
   ends the run ``cancelled`` with reason "sidecar shutdown" and removes its folder;
3. evaluates the closed windows still waiting, one by one, while the time left exceeds
   the last evaluation's duration, and records the ids of the windows left over in the
   audit log (their events are already in the store, tagged with the window id);
4. waits for the retrain worker for the rest of its share of the grace period.

A share of the grace period (``CLOSE_SHARE``, at most ``CLOSE_MAX_S``) is kept for
closing the HTTP server, the store and the process. A second SIGTERM or SIGINT stops
the process at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from retrain.jobs import RUNNING_STATES

logger = logging.getLogger(__name__)

CLOSE_SHARE = 0.2
CLOSE_MAX_S = 5.0


class ShutdownDrain:
    """Drain ``daemon`` once a signal arrives, then call ``on_done`` so the HTTP server exits."""

    def __init__(self, daemon, grace_s: float, on_done: Callable[[], None], on_force: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self.daemon = daemon
        self.grace_s = grace_s
        self.close_s = min(CLOSE_MAX_S, CLOSE_SHARE * grace_s)
        self.on_done = on_done
        self.on_force = on_force
        self.clock = clock
        self.started_at: float | None = None
        self.forced = False
        self.summary: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None

    def remaining_s(self) -> float:
        """Return the seconds left of the grace period, or the whole period before a signal arrived."""
        if self.started_at is None:
            return self.grace_s
        return max(0.0, self.started_at + self.grace_s - self.clock())

    def _drain_left_s(self) -> float:
        return self.remaining_s() - self.close_s

    def handle_signal(self, signum: int, _frame=None) -> None:
        """Start the drain on the first signal; stop at once on the second."""
        if self.started_at is not None:
            logger.warning("second signal %d during the drain: stopping now", signum)
            self.forced = True
            self.on_force()
            return
        self.started_at = self.clock()
        logger.info("signal %d: draining, exit within %.0f s (monitor.shutdown_grace_s)", signum, self.grace_s)
        self.thread = threading.Thread(target=self._run, name="driftloop-drain", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.drain()
            logger.info("drain finished in %.1f s: %s", self.grace_s - self.remaining_s(), self.summary)
        except Exception:  # noqa: BLE001 - the process must still exit
            logger.exception("drain failed; stopping anyway")
        finally:
            self.on_done()

    def drain(self) -> dict[str, Any]:
        """Run the drain steps and return what they did."""
        daemon = self.daemon
        if self.started_at is None:
            self.started_at = self.clock()
        daemon.draining = True
        if daemon.scheduler.running:
            daemon.scheduler.pause()
        daemon.cancel_requested.set()
        evaluated, left = self._flush_windows()
        retrain = self._wait_for_retrain()
        return {"windows_evaluated": evaluated, "windows_left": left, "retrain": retrain}

    def _flush_windows(self) -> tuple[list[str], list[dict[str, Any]]]:
        """Evaluate the closed windows while time remains; return those evaluated and those left."""
        daemon = self.daemon
        evaluated: list[str] = []
        if daemon.ready and daemon.tick_lock.acquire(timeout=max(self._drain_left_s(), 0.0)):
            try:
                last_duration = 0.0
                while daemon.pending and self._drain_left_s() > last_duration:
                    with daemon.lock:
                        window = daemon.pending.popleft()
                    started = self.clock()
                    try:
                        daemon._evaluate(window)
                        evaluated.append(window.id)
                    except Exception:  # noqa: BLE001 - one failed window must not stop the drain
                        logger.exception("window %s: evaluation during shutdown failed", window.id)
                    last_duration = self.clock() - started
            finally:
                daemon.tick_lock.release()
        with daemon.lock:
            left = [{"id": window.id, "events": window.sampler.count, "closed": True} for window in daemon.pending]
            if daemon.window.sampler.count:
                left.append({"id": daemon.window.id, "events": daemon.window.sampler.count, "closed": False})
        if left:
            # The next start on this host takes these windows back (MonitorDaemon._restore_windows).
            logger.warning("shutdown leaves %d windows unevaluated (events stored with their window id): %s",
                           len(left), ", ".join(f"{item['id']} ({item['events']} events)" for item in left))
            daemon.store.audit("daemon", "windows_not_evaluated", version=daemon.active_name,
                               detail={"reason": "sidecar shutdown", "host": socket.gethostname(), "windows": left})
        return evaluated, left

    def _wait_for_retrain(self) -> str | None:
        """Wait for the retrain worker to stop; return the state of the run it worked on, if any."""
        daemon = self.daemon
        thread = daemon.job_thread
        if thread is None or not thread.is_alive():
            # No retrain was running when the drain began; an earlier run's state is not this drain's.
            return None
        thread.join(timeout=max(self._drain_left_s(), 0.0))
        runs = daemon.store.runs(limit=1)
        state = runs[0]["state"] if runs else None
        if thread.is_alive():
            for run in daemon.store.runs(states=RUNNING_STATES, limit=10):
                owner = (run["trigger"] or {}).get("owner") or {}
                if owner.get("pid") == os.getpid() and run["state"] != "cancelling":
                    # A restart turns a cancelling run whose process died into cancelled.
                    daemon.store.transition_run(run["id"], (run["state"],), "cancelling", actor="daemon",
                                                action="cancel_requested", detail={"comment": "sidecar shutdown"})
            logger.warning("the retrain worker did not stop within the grace period; the next start records "
                           "its run as cancelled")
            state = "cancelling"
        return state
