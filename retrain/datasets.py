"""Labelled text datasets: CLINC150 for the demo and a user's own JSONL/CSV files.

A dataset is a list of ``(text, label)`` pairs per split plus the full label
set of the classifier head, which may contain labels with no training data yet
(the demo's head contains all 150 intents and ``oos`` from the start).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import tempfile
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from monitor.errors import DataError

logger = logging.getLogger(__name__)

Example = tuple[str, str]

CLINC150_FILES = {
    "data_full.json": "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
    "domains.json": "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a",
}
CLINC150_URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/{name}"
OUT_OF_SCOPE = "oos"


@dataclass
class Dataset:
    """Splits of ``(text, label)`` pairs and the classifier's full label set."""

    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    # Training examples left out by ``per_label_limit``: never trained on, so
    # usable as in-distribution traffic.
    unused_train: list[Example] = field(default_factory=list)


@dataclass
class Clinc150:
    """The raw CLINC150 splits (``train``, ``val``, ``test``, ``oos_*``) and domain map."""

    splits: dict[str, list[Example]]
    domains: dict[str, list[str]]

    @property
    def labels(self) -> list[str]:
        intents = sorted({intent for intents in self.domains.values() for intent in intents})
        return intents + [OUT_OF_SCOPE]

    def intents_of(self, domains: list[str]) -> set[str]:
        unknown = [name for name in domains if name not in self.domains]
        if unknown:
            raise DataError(
                f"data.clinc150.domains: unknown domain {unknown[0]!r}; allowed: {', '.join(sorted(self.domains))}"
            )
        return {intent for name in domains for intent in self.domains[name]}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "driftloop"


def _download(name: str, target: Path) -> None:
    url = CLINC150_URL.format(name=name)
    logger.info("downloading %s to %s", url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            out.write(response.read())
        actual = sha256_file(Path(tmp_name))
        if actual != CLINC150_FILES[name]:
            raise DataError(f"{url}: sha256 mismatch: expected {CLINC150_FILES[name]}, got {actual}")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def locate_clinc150(data_root: str | Path | None = None, cache_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """Return a folder holding verified CLINC150 files.

    Looks in ``data_root/clinc150`` (default ``$DRIFTLOOP_DATA``), then in the
    cache folder, and downloads into the cache once when neither has the files.
    """
    root = data_root if data_root is not None else os.environ.get("DRIFTLOOP_DATA")
    if root:
        folder = Path(root) / "clinc150"
        missing = [name for name in CLINC150_FILES if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"DRIFTLOOP_DATA={root}: {folder / missing[0]} not found; put data_full.json and "
                "domains.json from github.com/clinc/oos-eval (data/) there, or unset DRIFTLOOP_DATA to download them"
            )
        return folder

    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "clinc150"
    for name, expected in CLINC150_FILES.items():
        path = folder / name
        if path.is_file() and sha256_file(path) == expected:
            continue
        if not download:
            raise DataError(f"{path} is missing or has the wrong checksum, and downloading is off")
        try:
            _download(name, path)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"could not download CLINC150 file {name} ({exc}); set DRIFTLOOP_DATA to a folder containing "
                "clinc150/data_full.json and clinc150/domains.json from github.com/clinc/oos-eval (data/)"
            ) from None
    return folder


def load_clinc150(data_root: str | Path | None = None, cache_dir: str | Path | None = None) -> Clinc150:
    folder = locate_clinc150(data_root, cache_dir)
    for name, expected in CLINC150_FILES.items():
        actual = sha256_file(folder / name)
        if actual != expected:
            raise DataError(f"{folder / name}: sha256 mismatch: expected {expected}, got {actual}")
    raw = json.loads((folder / "data_full.json").read_text())
    domains = json.loads((folder / "domains.json").read_text())
    splits = {name: [(str(text), str(label)) for text, label in rows] for name, rows in raw.items()}
    return Clinc150(splits=splits, domains=domains)


def cap_per_label(examples: list[Example], limit: int | None, seed: int) -> tuple[list[Example], list[Example]]:
    """Keep at most ``limit`` examples per label (seeded choice); return (kept, left out)."""
    if limit is None:
        return list(examples), []
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example[1]].append(example)
    rng = random.Random(seed)
    kept: list[Example] = []
    rest: list[Example] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        kept.extend(group[:limit])
        rest.extend(group[limit:])
    rng.shuffle(kept)
    return kept, rest


