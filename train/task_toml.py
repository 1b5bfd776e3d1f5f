"""Writing a task file's TOML from its data (the dict ``runtime.tasks.parse_task`` reads back).

``sampling`` is written as a ``[sampling]`` table and ``examples`` as ``[[examples]]`` tables, the
way task files are written by hand; every other key takes one line, however deeply its value nests
(inline tables and arrays), so an output schema or a tool list stays one key. TOML has no null:
None values are left out.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from slm_agent.contracts.tasks import Task
from slm_agent.errors import BadRequestError

_TABLES = frozenset({"sampling"})
_TABLE_ARRAYS = frozenset({"examples"})
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def task_toml(data: dict[str, Any]) -> str:
    """``data`` as a task file: plain keys first, then the ``sampling`` and ``examples`` tables."""
    sections = _TABLES | _TABLE_ARRAYS
    lines = _pairs({k: v for k, v in data.items() if k not in sections})
    for key, value in data.items():
        if key in _TABLES:
            lines += ["", f"[{_toml_key(key)}]", *_pairs(value)]
        elif key in _TABLE_ARRAYS:
            for table in value:
                lines += ["", f"[[{_toml_key(key)}]]", *_pairs(table)]
    return "\n".join(lines) + "\n"


def _pairs(table: dict[str, Any]) -> list[str]:
    return [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF:
            # Other control characters must be escaped; a lone surrogate cannot be encoded at all.
            out.append(f"\\u{ord(ch):04X}" if not 0xD800 <= ord(ch) <= 0xDFFF else "\\uFFFD")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    """One TOML value on one line: inline tables and arrays, so any nesting fits a single key."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        # TOML has no null: JSON nulls inside tool definitions are dropped.
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise BadRequestError(f"cannot write {type(value).__name__} to a task file")


def shipped_task_file(task: Task) -> str:
    """The task file that travels with a published adapter: the definition as the training box
    has it, without an adapter pin (the device binds the adapter it pulls)."""
    path = Path(task.source)
    if path.is_file():
        data = tomllib.loads(path.read_text())
        data.setdefault("name", task.name)
    else:
        data = task.model_dump(mode="json", exclude={"source"}, exclude_defaults=True, exclude_none=True)
        data["name"] = task.name
    data.pop("adapter", None)
    data.pop("adapter_scale", None)
    header = f"# Task {task.name!r}, shipped with its adapter by the training box (slm-agent sync pull).\n"
    return header + task_toml(data)
