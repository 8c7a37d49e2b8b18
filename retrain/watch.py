"""Watch a training run's losses for the three ways it commonly goes wrong.

- Divergence: a training loss that is NaN or infinite, or that exceeds
  ``EXPLODE_FACTOR`` times its reference (the larger of the mean of the first
  steps and ln(number of labels), the loss of a uniform guess). It aborts the run.
- Overfitting: between two evaluations the mean training loss fell while the
  validation loss rose. It is logged once per run and reported.
- A flat validation loss: after warmup the best validation loss is within
  ``FLAT_TOLERANCE`` (relative) of the loss before training. This usually
  means LoRA targets the wrong modules or the learning rate is far too low.
"""

from __future__ import annotations

import logging
import math

from monitor.errors import TrainingError

logger = logging.getLogger(__name__)

EXPLODE_FACTOR = 10.0
# Steps whose losses set the divergence reference.
REFERENCE_STEPS = 3
FLAT_TOLERANCE = 0.01


class TrainingWatch:
    def __init__(self, n_labels: int, learning_rate: float, target_modules: list[str], run: str = "training"):
        self.floor = math.log(max(n_labels, 2))
        self.learning_rate = learning_rate
        self.target_modules = list(target_modules)
        self.run = run
        self.first_losses: list[float] = []
        self.previous: tuple[float, float] | None = None
        self.initial_val_loss: float | None = None
        self.best_after_warmup: tuple[int, float] | None = None
        self.findings: dict[str, dict] = {}

    def _hint(self) -> str:
        return f"lower the learning rate (now {self.learning_rate})"

    def on_step(self, step: int, epoch: int, loss: float) -> None:
        """Raise TrainingError when ``loss`` is not finite or has exploded."""
        if not math.isfinite(loss):
            raise TrainingError(f"training loss became {loss} at step {step} (epoch {epoch}); {self._hint()}")
        if len(self.first_losses) < REFERENCE_STEPS:
            self.first_losses.append(loss)
            return
        reference = max(sum(self.first_losses) / len(self.first_losses), self.floor)
        if loss > EXPLODE_FACTOR * reference:
            raise TrainingError(
                f"training loss exploded to {loss:.4g} at step {step} (epoch {epoch}), more than "
                f"{EXPLODE_FACTOR:g} times its reference {reference:.4g}; {self._hint()}"
            )

    def on_evaluation(self, step: int, train_loss: float | None, val_loss: float, after_warmup: bool) -> bool:
        """Record one validation loss; return True when it shows overfitting."""
        if self.initial_val_loss is None:
            self.initial_val_loss = val_loss
            self.previous = (train_loss if train_loss is not None else math.inf, val_loss)
            return False
        if after_warmup and (self.best_after_warmup is None or val_loss < self.best_after_warmup[1]):
            self.best_after_warmup = (step, val_loss)
        overfitting = False
        if train_loss is not None and self.previous is not None:
            previous_train, previous_val = self.previous
            # The evaluation before the first step has no training loss (inf), so it cannot show a fall.
            overfitting = math.isfinite(previous_train) and train_loss < previous_train and val_loss > previous_val
            if overfitting and "overfitting" not in self.findings:
                self.findings["overfitting"] = {
                    "step": step,
                    "train_loss": [round(previous_train, 5), round(train_loss, 5)],
                    "validation_loss": [round(previous_val, 5), round(val_loss, 5)],
                }
                logger.warning(
                    "%s: overfitting at step %d: training loss fell %.4f -> %.4f while validation loss rose %.4f -> %.4f",
                    self.run, step, previous_train, train_loss, previous_val, val_loss,
                )
        self.previous = (train_loss if train_loss is not None else math.inf, val_loss)
        return overfitting

    def finish(self) -> dict[str, dict]:
        """Check for a flat validation loss and return every finding of the run."""
        if self.initial_val_loss is not None and self.best_after_warmup is not None:
            step, best = self.best_after_warmup
            change = (self.initial_val_loss - best) / max(abs(self.initial_val_loss), 1e-12)
            if change < FLAT_TOLERANCE:
                self.findings["flat_validation_loss"] = {
                    "initial": round(self.initial_val_loss, 5),
                    "best_after_warmup": round(best, 5),
                    "step": step,
                    "message": (
                        f"validation loss did not move after warmup ({self.initial_val_loss:.4f} before training, "
                        f"best {best:.4f}); check that target_modules {self.target_modules} are the model's "
                        f"attention layers and that learning_rate {self.learning_rate} is not too low, "
                        "or the starting adapter already fits this data"
                    ),
                }
                logger.warning("%s: %s", self.run, self.findings["flat_validation_loss"]["message"])
        return dict(self.findings)
