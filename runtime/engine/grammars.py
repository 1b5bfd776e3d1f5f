"""Constraints on local output: JSON schemas, label sets, tool calls. Compiled once each, cached by
canonical schema; see constraints.py for how a schema is tightened and which engine samples it."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

from slm_agent.contracts.tasks import EXAMPLE_END, Task
from slm_agent.errors import SchemaError
from slm_agent.runtime.engine.constraints import (
    Constraint,
    check_size,
    json_grammar,
    json_rule,
    lark_grammar,
    tighten,
)

# llama_cpp, llguidance and jsonschema are imported where they are called: all are slow to load
# and most importers (routing, the CLI) never compile or check a schema.


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


_checked: set[str] = set()  # canonical schemas already found valid: agents resend the same tools


@lru_cache(maxsize=1)
def _meta_validator() -> Any:
    """The metaschema validator, built once: ``check_schema`` builds one per call (~1 ms)."""
    import jsonschema

    meta = jsonschema.Draft202012Validator.META_SCHEMA
    return jsonschema.Draft202012Validator(
        meta, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def check_schema(schema: Any) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise SchemaError("the JSON schema must be an object", param="response_format")
    key = check_size(schema, "response_format")
    if key in _checked:
        return
    error = jsonschema.exceptions.best_match(_meta_validator().iter_errors(schema))
    if error is not None:
        raise SchemaError(f"invalid JSON schema: {error.message}", param="response_format")
    if len(_checked) >= 1024:
        _checked.clear()
    _checked.add(key)


_compiled: dict[str, Constraint] = {}
_compiled_lock = threading.Lock()


def _gbnf_from_schema(schema: dict[str, Any], param: str) -> Any:
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    # The converter raises ValueError/KeyError/NotImplementedError on what it cannot express, and
    # RecursionError on wide or deep schemas (it recurses per property).
    except (Exception, RecursionError) as exc:
        raise SchemaError(f"this JSON schema cannot be turned into a grammar: {exc}", param=param) from exc


def _cached(key: str, build: Callable[[], Constraint]) -> Constraint:
    with _compiled_lock:
        cached = _compiled.get(key)
    if cached is not None:
        return cached
    constraint = build()
    if constraint.llg is None:
        constraint.gbnf()  # a schema neither can express is the caller's error, raised now
    with _compiled_lock:
        if len(_compiled) >= 256:
            _compiled.pop(next(iter(_compiled)))
        _compiled[key] = constraint
    return constraint


def _compile_schema(schema: dict[str, Any], param: str = "response_format") -> Constraint:
    # Keyed canonically, compiled as given: property order decides the order the model writes fields.
    key = check_size(schema, param)
    return _cached(
        key, lambda: Constraint(key, json_grammar(tighten(schema)), partial(_gbnf_from_schema, schema, param))
    )


def schema_grammar(schema: dict[str, Any]) -> Constraint:
    check_schema(schema)
    return _compile_schema(schema)


@lru_cache(maxsize=1)
def json_object_grammar() -> Constraint:
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import JSON_GBNF

    return Constraint(
        "json_object",
        json_grammar({"type": "object"}),
        partial(LlamaGrammar.from_string, JSON_GBNF, verbose=False),
    )


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF literal (and a Lark one)


def _gbnf_labels(labels: tuple[str, ...]) -> Any:
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(
        'root ::= " "? (' + " | ".join(_gbnf_literal(label) for label in labels) + ")", verbose=False
    )


@lru_cache(maxsize=64)
def _label_grammar(labels: tuple[str, ...]) -> Constraint:
    # The base model's answers start after "Output:", so allow the space it likes to put first.
    lark = 'start: " "? (' + " | ".join(_gbnf_literal(label) for label in labels) + ")"
    return Constraint(f"labels:{_canonical(labels)}", lark_grammar(lark), partial(_gbnf_labels, labels))


def label_grammar(labels: list[str]) -> Constraint:
    return _label_grammar(tuple(labels))


def tool_function(tool: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``function`` object of a tool (accepts the bare function too)."""
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not fn.get("name"):
        raise SchemaError("each tool needs a function with a name", param="tools")
    return fn


def tool_call_schema(tools: list[dict[str, Any]], only: str | None = None) -> dict[str, Any]:
    """JSON schema of one call to one of ``tools``: {"name": <const>, "arguments": <parameters>}."""
    options = []
    for tool in tools:
        fn = tool_function(tool)
        if only and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        check_schema(params)
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise SchemaError(
            f"tool_choice names {only!r}, which is not among the request's tools", param="tool_choice"
        )
    return options[0] if len(options) == 1 else {"oneOf": options}


def tool_call_grammar(
    tools: list[dict[str, Any]], only: str | None = None, *, parallel: bool = False
) -> Constraint:
    """One call; with ``parallel``, a JSON array of calls: the list a chat template's own call
    syntax writes (``<tool_call>[...]</tool_call>``), so a model trained on it may add a second."""
    schema = tool_call_schema(tools, only)
    if parallel:
        schema = {"type": "array", "items": schema, "minItems": 1}
    return _compile_schema(schema, param="tools")


def _gbnf_call_lines(schema: dict[str, Any], separator: str, end: str) -> Any:
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        call = re.sub(r"^root ::=", "call ::=", json_schema_to_gbnf(json.dumps(schema)), flags=re.MULTILINE)
    except (Exception, RecursionError) as exc:  # as in _gbnf_from_schema
        raise SchemaError(f"these tools cannot be turned into a grammar: {exc}", param="tools") from exc
    root = f"root ::= call ({_gbnf_literal(separator)} call)* {_gbnf_literal(end)}?\n"
    return LlamaGrammar.from_string(root + call, verbose=False)


def call_lines_grammar(tools: list[dict[str, Any]], only: str | None, separator: str, end: str) -> Constraint:
    """One or more calls, each after ``separator`` but the first, then optionally ``end``: the
    transcript a base model's few-shot examples write, where ending the answer is as natural as
    the line break after it (a bare list of calls, measured, has it repeat calls to max_tokens)."""
    schema = tool_call_schema(tools, only)
    key = f"lines:{_canonical([separator, end])}:{check_size(schema, 'tools')}"
    lark = (
        f"start: call ({_gbnf_literal(separator)} call)* {_gbnf_literal(end)}?\n"
        f"call: {json_rule(tighten(schema))}"
    )
    return _cached(
        key,
        lambda: Constraint(
            key, lark_grammar(lark, param="tools"), partial(_gbnf_call_lines, schema, separator, end)
        ),
    )


def task_grammar(
    task: Task, tools: list[dict[str, Any]] | None, forced: str | None = None, *, parallel: bool = False
) -> Constraint | None:
    """The grammar a task's answer is sampled under, or None for free text. ``parallel`` (the
    request's ``parallel_tool_calls``) lets a tool_call task of the task form answer with several
    calls, one per line as its examples write them; a chat-form task's adapter learned one call."""
    if task.kind == "json" and task.output_schema:
        return schema_grammar(task.output_schema)
    if task.kind == "label":
        return label_grammar(task.labels)
    if task.kind == "tool_call" and tools:
        if parallel and task.form == "task":
            return call_lines_grammar(tools, forced, task.call_separator(), EXAMPLE_END)
        return tool_call_grammar(tools, forced)
    return None
