"""Validation of prediction events and delayed labels posted to the daemon.

Each item in a batch is checked on its own: invalid items are rejected with the
field, the value and the reason, and the valid ones in the same batch are
stored. Event ids are deduplicated, so resending a whole batch is safe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Any

import numpy as np

MAX_ID_CHARS = 128
PROBABILITY_SUM_TOLERANCE = 1e-3
# Event clocks may run ahead of the monitor's by this much; later timestamps are rejected.
MAX_CLOCK_SKEW_S = 24 * 3600
# Fields an event or a label item may carry. Others are ignored and reported back, so a
# misspelt optional field (``latency`` for ``latency_ms``) shows up without losing the item.
EVENT_FIELDS = frozenset({"id", "text", "timestamp", "latency_ms", "version", "label", "confidence", "probabilities"})
LABEL_FIELDS = frozenset({"id", "label"})
# Distinct ignored field names reported per request, and characters kept of each name.
MAX_IGNORED_FIELD_NAMES = 20
MAX_FIELD_NAME_CHARS = 64


@dataclass
class ItemError:
    index: int
    field: str
    value: Any
    error: str
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        item_id = _shorten(self.id) if self.id is not None else None
        return {"index": self.index, "id": item_id, "field": self.field, "value": preview_value(self.value),
                "error": self.error}


def preview_value(value: Any) -> Any:
    """Return a rejected value as error bodies quote it.

    Long strings are cut, long lists and objects are replaced by their size, and NaN and
    infinities become text, because JSON has no literal for them.
    """
    if isinstance(value, str):
        return _shorten(value)
    if isinstance(value, list) and len(value) > 8:
        return f"list of {len(value)} items"
    if isinstance(value, dict) and len(value) > 8:
        return f"object of {len(value)} fields"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _count_ignored_fields(item: dict, known: frozenset[str], counts: dict[str, int]) -> None:
    """Count the item's fields outside ``known``, for at most MAX_IGNORED_FIELD_NAMES distinct names."""
    for name in sorted(map(str, item.keys() - known)):
        name = _shorten(name, MAX_FIELD_NAME_CHARS)
        if name in counts or len(counts) < MAX_IGNORED_FIELD_NAMES:
            counts[name] = counts.get(name, 0) + 1


@dataclass
class BatchResult:
    valid: list[dict[str, Any]] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    # Ids of valid events that were already stored; set by the daemon.
    duplicates: list[str] = field(default_factory=list)
    # Fields that driftloop does not read, with the number of items that carry each.
    ignored_fields: dict[str, int] = field(default_factory=dict)


class BatchError(ValueError):
    """The request as a whole is unusable (not an object, no list, too many items)."""

    def __init__(self, field_name: str, value: Any, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.value = value
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "error": self.message}


def _items(body: Any, key: str, max_items: int) -> list[Any]:
    if not isinstance(body, dict):
        raise BatchError("body", type(body).__name__, f"expected a JSON object with a list under {key!r}")
    if key not in body:
        raise BatchError(key, None, f"missing field {key!r}")
    items = body[key]
    if not isinstance(items, list):
        raise BatchError(key, type(items).__name__, "must be a list")
    if not items:
        raise BatchError(key, 0, "must contain at least one item")
    if len(items) > max_items:
        raise BatchError(key, len(items), f"{len(items)} items, at most {max_items} allowed per request")
    return items


# Exact types of JSON numbers; bool is a subclass of int and is rejected.
_NUMBER_TYPES = frozenset((int, float))


def _finite_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the range of a float
        return False


def _parse_timestamp(value: Any, now: float) -> float:
    if value is None:
        return now
    if _finite_number(value):
        if value < 0:
            raise ValueError("must be unix seconds >= 0 or an ISO 8601 string")
        timestamp = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("not an ISO 8601 date-time") from None
        if parsed.tzinfo is None:
            raise ValueError("ISO 8601 date-time without a time zone; add 'Z' or an offset such as '+00:00'")
        timestamp = parsed.timestamp()
    else:
        raise ValueError("must be unix seconds or an ISO 8601 string")
    if timestamp > now + MAX_CLOCK_SKEW_S:
        hint = "; it looks like milliseconds, send seconds" if timestamp > now * 100 else ""
        raise ValueError(f"is more than {MAX_CLOCK_SKEW_S // 3600} hours in the future{hint}")
    return timestamp


