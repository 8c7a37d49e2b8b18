"""The training set of a retrain: replayed original data plus labelled production events.

Three sets of texts judge a candidate, and none of their texts may be
trained on. The production holdout is split off by a stable hash of the event
id. The original test split is the canary's guard against forgetting. The
validation holdout is split off the assembled training data by a stable hash
of the normalised text, and serves early stopping and the rank sweep. Texts
are compared after normalising case and whitespace.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from monitor.errors import TrainingError
from retrain.datasets import Example, cap_per_label

logger = logging.getLogger(__name__)


def stable_fraction(key: str) -> float:
    """Map ``key`` to a number in [0, 1) that is the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def in_holdout(event_id: str, fraction: float) -> bool:
    """Assign an event to the canary holdout by a stable hash of its id."""
    return stable_fraction(event_id) < fraction


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def canary_holdout(production: list[tuple[str, str, str]], holdout_fraction: float,
                   trained_texts: list[str] | None = None) -> list[Example]:
    """Return the canary's production slice: (text, label) of the events in the holdout by id hash.

    ``production`` is a list of ``(event_id, text, label)``. Texts in ``trained_texts`` are left
    out (compared after ``normalise``), so an event labelled after a candidate was trained never
    judges it on a text it learned.
    """
    trained = {normalise(text) for text in trained_texts or []}
    return [(text, label) for event_id, text, label in production
            if in_holdout(event_id, holdout_fraction) and normalise(text) not in trained]


def examples_sha256(examples: list[Example]) -> str:
    """Hash a list of examples independent of its order: sha256 over sorted JSON-escaped lines.

    Each line is the JSON encoding of ``[text, label]``, so a tab or newline inside a
    text cannot make two different sets hash alike.
    """
    import json

    lines = sorted(json.dumps([text, label], ensure_ascii=False) for text, label in examples)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@dataclass
class AssembledData:
    """The sets of one retrain and the counts behind them, for the lineage record."""

    train: list[Example]
    validation: list[Example]
    holdout: list[Example]
    production_train: int
    replay: int
    duplicates_removed: int
    judged_removed: int
    capped: int
    label_counts: dict[str, int]
    small_classes: dict[str, int] = field(default_factory=dict)
    labels_without_examples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "holdout": len(self.holdout),
            "production_train": self.production_train,
            "replay": self.replay,
            "duplicates_removed": self.duplicates_removed,
            "judged_removed": self.judged_removed,
            "capped": self.capped,
            "labels_in_train": len(self.label_counts),
            "small_classes": dict(self.small_classes),
        }

    def lineage(self) -> dict:
        """Counts and hashes of every set, as written to the adapter's training.yaml."""
        return {
            **self.summary(),
            "sha256": {
                "train": examples_sha256(self.train),
                "validation": examples_sha256(self.validation),
                "holdout": examples_sha256(self.holdout),
            },
            "class_counts": dict(sorted(self.label_counts.items())),
            "validation_class_counts": dict(sorted(Counter(label for _, label in self.validation).items())),
            "labels_without_examples": list(self.labels_without_examples),
        }


def split_validation(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into (train, validation) by a stable hash of each normalised text.

    About ``fraction`` of each class goes to validation, but never a whole class: at least
    one example of every class stays in train.
    """
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example[1]].append(example)
    train: list[Example] = []
    validation: list[Example] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda example: stable_fraction(normalise(example[0])))
        n_validation = sum(stable_fraction(normalise(text)) < fraction for text, _ in group)
        n_validation = min(n_validation, len(group) - 1)
        validation.extend(group[:n_validation])
        train.extend(group[n_validation:])
    return train, validation


def assemble_training_data(base_train: list[Example], production: list[tuple[str, str, str]], *,
                           replay_per_label: int, holdout_fraction: float, seed: int,
                           max_per_label: int | None = None, validation_fraction: float = 0.1,
                           judged_texts: list[str] = (), labels: list[str] | None = None,
                           min_class_examples: int = 1) -> AssembledData:
    """Mix replayed original data with labelled production events and split off the judging sets.

    ``production`` is a list of ``(event_id, text, label)``. Events go to the canary holdout
    by a hash of their id. Up to ``replay_per_label`` original examples of each label
    are replayed against forgetting. Exact and normalised duplicates are removed, and so
    is every text that occurs in the holdout or in ``judged_texts`` (the original test
    split). No label keeps more than ``max_per_label`` examples, so a frequent catch-all
    class (such as out-of-scope) does not swamp the rare new intents. The rest is split
    into train and validation by ``split_validation``.

    A production label outside ``labels`` raises TrainingError naming it.
    Classes with fewer than ``min_class_examples`` training examples are reported in
    ``small_classes`` and logged, never dropped; labels of ``labels`` without any
    example are listed in ``labels_without_examples``.
    """
    if labels is not None:
        known = set(labels)
        unknown = [label for _, _, label in production if label not in known]
        if unknown:
            raise TrainingError(
                f"{len(unknown)} labelled production events ({len(set(unknown))} distinct labels) have labels "
                f"outside the classifier's label set; first unknown label: {unknown[0]!r}"
            )
    holdout = canary_holdout(production, holdout_fraction)
    production_train = [(text, label) for event_id, text, label in production if not in_holdout(event_id, holdout_fraction)]
    replay, _ = cap_per_label(base_train, replay_per_label, seed) if replay_per_label else ([], [])

    judged = {normalise(text) for text, _ in holdout} | {normalise(text) for text in judged_texts}
    seen: set[str] = set()
    unique: list[Example] = []
    duplicates = judged_removed = 0
    for text, label in production_train + replay:
        key = normalise(text)
        if key in judged:
            judged_removed += 1
            continue
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        unique.append((text, label))
    unique, capped = cap_per_label(unique, max_per_label, seed)
    train, validation = split_validation(unique, validation_fraction)
    random.Random(seed).shuffle(train)

    counts = Counter(label for _, label in unique)
    small = {label: count for label, count in sorted(counts.items()) if count < min_class_examples}
    if small:
        logger.warning("%d classes have fewer than %d training examples and are kept: %s",
                       len(small), min_class_examples, ", ".join(f"{label}={count}" for label, count in list(small.items())[:10]))
    if judged_removed:
        logger.warning("%d production texts also occur in the canary holdout or the original test split; "
                       "they judge the candidate and are not trained on", judged_removed)
    missing = [label for label in (labels or []) if label not in counts]
    return AssembledData(
        train=train,
        validation=validation,
        holdout=holdout,
        production_train=len(production_train),
        replay=len(replay),
        duplicates_removed=duplicates,
        judged_removed=judged_removed,
        capped=len(capped),
        label_counts=dict(Counter(label for _, label in train)),
        small_classes=small,
        labels_without_examples=missing,
    )
