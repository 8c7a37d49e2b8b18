"""Turn a stream of window reports into retraining decisions.

A retrain is triggered after ``consecutive_windows`` drifted windows in a row,
once enough labelled production events from the drifted period exist (events
received since the first window of the streak started), outside the cooldown
that follows the previous run. Once the streak is long enough, ``recheck`` decides
again between windows, so labels that arrive later start the retrain without
waiting for the next window. Windows with insufficient data neither extend
nor break a streak. With ``clear_windows`` above 1 the streak survives up to
``clear_windows - 1`` clean windows in a row (hysteresis), so a drift that
flickers between windows still counts as one episode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TriggerDecision:
    action: str  # "none" | "trigger" | "needs_labels" | "busy" | "cooldown"
    streak: int
    labelled: int = 0
    labels_needed: int = 0
    reason: str = ""


class TriggerPolicy:
    def __init__(self, consecutive_windows: int, min_labels: int, cooldown_s: float, clear_windows: int = 1):
        self.consecutive_windows = consecutive_windows
        self.min_labels = min_labels
        self.cooldown_s = cooldown_s
        self.clear_windows = clear_windows
        self.clean_in_a_row = 0
        self.streak = 0
        self.streak_windows: list[str] = []
        self.streak_started_at: float | None = None
        self.last_run_ended_at: float | None = None

    def reset(self) -> None:
        self.clean_in_a_row = 0
        self.streak = 0
        self.streak_windows = []
        self.streak_started_at = None

    def run_ended(self, at: float | None = None) -> None:
        self.last_run_ended_at = at if at is not None else time.time()
        self.reset()

    def observe(self, window_id: str, started_at: float, status: str, drifted: bool, *,
                count_labelled: Callable[[float], int], job_active: bool,
                now: float | None = None) -> TriggerDecision:
        """Update the streak with one window; ``count_labelled(since)`` counts labelled events."""
        if status != "ok":
            return TriggerDecision("none", self.streak)
        if not drifted:
            self.clean_in_a_row += 1
            if self.streak == 0 or self.clean_in_a_row >= self.clear_windows:
                self.reset()
            return TriggerDecision("none", self.streak)

        self.clean_in_a_row = 0
        self.streak += 1
        self.streak_windows.append(window_id)
        if self.streak_started_at is None:
            self.streak_started_at = started_at
        if self.streak < self.consecutive_windows:
            return TriggerDecision("none", self.streak)
        return self._decide(count_labelled, job_active, now)

    @property
    def armed(self) -> bool:
        """True when the streak is long enough and only labels, the cooldown or a running job hold a retrain back."""
        return self.streak >= self.consecutive_windows

    def recheck(self, *, count_labelled: Callable[[float], int], job_active: bool,
                now: float | None = None) -> TriggerDecision:
        """Decide again without a new window, for labels that arrived or a cooldown that ended since the last one."""
        if not self.armed:
            return TriggerDecision("none", self.streak)
        return self._decide(count_labelled, job_active, now)

    def _decide(self, count_labelled: Callable[[float], int], job_active: bool, now: float | None) -> TriggerDecision:
        labelled = count_labelled(self.streak_started_at)
        if job_active:
            return TriggerDecision("busy", self.streak, labelled, reason="a retraining run is already in progress")
        now = now if now is not None else time.time()
        if self.last_run_ended_at is not None and now - self.last_run_ended_at < self.cooldown_s:
            left = self.cooldown_s - (now - self.last_run_ended_at)
            return TriggerDecision("cooldown", self.streak, labelled, reason=f"cooldown: {left:.0f} s left")
        if labelled < self.min_labels:
            needed = self.min_labels - labelled
            return TriggerDecision(
                "needs_labels", self.streak, labelled, needed,
                reason=f"{labelled} labelled production events, {self.min_labels} needed: post {needed} more to /v1/labels",
            )
        return TriggerDecision("trigger", self.streak, labelled, reason=f"{self.streak} drifted windows in a row")
