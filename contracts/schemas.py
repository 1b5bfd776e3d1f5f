"""Checks of an answer against its contract: a JSON schema, a tool's parameters, a task's shape.

The daemon uses them to decide whether a local answer stands; the training box to decide what a
label is worth. One implementation, so the two never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import jsonschema


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_error(instance: Any, schema: dict[str, Any]) -> str | None:
    """Where and how ``instance`` breaks ``schema`` (the most relevant error), or None."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def validate_local_answer(
    text: str | None,
    finish_reason: str | None,
    *,
    schema: dict[str, Any] | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_call: dict[str, Any] | None = None,
) -> str | None:
    """Why a local answer is not good enough to return, or None when it is.

    ``tools`` are OpenAI tool definitions; ``tool_call`` is ``{"name": ..., "arguments": str|dict}``
    (or an OpenAI ``tool_calls`` item with a ``function`` key).
    """
    if finish_reason == "length":
        return "truncated: the answer hit max_tokens (finish_reason=length)"
    if tool_call is not None:
        return _tool_call_error(tool_call, tools or [])
    if not text or not text.strip():
        return "empty answer"
    if schema is not None:
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"invalid JSON: {exc}"
        error = schema_error(value, schema)
        if error is not None:
            return f"JSON does not match the schema: {error}"
    return None


def _tool_call_error(tool_call: dict[str, Any], tools: Sequence[dict[str, Any]]) -> str | None:
    fn = tool_call.get("function", tool_call)
    name = fn.get("name")
    definitions = {t.get("function", t).get("name"): t.get("function", t) for t in tools}
    if name not in definitions:
        return f"tool call names unknown tool {name!r} (known: {sorted(n for n in definitions if n)})"
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            return f"tool call {name!r}: arguments are invalid JSON: {exc}"
    if not isinstance(arguments, dict):
        return f"tool call {name!r}: arguments must be a JSON object"
    parameters = definitions[name].get("parameters")
    if parameters:
        error = schema_error(arguments, parameters)
        if error is not None:
            return f"tool call {name!r}: arguments do not match the tool's schema: {error}"
    return None