def clinc150_dataset(clinc: Clinc150, domains: list[str] | None, per_label_limit: int | None, seed: int) -> Dataset:
    """Build the demo dataset: train/val/test restricted to ``domains``, head over all labels."""
    intents = clinc.intents_of(domains) if domains else clinc.intents_of(list(clinc.domains))

    def keep(split: str) -> list[Example]:
        return [example for example in clinc.splits[split] if example[1] in intents]

    train, unused = cap_per_label(keep("train"), per_label_limit, seed)
    return Dataset(labels=clinc.labels, train=train, validation=keep("val"), test=keep("test"), unused_train=unused)


def load_labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[Example]:
    """Read ``(text, label)`` pairs from a JSONL (one object per line) or CSV file.

    Raises DataError naming the file, the line and the column on any bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv")

    examples: list[Example] = []
    for line_number, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                raise DataError(f"{path}:{line_number}: missing column {column!r} (columns: {', '.join(map(str, row))})")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line_number}: column {text_column!r} must be a non-empty string, got {text!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}:{line_number}: column {label_column!r} is empty")
        examples.append((text, str(label)))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_number, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        # Line 1 is the header, so data rows start at line 2.
        return [(index, dict(row)) for index, row in enumerate(reader, start=2)]


def files_dataset(train_path: Path, validation_path: Path | None, test_path: Path | None, text_column: str, label_column: str,
                  extra_labels: list[str], per_label_limit: int | None, seed: int) -> Dataset:
    """Build a dataset from the user's files; a missing validation or test file is split off train."""
    train = load_labelled_file(train_path, text_column, label_column)
    rng = random.Random(seed)
    rng.shuffle(train)
    validation = load_labelled_file(validation_path, text_column, label_column) if validation_path else None
    test = load_labelled_file(test_path, text_column, label_column) if test_path else None
    if validation is None or test is None:
        cut = max(1, len(train) // 10)
        if test is None:
            test, train = train[:cut], train[cut:]
        if validation is None:
            validation, train = train[:cut], train[cut:]
    labels = sorted({label for _, label in train} | set(extra_labels))
    unknown = sorted({label for _, label in validation + test} - set(labels))
    if unknown:
        raise DataError(
            f"labels {unknown[:5]} appear in validation/test but not in train; add them to data.extra_labels"
        )
    train, unused = cap_per_label(train, per_label_limit, seed)
    return Dataset(labels=labels, train=train, validation=validation, test=test, unused_train=unused)


def dataset_from_config(config) -> Dataset:
    """Build the dataset that ``config.data`` describes."""
    data = config.data
    if data.source == "clinc150":
        return clinc150_dataset(load_clinc150(), data.clinc150.domains, data.per_label_limit, data.seed)
    if not data.train_path:
        raise DataError("data.train_path: missing; it is required when data.source is 'files'")
    for key in ("train_path", "validation_path", "test_path"):
        value = getattr(data, key)
        if value and not config.resolve_path(value).is_file():
            raise DataError(f"data.{key}: file not found: {config.resolve_path(value)} (value {value!r})")
    return files_dataset(
        config.resolve_path(data.train_path),
        config.resolve_path(data.validation_path) if data.validation_path else None,
        config.resolve_path(data.test_path) if data.test_path else None,
        data.text_column,
        data.label_column,
        list(data.extra_labels),
        data.per_label_limit,
        data.seed,
    )
