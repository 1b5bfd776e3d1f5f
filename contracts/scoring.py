"""Score an answer against a reference answer, per task kind: one notion of "right" everywhere.

JSON answers are compared field by field, labels exactly, tool calls with the Berkeley
Function-Calling Leaderboard's AST check, free text with SQuAD's token F1. Answers are parsed as
strictly as the runtime parses a local answer (no stripping of code fences). The training box's
eval and the daemon's shadow mode (local answer vs the remote's) both score with these, so an
eval figure and a live agreement figure mean the same thing.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
from pydantic import BaseModel, Field

from slm_agent.contracts.schemas import schema_error
from slm_agent.contracts.tasks import Task
from slm_agent.errors import BadRequestError, SchemaError

FieldPath = tuple[str | int, ...]
_MAX_LISTED = 5


class ExampleScore(BaseModel):
    """How one answer compares with its reference."""

    valid: bool = Field(description="The answer keeps the task's contract: schema, label set or tool schema.")
    exact: bool = Field(description="The answer equals the reference (after the kind's normalisation).")
    f1: float = Field(ge=0, le=1, description="Partial credit: field-, argument- or token-level F1.")
    detail: str | None = Field(None, description="Why the answer is invalid, or where it differs.")


def score_example(
    task: Task, prediction: str | None, reference: str, tools: list[dict[str, Any]] | None = None
) -> ExampleScore:
    """Score ``prediction`` (the raw answer text; None when the call failed) against ``reference``.

    ``tools`` are the OpenAI tool definitions offered with a tool_call example; without them the
    task's default tools apply, as in the runtime.
    """
    if prediction is None:
        return _invalid("no answer: the model call failed")
    if task.kind == "json":
        return _score_json(prediction, reference, task.output_schema or {})
    if task.kind == "label":
        return _score_label(prediction, reference, task.labels)
    if task.kind == "tool_call":
        return _score_tool_call(prediction, reference, tools or task.tools)
    return _score_text(prediction, reference)


def _invalid(detail: str) -> ExampleScore:
    return ExampleScore(valid=False, exact=False, f1=0.0, detail=detail)


def _f1(true_positives: int, n_predicted: int, n_reference: int) -> float:
    """F1 from counts: 2PR/(P+R) reduces to 2TP/(|pred|+|ref|); nothing on both sides is a match."""
    total = n_predicted + n_reference
    return 2 * true_positives / total if total else 1.0


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _parse_reference(reference: str) -> Any:
    try:
        return json.loads(reference)
    except ValueError as exc:
        raise BadRequestError(f"reference answer is not JSON ({exc}): {reference[:80]!r}") from exc


# -- equality ------------------------------------------------------------------------------------


def _as_is(text: str) -> str:
    return text


def json_equal(a: Any, b: Any, text: Callable[[str], str] = _as_is) -> bool:
    """Equality of JSON values where true != 1 but 3 == 3.0 (JSON has one number type), with
    strings compared through ``text``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return text(a) == text(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y, text) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k], text) for k in a)
    return a is None and b is None


# -- json ----------------------------------------------------------------------------------------


