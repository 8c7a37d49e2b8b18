"""Write docs/configuration.md from the config models: one row per key, with default, range and description.

Run ``python -m monitor.config_docs`` after changing monitor/config.py; a test fails while the
page and the models disagree or a key has no description.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic_core import PydanticUndefined

from pydantic import BaseModel

from monitor.config import config_fields, env_variable, is_scalar, is_section

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEADER = """# Configuration

Every key of the driftloop config, generated from the models in `monitor/config.py` by
`python -m monitor.config_docs`; a test fails when this page and the models disagree. Every key
is optional. Unknown keys are rejected at load time with the dotted key. Relative paths are
resolved against the folder of the config file. `config/driftloop.yaml` shows the same keys
with their defaults.

## Environment variables

A variable named `DRIFTLOOP_` plus the dotted key in capitals, with `__` in place of each dot,
overrides a key that takes one value (a string, number, boolean or null), whatever the file
says. Examples: `DRIFTLOOP_DATABASE_URL`, `DRIFTLOOP_SERVER__MONITOR_URL`,
`DRIFTLOOP_MONITOR__HOST`. Use them for secrets and for addresses that differ between
environments. The rules:

- `null` sets null; an empty variable is ignored.
- Lists and mappings (such as `detectors.enabled` or `notify.version_hooks`) are set in the
  file only.
- A variable with `__` that names no such key is an error that names the variable, so a typo
  in a nested key does not pass silently. A top-level name that is no key, such as
  `DRIFTLOOP_DATA` (the CLINC150 folder) or `DRIFTLOOP_API_TOKEN` (the API token, see
  `auth.token_env`), is left to the part that reads it, unless it is close to a top-level
  key: `DRIFTLOOP_STATEDIR` or `DRIFTLOOP_DATABASEURL` is an error that suggests
  `DRIFTLOOP_STATE_DIR` or `DRIFTLOOP_DATABASE_URL`.
- An invalid value is reported with the key and the variable, such as
  `server.port (from DRIFTLOOP_SERVER__PORT): invalid value 'abc'`. The value of
  `database_url` is never repeated, because it may contain a password.

The column *variable* gives the name for each key that can be set this way.
"""


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return ""
    return f"`{json.dumps(value)}`"


def _allowed(field) -> str:
    """Describe the range or the choices of a key, from its pydantic constraints and type."""
    parts = []
    for constraint in field.metadata:
        for kind, attribute, symbol in ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
                                        (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"),
                                        (annotated_types.MinLen, "min_length", "length ≥")):
            if isinstance(constraint, kind):
                parts.append(f"{symbol} {getattr(constraint, attribute)}")
    literals = [arg for arg in _flatten(field.annotation) if typing.get_origin(arg) is typing.Literal]
    for literal in literals:
        parts.append(" \\| ".join(f"`{choice}`" for choice in typing.get_args(literal)))
    return ", ".join(parts)


def _flatten(annotation) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [inner for arg in typing.get_args(annotation) for inner in _flatten(arg)]
    return [annotation]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _list_item_model(field) -> type[BaseModel] | None:
    """Return the model of the items when ``field`` is a list of config models, such as notify.version_hooks."""
    if typing.get_origin(field.annotation) is list:
        (item,) = typing.get_args(field.annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def documented_fields():
    """Yield (dotted key, field, in a list) for every key, with the keys of list items as ``list[].key``."""
    for key, field in config_fields():
        yield key, field, False
        item = _list_item_model(field)
        if item is not None:
            for name, inner in item.model_fields.items():
                yield f"{key}[].{name}", inner, True


def render() -> str:
    """Return the Markdown page: the header, then one table per section."""
    # Rows grouped by section, in the order the sections first appear; top-level keys come first.
    sections: dict[str, list[str]] = {"top level": []}
    for key, field, in_list in documented_fields():
        if is_section(field):
            continue
        section = key.rpartition(".")[0] or "top level"
        variable = f"`{env_variable(key)}`" if is_scalar(field) and not in_list else "file only"
        description = _cell(field.description or "")
        row = f"| `{key}` | {_cell(_default(field))} | {_allowed(field)} | {variable} | {description} |"
        sections.setdefault(section, []).append(row)
    lines = [HEADER]
    for section, rows in sections.items():
        lines += ["", f"## {section}" if section == "top level" else f"## `{section}`", "",
                  "| key | default | allowed | variable | description |", "|---|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def undocumented_keys() -> list[str]:
    """Return the keys, list items included and sections excepted, whose field has no description."""
    return [key for key, field, _ in documented_fields() if not is_section(field) and not (field.description or "").strip()]


def main() -> int:
    missing = undocumented_keys()
    if missing:
        print("keys without a description in monitor/config.py: " + ", ".join(missing), file=sys.stderr)
        return 1
    DOC_PATH.write_text(render())
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
