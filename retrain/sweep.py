"""Choose the LoRA rank by a short training run per candidate, scored on the validation holdout.

Every candidate trains with the same seed, data and budget (``budget_steps``
optimiser steps), and its validation macro-F1 at the end of that budget is
its score, so no candidate is scored on its untrained weights. ``alpha`` scales with the rank, so every rank keeps the
configured alpha/rank ratio. The highest
score wins. A candidate within ``tie_tolerance`` of the best counts as a tie,
and a tie goes to the smaller rank. A warm start from the current adapter
joins as one more candidate at that adapter's rank. A rank that does not fit
the model is recorded with its error and skipped, and the sweep fails only
when every candidate does. Any other error ends the sweep at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from monitor.errors import TrainingError
from retrain.trainer import RankDoesNotFit, TrainSettings, fit

logger = logging.getLogger(__name__)


@dataclass
class SweepRow:
    rank: int
    start: str  # "scratch" or "warm"
    val_macro_f1: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    steps: int = 0
    wall_seconds: float = 0.0
    chosen: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("val_macro_f1", "val_accuracy", "val_loss"):
            if values[key] is not None:
                values[key] = round(values[key], 5)
        values["wall_seconds"] = round(values["wall_seconds"], 2)
        return values


@dataclass
class SweepResult:
    rows: list[SweepRow]

    @property
    def chosen(self) -> SweepRow:
        return next(row for row in self.rows if row.chosen)

    def table(self) -> list[dict]:
        return [row.to_dict() for row in self.rows]


def settings_for_rank(settings: TrainSettings, rank: int) -> TrainSettings:
    """Return ``settings`` at ``rank``, with alpha scaled to keep the alpha/rank ratio."""
    return settings.replace(rank=rank, alpha=settings.alpha * rank / settings.rank)


def choose(rows: list[SweepRow], tie_tolerance: float) -> SweepRow:
    """Mark and return the winner: the best macro-F1, ties (within ``tie_tolerance``) to the smaller rank.

    Between a warm and a scratch candidate of the same rank in a tie, the warm start wins,
    because it keeps the current adapter's behaviour.
    """
    scored = [row for row in rows if row.error is None and row.val_macro_f1 is not None]
    if not scored:
        errors = "; ".join(f"rank {row.rank} ({row.start}): {row.error}" for row in rows)
        raise TrainingError(f"every rank in the sweep failed: {errors}")
    best = max(row.val_macro_f1 for row in scored)
    tied = [row for row in scored if row.val_macro_f1 >= best - tie_tolerance]
    winner = min(tied, key=lambda row: (row.rank, row.start != "warm"))
    winner.chosen = True
    return winner


def sweep_ranks(
    base_model: str,
    labels: list[str],
    train: list[tuple[str, str]],
    validation: list[tuple[str, str]],
    settings: TrainSettings,
    ranks: list[int],
    *,
    budget_steps: int,
    tie_tolerance: float,
    init_adapter: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    deadline: float | None = None,
    run_name: str = "sweep",
) -> SweepResult:
    """Train each candidate for ``budget_steps`` steps and choose one; see the module docstring."""
    if not validation:
        raise TrainingError("the rank sweep needs a validation set; it is empty")
    candidates = [(rank, "scratch") for rank in ranks]
    if init_adapter is not None:
        from peft import PeftConfig

        candidates.append((PeftConfig.from_pretrained(str(init_adapter)).r, "warm"))
    rows: list[SweepRow] = []
    for rank, start in candidates:
        row = SweepRow(rank=rank, start=start)
        rows.append(row)
        began = time.monotonic()
        # Early stopping would end short runs at different lengths; the sweep compares equal budgets.
        short = settings_for_rank(settings, rank).replace(max_steps=budget_steps, early_stopping_patience=10**6)
        phase = f"sweep rank {rank} ({start})"
        try:
            outcome = fit(base_model, labels, train, short, validation=validation,
                          init_adapter=init_adapter if start == "warm" else None,
                          progress=(lambda report, phase=phase: progress({**report, "phase": phase})) if progress else None,
                          should_stop=should_stop, deadline=deadline,
                          run_name=f"{run_name} rank {rank} ({start})")
        except RankDoesNotFit as error:
            row.error = str(error)
            logger.warning("%s: rank %d (%s) failed: %s", run_name, rank, start, error)
            continue
        finally:
            row.wall_seconds = time.monotonic() - began
        last = outcome.epochs[-1]
        row.val_macro_f1, row.val_accuracy, row.val_loss = last["val_macro_f1"], last["val_accuracy"], last["val_loss"]
        row.steps = outcome.steps
        del outcome
        logger.info("%s: rank %d (%s): validation macro-F1 %.4f, loss %.4f after %d steps",
                    run_name, rank, start, row.val_macro_f1, row.val_loss, row.steps)
    winner = choose(rows, tie_tolerance)
    logger.info("%s: chose rank %d (%s)", run_name, winner.rank, winner.start)
    return SweepResult(rows)