def _schema_error(instance: Any, schema: dict[str, Any]) -> str | None:
    try:
        return schema_error(instance, schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise SchemaError(f"invalid JSON schema: {exc.message}; fix the task or tool definition") from exc


def _score_json(prediction: str, reference: str, schema: dict[str, Any]) -> ExampleScore:
    expected = _parse_reference(reference)
    try:
        value = json.loads(prediction)
    except ValueError as exc:
        return _invalid(f"not JSON: {exc}")
    error = _schema_error(value, schema)
    f1, differing = field_f1(value, expected)
    exact = json_equal(value, expected)
    if error is not None:
        detail: str | None = f"does not match the schema: {error}"
    else:
        detail = None if exact else f"fields differ: {_listed(differing)}"
    return ExampleScore(valid=error is None, exact=exact, f1=f1, detail=detail)


def field_f1(prediction: Any, reference: Any) -> tuple[float, list[str]]:
    """F1 over (path, normalised leaf) pairs, and the dotted paths that do not match."""
    predicted, expected = dict(_leaves(prediction)), dict(_leaves(reference))
    matched = {path for path, leaf in predicted.items() if path in expected and expected[path] == leaf}
    differing = sorted(_dotted(path) for path in (predicted.keys() | expected.keys()) - matched)
    return _f1(len(matched), len(predicted), len(expected)), differing


def _leaves(value: Any, path: FieldPath = ()) -> Iterator[tuple[FieldPath, tuple[Any, ...]]]:
    # Empty containers are leaves, so {"tags": []} against {"tags": []} counts as a match.
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, _leaf(value)


def _leaf(value: Any) -> tuple[Any, ...]:
    """A comparable form of a leaf, tagged by type so "1", 1 and true stay distinct."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, str):
        return ("string", " ".join(value.casefold().split()))
    return (type(value).__name__,)


def _dotted(path: FieldPath) -> str:
    return ".".join(str(part) for part in path) or "(root)"


# -- label ---------------------------------------------------------------------------------------


def _score_label(prediction: str, reference: str, labels: list[str]) -> ExampleScore:
    answer, expected = prediction.strip(), reference.strip()
    valid, exact = answer in labels, answer == expected
    if not valid:
        detail: str | None = f"{answer[:80]!r} is not one of the labels {labels}"
    else:
        detail = None if exact else f"answered {answer!r}, expected {expected!r}"
    return ExampleScore(valid=valid, exact=exact, f1=float(exact), detail=detail)


# -- tool_call -----------------------------------------------------------------------------------

# BFCL's string standardisation: case, spaces and this punctuation do not change an argument.
_BFCL_IGNORED = re.compile(r"[\s,./\-_*^]")


def _bfcl_text(text: str) -> str:
    return _BFCL_IGNORED.sub("", text).lower().replace("'", '"')


def _score_tool_call(prediction: str, reference: str, tools: list[dict[str, Any]]) -> ExampleScore:
    try:
        expected_name, expected_args = parse_call(_parse_reference(reference))
    except ValueError as exc:
        raise BadRequestError(f"reference answer is not a tool call: {exc}") from exc
    try:
        name, args = parse_call(json.loads(prediction))
    except ValueError as exc:
        return _invalid(f"not a tool call: {exc}")
    error = _call_error(name, args, tools)
    mismatch: str | None = None
    if name != expected_name:
        f1, mismatch = 0.0, f"called {name!r}, expected {expected_name!r}"
    else:
        f1, differing = argument_f1(args, expected_args)
        if differing:
            mismatch = f"arguments differ: {_listed(differing)}"
    return ExampleScore(valid=error is None, exact=mismatch is None, f1=f1, detail=error or mismatch)


def parse_call(value: Any) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of ``{"name", "arguments"}``; like the runtime, an OpenAI ``tool_calls``
    item and arguments given as a JSON string are accepted too."""
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object with name and arguments")
    fn = value.get("function", value)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError("no tool name")
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments of {name!r} must be a JSON object")
    return name, arguments


def _call_error(name: str, args: dict[str, Any], tools: list[dict[str, Any]]) -> str | None:
    """Why a call does not fit the offered tools (BFCL's AST checks), or None."""
    if not tools:
        return None
    definitions = {fn.get("name"): fn for fn in (t.get("function", t) for t in tools)}
    if name not in definitions:
        return f"unknown tool {name!r}; offered: {sorted(str(n) for n in definitions)}"
    parameters: dict[str, Any] = definitions[name].get("parameters") or {}
    missing = [p for p in parameters.get("required", []) if p not in args]
    if missing:
        return f"{name}: missing required argument(s) {_listed(missing)}"
    unexpected = sorted(set(args) - set(parameters.get("properties") or {}))
    if unexpected:
        return f"{name}: unexpected argument(s) {_listed(unexpected)}"
    error = _schema_error(args, parameters) if parameters else None
    return f"{name}: arguments do not match the tool's schema: {error}" if error else None


def argument_f1(args: dict[str, Any], expected: dict[str, Any]) -> tuple[float, list[str]]:
    matched = {k for k in args if k in expected and json_equal(args[k], expected[k], _bfcl_text)}
    differing = sorted((args.keys() | expected.keys()) - matched)
    return _f1(len(matched), len(args), len(expected)), differing


# -- text ----------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _score_text(prediction: str, reference: str) -> ExampleScore:
    valid = bool(prediction.strip())
    exact = " ".join(prediction.split()) == " ".join(reference.split())
    predicted, expected = _squad_tokens(prediction), _squad_tokens(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    f1 = _f1(common, len(predicted), len(expected))
    if not valid:
        return ExampleScore(valid=False, exact=exact, f1=f1, detail="empty answer")
    return ExampleScore(valid=True, exact=exact, f1=f1, detail=None if exact else f"token F1 {f1:.2f}")


def _squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: case, punctuation and articles do not count."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()
