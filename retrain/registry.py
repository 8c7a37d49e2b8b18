"""Adapter versions and the active-version pointer.

A version is an immutable folder ``<state>/adapters/<name>`` holding the LoRA
weights, the classifier head, ``labels.json``, ``training.yaml`` and the
training data (``train.jsonl``) its reference profile is built from. Names are
``v1``, ``v2``, ... from a counter in the database, so a name is never reused,
even for a candidate that was later rejected. Promotion and rollback change only
the pointer, in one transaction together with the audit row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from monitor.errors import RegistryError, VersionNotFoundError
from monitor.store import ActiveRow, AuditRow, Store, VersionRow
from retrain.datasets import Example

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "labels.json")


@dataclass(frozen=True)
class Version:
    name: str
    number: int
    adapter_dir: Path
    parent: str | None
    run_id: str | None
    created_at: float

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "number": self.number,
            "adapter_dir": str(self.adapter_dir),
            "parent": self.parent,
            "run_id": self.run_id,
            "created_at": self.created_at,
        }


def _version(row: VersionRow) -> Version:
    return Version(row.name, row.number, Path(row.adapter_dir), row.parent, row.run_id, row.created_at)


def write_examples(path: Path, examples: list[Example]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for text, label in examples:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def read_examples(path: Path) -> list[Example]:
    if not path.is_file():
        raise RegistryError(f"data file of a version not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return [(row["text"], row["label"]) for row in map(json.loads, handle) if row]


def write_train_data(folder: Path, examples: list[Example]) -> Path:
    return write_examples(Path(folder) / "train.jsonl", examples)


def read_train_data(folder: Path) -> list[Example]:
    return read_examples(Path(folder) / "train.jsonl")


class Registry:
    def __init__(self, store: Store, state_dir: Path):
        self.store = store
        self.adapters_root = Path(state_dir) / "adapters"
        self.profiles_root = Path(state_dir) / "profiles"
        self.adapters_root.mkdir(parents=True, exist_ok=True)
        self.profiles_root.mkdir(parents=True, exist_ok=True)

    def profile_dir(self, name: str) -> Path:
        return self.profiles_root / name

    def active(self) -> Version | None:
        with self.store.session() as session:
            pointer = session.get(ActiveRow, 1)
            if pointer is None:
                return None
            return _version(session.get(VersionRow, pointer.version))

    def activated_at(self) -> float | None:
        """Return when the active pointer last moved (Unix seconds), or None before the first activation."""
        with self.store.session() as session:
            pointer = session.get(ActiveRow, 1)
            return pointer.changed_at if pointer else None

    def active_for_server(self) -> tuple[str, str, str | None] | None:
        """Return (name, adapter folder, run id) of the active version, the model server's version source."""
        version = self.active()
        return (version.name, str(version.adapter_dir), version.run_id) if version else None

    def candidates_for_server(self, states: tuple[str, ...]) -> list[tuple[str, str]]:
        """Return (run id, candidate folder) of the runs in ``states`` whose candidate exists, newest first.

        The model server loads these before approval, so that promoting one needs no load.
        """
        return [(run["id"], run["candidate_dir"]) for run in self.store.runs(states=states)
                if run["candidate_dir"] and Path(run["candidate_dir"]).is_dir()]

    def get(self, name: str) -> Version:
        with self.store.session() as session:
            row = session.get(VersionRow, name)
            if row is None:
                known = [v.name for v in self.versions()]
                raise VersionNotFoundError(f"version {name!r} not found; known versions: {', '.join(known) or 'none'}")
            return _version(row)

    def versions(self) -> list[Version]:
        with self.store.session() as session:
            return [_version(row) for row in session.scalars(select(VersionRow).order_by(VersionRow.number))]

    def register(self, candidate_dir: Path, *, parent: str | None, run_id: str | None, actor: str) -> Version:
        """Move a finished candidate folder into the registry under the next version name."""
        candidate_dir = Path(candidate_dir)
        missing = [name for name in REQUIRED_FILES if not (candidate_dir / name).is_file()]
        if missing:
            raise RegistryError(f"candidate folder {candidate_dir} is incomplete: {missing[0]} not found")
        with self.store.session() as session:
            number = int(session.scalar(select(func.max(VersionRow.number))) or 0) + 1
            name = f"v{number}"
            target = self.adapters_root / name
            if target.exists():
                raise RegistryError(f"version folder {target} already exists; the registry and the folder disagree")
            # Same filesystem, so the rename is atomic: readers see no folder or a whole one.
            os.rename(candidate_dir, target)
            session.add(
                VersionRow(
                    name=name,
                    number=number,
                    created_at=time.time(),
                    adapter_dir=str(target.resolve()),
                    parent=parent,
                    run_id=run_id,
                    train_data=str((target / "train.jsonl").resolve()),
                )
            )
            self.store.audit(actor, "version_registered", run_id=run_id, version=name,
                             detail={"parent": parent}, session=session)
        logger.info("registered adapter version %s (run %s)", name, run_id)
        return self.get(name)

    def activate(self, name: str, *, actor: str, action: str = "activate", run_id: str | None = None,
                 detail: dict | None = None) -> str | None:
        """Point the registry at ``name``; return the previously active name."""
        with self.store.session() as session:
            if session.get(VersionRow, name) is None:
                raise RegistryError(f"version {name!r} not found")
            pointer = session.get(ActiveRow, 1)
            previous = pointer.version if pointer else None
            if pointer is None:
                session.add(ActiveRow(id=1, version=name, changed_at=time.time()))
            else:
                pointer.version = name
                pointer.changed_at = time.time()
            self.store.audit(actor, action, run_id=run_id, version=name,
                             detail={"previous": previous, **(detail or {})}, session=session)
        logger.info("%s: active version %s -> %s by %s", action, previous, name, actor)
        return previous

    def activation_stack(self) -> list[str]:
        """Return the versions a rollback can step back through, oldest first; the last is active.

        The audit log is replayed like an undo history: an activation or promotion pushes
        its version, and a rollback to a version on the stack pops everything above it.
        A rollback to a version not on the stack (``--to`` a newer one) pushes it.
        """
        with self.store.session() as session:
            rows = session.execute(
                select(AuditRow.action, AuditRow.version)
                .where(AuditRow.action.in_(["activate", "promote", "rollback"]))
                .order_by(AuditRow.id)
            ).all()
        stack: list[str] = []
        for action, version in rows:
            if action == "rollback" and version in stack:
                del stack[stack.index(version) + 1:]
            elif not stack or stack[-1] != version:
                stack.append(version)
        return stack

    def previous_active(self) -> str | None:
        """Return the version a rollback goes to by default: the one below the active version."""
        current = self.active()
        if current is None:
            return None
        stack = self.activation_stack()
        if stack and stack[-1] == current.name:
            return stack[-2] if len(stack) > 1 else None
        # The pointer was set without an audit entry; fall back to the lineage.
        return current.parent

    def rollback(self, to: str | None, *, actor: str, reason: str = "") -> tuple[str | None, str]:
        """Activate ``to`` (default: the version active before the current one); return (from, to).

        Repeated rollbacks keep stepping back, because a version that was rolled back from
        leaves the history. The runs of both versions follow: the one left becomes
        ``rolled_back`` and the one activated ``active``.
        """
        current = self.active()
        if current is None:
            raise RegistryError("no active version to roll back from")
        target = to or self.previous_active()
        if target is None:
            raise RegistryError(f"version {current.name} has no earlier version to roll back to; "
                                "name the version to activate (--to on the CLI, \"to\" in the HTTP body)")
        if target == current.name:
            raise RegistryError(f"version {target} is already active")
        target_version = self.get(target)
        self.activate(target, actor=actor, action="rollback", detail={"reason": reason})
        if current.run_id:
            self.store.update_run(current.run_id, state="rolled_back")
        if target_version.run_id:
            self.store.update_run(target_version.run_id, state="active")
        return current.name, target
