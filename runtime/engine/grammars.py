"""Grammars that constrain local output: JSON schemas, label sets, tool calls. Compiled once each."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from slm_agent.contracts.tasks import Task
from slm_agent.errors import SchemaError

# llama_cpp and jsonschema are imported where they are called: both are slow to load and most
# importers (routing, the CLI) never compile or check a schema.


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def check_schema(schema: Any) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise SchemaError("the JSON schema must be an object", param="response_format")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"invalid JSON schema: {exc.message}", param="response_format") from exc


_compiled: dict[str, Any] = {}


def _compile_schema(schema: dict[str, Any]) -> Any:
    from llama_cpp import LlamaGrammar

    # Keyed canonically, compiled as given: property order decides the order the model writes fields.
    key = _canonical(schema)
    if key in _compiled:
        return _compiled[key]
    try:
        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except (
        Exception
    ) as exc:  # the converter raises ValueError/KeyError/NotImplementedError on what it cannot express
        raise SchemaError(
            f"this JSON schema cannot be turned into a grammar: {exc}", param="response_format"
        ) from exc
    if len(_compiled) >= 256:
        _compiled.pop(next(iter(_compiled)))
    _compiled[key] = grammar
    return grammar


def schema_grammar(schema: dict[str, Any]) -> Any:
    check_schema(schema)
    return _compile_schema(schema)


@lru_cache(maxsize=1)
def json_object_grammar() -> Any:
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import JSON_GBNF

    return LlamaGrammar.from_string(JSON_GBNF, verbose=False)


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF literal


@lru_cache(maxsize=64)
def _label_grammar(labels: tuple[str, ...]) -> Any:
    from llama_cpp import LlamaGrammar

    # The base model's answers start after "Output:", so allow the space it likes to put first.
    return LlamaGrammar.from_string(
        'root ::= " "? (' + " | ".join(_gbnf_literal(label) for label in labels) + ")", verbose=False
    )


def label_grammar(labels: list[str]) -> Any:
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


def tool_call_grammar(tools: list[dict[str, Any]], only: str | None = None) -> Any:
    return schema_grammar(tool_call_schema(tools, only))


def task_grammar(task: Task, tools: list[dict[str, Any]] | None, forced: str | None = None) -> Any:
    """The grammar a task's answer is sampled under, or None for free text."""
    if task.kind == "json" and task.output_schema:
        return schema_grammar(task.output_schema)
    if task.kind == "label":
        return label_grammar(task.labels)
    if task.kind == "tool_call" and tools:
        return tool_call_grammar(tools, forced)
    return None
