"""The post-promotion watch: judge a newly promoted version on live traffic against the version it replaced.

For ``post_promotion.events`` events after a swap, every evaluated window of the new version
updates three figures over all its windows so far. Each is compared with the same figure over
the last ``post_promotion.baseline_windows`` windows of the previous version, taken before
the swap:

- mean top-label confidence of the sampled events (weighted by window size);
- the label-free accuracy estimate of ``monitor.accuracy_estimate`` (weighted by window size);
- realized accuracy on the events labelled so far (pooled over windows), once at least
  ``post_promotion.min_labelled`` of the new version's events carry labels.

The verdict is a rule on effect sizes, not a test: a figure is worse when the baseline minus
the new value exceeds its ``max_*_drop``. No figure is judged before ``min_events`` events, and
a figure the baseline lacks is not judged. One worse figure rolls the version back. After
``events`` events with none worse the watch passes and ends.

The baseline windows are the ones that made the retrain necessary, often drifted ones, so the
watch catches a version that is worse than the one it replaced on the traffic that replaced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

WATCHING = "watching"
PASSED = "passed"
ROLLBACK = "rollback"

# (figure name, config field of its allowed drop)
FIGURES = (
    ("mean_confidence", "max_confidence_drop"),
    ("accuracy_estimate", "max_estimate_drop"),
    ("realized_accuracy", "max_accuracy_drop"),
)


@dataclass(frozen=True)
class LiveFigures:
    """Figures pooled over a set of windows; a figure is None when no window carried it."""

    events: int
    windows: int
    mean_confidence: float | None
    accuracy_estimate: float | None
    realized_accuracy: float | None
    labelled: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "windows": self.windows,
            "mean_confidence": self.mean_confidence,
            "accuracy_estimate": self.accuracy_estimate,
            "realized_accuracy": self.realized_accuracy,
            "labelled": self.labelled,
        }


def _weighted(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(weight for _, weight in pairs)
    if total == 0:
        return None
    return sum(value * weight for value, weight in pairs) / total


def pool_windows(windows: Iterable[dict[str, Any]],
                 accuracy_of: Callable[[str], tuple[int, float | None]]) -> LiveFigures:
    """Pool stored window reports into one set of figures.

    ``accuracy_of(window_id)`` returns (labelled events, realized accuracy) as of now, since
    labels arrive after the window was evaluated.
    """
    confidence: list[tuple[float, int]] = []
    estimate: list[tuple[float, int]] = []
    accuracy: list[tuple[float, int]] = []
    events = count = 0
    for window in windows:
        count += 1
        n = int(window.get("n_events") or 0)
        events += n
        if window.get("mean_confidence") is not None and n:
            confidence.append((float(window["mean_confidence"]), n))
        value = (window.get("accuracy_estimate") or {}).get("estimate")
        if value is not None and n:
            estimate.append((float(value), n))
        labelled, realized = accuracy_of(window["window_id"])
        if realized is not None and labelled:
            accuracy.append((realized, labelled))
    return LiveFigures(
        events=events,
        windows=count,
        mean_confidence=_weighted(confidence),
        accuracy_estimate=_weighted(estimate),
        realized_accuracy=_weighted(accuracy),
        labelled=sum(weight for _, weight in accuracy),
    )


@dataclass(frozen=True)
class Verdict:
    status: str
    reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": list(self.reasons), "checks": [dict(c) for c in self.checks]}


def judge(baseline: LiveFigures, observed: LiveFigures, settings) -> Verdict:
    """Compare the new version's figures with the baseline; ``settings`` is ``PostPromotionConfig``."""
    if observed.events < settings.min_events:
        return Verdict(WATCHING, [f"{observed.events} of {settings.min_events} events before the first judgement"])
    checks = []
    reasons = []
    for name, limit_field in FIGURES:
        before, after = getattr(baseline, name), getattr(observed, name)
        limit = getattr(settings, limit_field)
        if name == "realized_accuracy" and observed.labelled < settings.min_labelled:
            checks.append({"figure": name, "before": before, "after": after, "max_drop": limit, "judged": False,
                           "note": f"{observed.labelled} labelled events, need {settings.min_labelled}"})
            continue
        if before is None or after is None:
            checks.append({"figure": name, "before": before, "after": after, "max_drop": limit, "judged": False,
                           "note": "no baseline" if before is None else "no value yet"})
            continue
        drop = before - after
        worse = drop > limit
        checks.append({"figure": name, "before": before, "after": after, "drop": drop, "max_drop": limit,
                       "judged": True, "worse": worse})
        if worse:
            reasons.append(f"{name.replace('_', ' ')} fell from {before:.3f} to {after:.3f} "
                           f"(drop {drop:.3f} > {limit:.3f})")
    if reasons:
        return Verdict(ROLLBACK, reasons, checks)
    if observed.events >= settings.events:
        return Verdict(PASSED, [f"no figure worse than the baseline after {observed.events} events"], checks)
    return Verdict(WATCHING, [f"{observed.events} of {settings.events} events watched"], checks)
