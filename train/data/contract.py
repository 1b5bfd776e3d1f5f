"""Output contracts: what a trace answered, and which task contract a set of answers fits.

``answer_of`` reads a trace's answer as a value: a dict for a JSON object or a tool call, a string
otherwise. ``infer_contract`` picks the kind (with a schema or labels) once nearly all answers
agree (``_NEARLY_ALL``); a JSON key is required, and a set of objects counts as tool calls, when
``_REQUIRED_SHARE`` of them have it. ``instructions`` states the contract in words.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Literal

from slm_agent.train.data.collected import CollectedTrace

Kind = Literal["json", "label", "tool_call", "text"]
AnswerShape = Literal["tool_call", "json", "text"]

MAX_LABELS = 12
_NEARLY_ALL = 0.95
_REQUIRED_SHARE = 0.9


def tool_call_answer(tool_calls: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The first OpenAI-shaped tool call as ``{"name": ..., "arguments": {...}}``, the form the
    daemon's tool-call grammar writes; None when there is none or its arguments are not a JSON object."""
    if not tool_calls or not isinstance(tool_calls[0], dict):
        return None
    fn = tool_calls[0].get("function") or tool_calls[0]
    name, arguments = fn.get("name"), fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict | None):
        return None
    return {"name": name, "arguments": arguments or {}}


def answer_of(trace: CollectedTrace) -> Any:
    """What the trace should have answered: its correction, else its output, its tool call, or its
    response text (a remote that calls a tool answers with ``tool_calls`` and no content).

    Training labels (``labels.label_trace``) are stricter: they also drop answers rated bad and
    traces with an error, and check the answer against a known task's contract.
    """
    if trace.correction:
        return _parse(trace.correction)
    if trace.status >= 400:
        return None
    if trace.output is not None:
        return _parse(trace.output) if isinstance(trace.output, str) else trace.output
    if trace.tool_calls:
        return tool_call_answer(trace.tool_calls)
    return _parse(trace.response) if trace.response else None


def _parse(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return stripped or None


def answer_text(answer: Any) -> str:
    """The exact text a model should write for ``answer``: JSON for objects, the string otherwise."""
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def is_tool_call(answer: Any) -> bool:
    return isinstance(answer, dict) and isinstance(answer.get("name"), str) and "arguments" in answer


def answer_shape(answer: Any) -> AnswerShape | None:
    """The answer's shape (tool call, JSON object or text); None for no answer."""
    if answer is None:
        return None
    if is_tool_call(answer):
        return "tool_call"
    return "json" if isinstance(answer, dict) else "text"


def infer_contract(answers: list[Any]) -> tuple[Kind, dict[str, Any] | None, list[str]]:
    """(kind, output_schema, labels) that the answers fit."""
    if not answers:
        return "text", None, []
    objects = [a for a in answers if isinstance(a, dict)]
    if len(objects) >= _NEARLY_ALL * len(answers):
        if sum(map(is_tool_call, objects)) >= _REQUIRED_SHARE * len(objects):
            return "tool_call", None, []
        return "json", infer_schema(objects), []
    strings = [a.strip() for a in answers if isinstance(a, str)]
    counts = Counter(strings).most_common(MAX_LABELS)
    covered = sum(c for _, c in counts)
    if (
        len(strings) >= _NEARLY_ALL * len(answers)
        and len(counts) >= 2
        and covered >= _NEARLY_ALL * len(strings)
        and len(strings) >= 2 * len(counts)  # a closed set repeats itself
        and all(len(label) <= 40 and "\n" not in label for label, _ in counts)
    ):
        return "label", None, [label for label, _ in counts]
    return "text", None, []


def infer_schema(values: list[Any]) -> dict[str, Any]:
    """A JSON schema every value fits: required keys are those in >=90% of objects, nulls make a
    field nullable."""
    present = [v for v in values if v is not None]
    nullable = len(present) < len(values)
    types = list(dict.fromkeys(_json_type(v) for v in present))
    if "integer" in types and "number" in types:
        types.remove("integer")
    schema: dict[str, Any]
    if not types:
        return {"type": "null"}
    if types == ["object"]:
        keys = list(dict.fromkeys(k for v in present for k in v))
        schema = {
            "type": "object",
            "properties": {k: infer_schema([v[k] for v in present if k in v]) for k in keys},
            "required": [k for k in keys if sum(k in v for v in present) >= _REQUIRED_SHARE * len(present)],
        }
    elif types == ["array"]:
        items = [x for v in present for x in v]
        schema = {"type": "array", "items": infer_schema(items)} if items else {"type": "array"}
    else:
        schema = {"type": types[0] if len(types) == 1 else types}
    if not nullable:
        return schema
    if isinstance(schema["type"], list):
        return {**schema, "type": [*schema["type"], "null"]}
    if schema["type"] in ("object", "array"):
        # A type list would drop properties/items in the grammar converter; anyOf keeps them.
        return {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "type": [schema["type"], "null"]}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def instructions(
    kind: Kind, schema: dict[str, Any] | None, labels: list[str], tools: list[dict[str, Any]]
) -> str:
    """The output contract in words, for the task's instructions."""
    if kind == "json" and schema:
        props = schema.get("properties", {})
        fields = f" with the fields {_join(list(props))}" if props else ""
        text = f"Read the input and answer with one JSON object{fields}."
        if any(_allows_null(s) for s in props.values()):
            text += " Use null for a field the input does not mention."
        return text
    if kind == "label":
        return f"Answer with exactly one of these labels: {', '.join(labels)}."
    if kind == "tool_call":
        names = [t.get("function", t).get("name", "") for t in tools]
        return (
            f"Pick the one tool ({', '.join(names)}) that serves the request and give its arguments as JSON."
        )
    return "Answer the input the way the examples do."


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _allows_null(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind) or "anyOf" in schema


def infer_tools(traces: list[CollectedTrace], answers: list[Any]) -> list[dict[str, Any]]:
    """The tools the traces offered; when none were recorded, ones sketched from the calls."""
    seen: dict[str, dict[str, Any]] = {}
    for trace in traces:
        for tool in trace.tools or []:
            fn = tool.get("function", tool)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                seen.setdefault(fn["name"], tool)
    if seen:
        return list(seen.values())
    calls: dict[str, list[Any]] = {}
    for answer in answers:
        if is_tool_call(answer):
            calls.setdefault(answer["name"], []).append(answer.get("arguments") or {})
    return [
        {"type": "function", "function": {"name": name, "parameters": infer_schema(args)}}
        for name, args in calls.items()
    ]