def _check_event(item: Any, labels: list[str], label_index: dict[str, int], max_text_chars: int,
                 top: tuple[int, float] | None = None) -> dict[str, Any]:
    """Return the stored row for one event or raise (field, value, message) via ValueError args."""
    if not isinstance(item, dict):
        raise _Invalid("", type(item).__name__, "expected a JSON object")

    event_id = item.get("id")
    if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > MAX_ID_CHARS:
        raise _Invalid("id", event_id, f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
    # PostgreSQL text columns cannot store the NUL character.
    if "\x00" in event_id:
        raise _Invalid("id", event_id, "must not contain the NUL character (\\u0000)")

    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _Invalid("text", text, "must be a non-empty string")
    if "\x00" in text:
        raise _Invalid("text", text, "must not contain the NUL character (\\u0000)")
    if len(text) > max_text_chars:
        raise _Invalid("text", f"{len(text)} characters", f"longer than the {max_text_chars}-character limit")

    now = time.time()
    try:
        timestamp = _parse_timestamp(item.get("timestamp"), now)
    except ValueError as exc:
        raise _Invalid("timestamp", item.get("timestamp"), str(exc)) from None

    latency = item.get("latency_ms")
    if latency is not None and (not _finite_number(latency) or latency < 0):
        raise _Invalid("latency_ms", latency, "must be a finite number >= 0")

    version = item.get("version")
    if version is not None and (not isinstance(version, str) or len(version) > MAX_ID_CHARS or "\x00" in version):
        raise _Invalid("version", version, f"must be a string of at most {MAX_ID_CHARS} characters without NUL")

    label = item.get("label")
    confidence = item.get("confidence")
    probabilities = item.get("probabilities")
    if probabilities is not None:
        label, confidence = _check_probabilities(probabilities, label, labels, top)
    else:
        if label is None or confidence is None:
            raise _Invalid("probabilities", None, "give either 'probabilities' or both 'label' and 'confidence'")
        if not _finite_number(confidence) or not 0.0 <= confidence <= 1.0:
            raise _Invalid("confidence", confidence, "must be a finite number in [0, 1]")
    if not isinstance(label, str) or label not in label_index:
        raise _Invalid("label", label, f"unknown label; the active version has {len(labels)} labels")

    return {
        "id": event_id,
        "timestamp": timestamp,
        "received_at": now,
        "text": text,
        "predicted_label": label,
        "confidence": float(confidence),
        "latency_ms": float(latency) if latency is not None else None,
        "version": version,
    }


def _batch_top_labels(items: list[Any], n_labels: int) -> dict[int, tuple[int, float]]:
    """Check every probability list of a batch at once with numpy.

    Returns ``{item index: (position of the highest probability, that probability)}`` when
    every list that has one value per label holds only numbers in [0, 1] summing to 1.
    Otherwise returns ``{}``, and each item is checked on its own, which names the bad value.
    The type check runs first because numpy would turn ``true`` and ``"0.5"`` into numbers.
    """
    positions, rows = [], []
    for index, item in enumerate(items):
        probabilities = item.get("probabilities") if isinstance(item, dict) else None
        if isinstance(probabilities, list) and len(probabilities) == n_labels:
            positions.append(index)
            rows.append(probabilities)
    if not rows or not _NUMBER_TYPES.issuperset(map(type, chain.from_iterable(rows))):
        return {}
    try:
        matrix = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer beyond float range
        return {}
    totals = matrix.sum(axis=1)
    if not (np.isfinite(totals).all() and matrix.min() >= 0.0 and matrix.max() <= 1.0
            and np.abs(totals - 1.0).max() <= PROBABILITY_SUM_TOLERANCE):
        return {}
    # argmax gives the first position of the largest value, as list.index(max(...)) does.
    tops = matrix.argmax(axis=1)
    confidences = matrix[np.arange(len(rows)), tops]
    return dict(zip(positions, zip(tops.tolist(), confidences.tolist())))


def _check_probabilities(probabilities: Any, label: Any, labels: list[str],
                         top: tuple[int, float] | None = None) -> tuple[str, float]:
    """Return the predicted label and its probability; ``top`` is the batch check's result, when it passed."""
    position, confidence = top if top is not None else _top_probability(probabilities, labels)
    if label is not None and label != labels[position]:
        raise _Invalid("label", label, f"disagrees with the highest probability, which is for {labels[position]!r}")
    return labels[position], confidence


def _top_probability(probabilities: Any, labels: list[str]) -> tuple[int, float]:
    """Check one probability list value by value; return the position of its largest value and that value."""
    if not isinstance(probabilities, list):
        raise _Invalid("probabilities", type(probabilities).__name__, "must be a list of numbers")
    if len(probabilities) != len(labels):
        raise _Invalid("probabilities", f"{len(probabilities)} values",
                       f"must have one value per label ({len(labels)}) in the active version's label order")
    # Fast path for the usual body, in C instead of a Python call per value: every value is an int
    # or float (bool excluded), and a finite sum rules out NaN and infinity. Otherwise the loop
    # below finds the first bad value for the error.
    plain = _NUMBER_TYPES.issuperset(map(type, probabilities))
    try:
        total = math.fsum(probabilities) if plain else math.nan
    except OverflowError:  # an integer beyond the range of a float, named by the loop
        total = math.nan
    if not (math.isfinite(total) and min(probabilities) >= 0.0 and max(probabilities) <= 1.0):
        for position, value in enumerate(probabilities):
            if not _finite_number(value):
                raise _Invalid(f"probabilities[{position}]", value, "must be a finite number")
            if not 0.0 <= value <= 1.0:
                raise _Invalid(f"probabilities[{position}]", value, "must be in [0, 1]")
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise _Invalid("probabilities", f"sum {total:.6f}", f"must sum to 1 (tolerance {PROBABILITY_SUM_TOLERANCE})")
    # The first position of the largest value, as max(range(...), key=...) gives, at C speed.
    top = probabilities.index(max(probabilities))
    return top, float(probabilities[top])


class _Invalid(ValueError):
    def __init__(self, field_name: str, value: Any, message: str):
        super().__init__(message)
        self.field = field_name
        self.value = value
        self.message = message


def validate_events(body: Any, labels: list[str], *, max_items: int, max_text_chars: int) -> BatchResult:
    items = _items(body, "events", max_items)
    label_index = {label: index for index, label in enumerate(labels)}
    tops = _batch_top_labels(items, len(labels))
    result = BatchResult()
    seen: set[str] = set()
    for index, item in enumerate(items):
        if isinstance(item, dict):
            _count_ignored_fields(item, EVENT_FIELDS, result.ignored_fields)
        try:
            row = _check_event(item, labels, label_index, max_text_chars, tops.get(index))
        except _Invalid as exc:
            item_id = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
            path = f"events[{index}].{exc.field}" if exc.field else f"events[{index}]"
            result.errors.append(ItemError(index, path, exc.value, exc.message, item_id))
            continue
        if row["id"] in seen:
            result.errors.append(ItemError(index, f"events[{index}].id", row["id"], "duplicate id in this batch", row["id"]))
            continue
        seen.add(row["id"])
        result.valid.append(row)
    return result


@dataclass
class LabelResult:
    """Outcome of one POST /v1/labels: valid labels by event id, their positions, and errors."""

    valid: dict[str, str] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    errors: list[ItemError] = field(default_factory=list)
    # Set by the daemon: labels attached to stored events, and labels waiting for their events.
    accepted: int = 0
    pending: int = 0
    # Fields that driftloop does not read, with the number of items that carry each.
    ignored_fields: dict[str, int] = field(default_factory=dict)


def validate_labels(body: Any, labels: list[str], *, max_items: int) -> LabelResult:
    """Check each label item. Whether the event ids exist is checked by the caller.

    A repeated id in one batch keeps its last label, as a later correction would.
    """
    items = _items(body, "labels", max_items)
    known = set(labels)
    result = LabelResult()
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            result.errors.append(ItemError(index, f"labels[{index}]", type(item).__name__, "expected a JSON object"))
            continue
        _count_ignored_fields(item, LABEL_FIELDS, result.ignored_fields)
        event_id, label = item.get("id"), item.get("label")
        if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > MAX_ID_CHARS or "\x00" in event_id:
            result.errors.append(ItemError(index, f"labels[{index}].id", event_id,
                                           f"must be a non-empty string of at most {MAX_ID_CHARS} characters "
                                           "without NUL"))
            continue
        if label is None:
            result.errors.append(ItemError(index, f"labels[{index}].label", None, "missing field 'label'", event_id))
            continue
        if not isinstance(label, str) or label not in known:
            result.errors.append(ItemError(index, f"labels[{index}].label", label,
                                           f"unknown label; the active version has {len(labels)} labels", event_id))
            continue
        result.valid[event_id] = label
        result.positions[event_id] = index
    return result
