"""A local task asked of a remote chat LLM: the task's prompt as chat messages, and the remote's
answer parsed into the same typed output the local engine gives.

Structured tasks (json, label, tool_call) send ``response_format={"type": "json_object",
"schema": ...}``: OpenAI's JSON mode plus the ``schema`` key that llama.cpp-style servers turn into
a grammar; the schema is also spelled out in the system message so any model knows the shape. The
answer is validated against it here either way, so a provider ignoring the key cannot slip
malformed output past the task's contract.
"""

from __future__ import annotations

import json
import re
from typing import Any

from slm_agent.contracts.api import ToolCall, ToolCallFunction
from slm_agent.contracts.schemas import validate_local_answer
from slm_agent.contracts.tasks import Task, render_tools
from slm_agent.errors import SchemaError

# A structured answer is bounded by its schema, so the remote gets room to finish it even when the
# task's own cap was tuned tight for the small model.
STRUCTURED_MIN_TOKENS = 256
_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def output_schema(task: Task, tools: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The JSON schema a remote answer to ``task`` must match (None for free text)."""
    if task.kind == "json":
        return task.output_schema
    if task.kind == "label":
        return {"type": "string", "enum": task.labels}
    if task.kind == "tool_call":
        names = [t.get("function", t).get("name") for t in tools or []]
        return {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": names}, "arguments": {"type": "object"}},
            "required": ["name", "arguments"],
        }
    return None


def task_messages(task: Task, value: str, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Instructions, then each few-shot example as a user/assistant pair, then the input."""
    system = task.instructions.strip() or task.description or f"Perform the task {task.name!r}."
    schema = output_schema(task, tools)
    if schema is not None:
        system += "\nAnswer with JSON only, matching this schema: " + json.dumps(schema)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for example in task.examples:
        if task.kind == "tool_call" and task.call_separator() in example.output:
            continue  # the task API answers with one call, as the schema above says
        head = render_tools(example.tools) if task.kind == "tool_call" and example.tools else ""
        output = json.dumps(example.output) if task.kind == "label" else example.output
        messages.append({"role": "user", "content": f"{head}{task.input_label}: {example.input}"})
        messages.append({"role": "assistant", "content": output})
    head = render_tools(tools) if task.kind == "tool_call" and tools else ""
    messages.append({"role": "user", "content": f"{head}{task.input_label}: {value}"})
    return messages


def task_body(
    task: Task,
    value: str,
    tools: list[dict[str, Any]] | None,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """The chat request a remote provider gets for one run of ``task``."""
    schema = output_schema(task, tools)
    limit = max_tokens or task.sampling.max_tokens
    if schema is not None:
        limit = max(limit, STRUCTURED_MIN_TOKENS)
    body: dict[str, Any] = {
        "model": f"task:{task.name}",  # replaced by the provider's escalation model
        "messages": task_messages(task, value, tools),
        "max_tokens": limit,
        "temperature": task.sampling.temperature if temperature is None else temperature,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_object", "schema": schema}
    return body


def strip_fences(text: str) -> str:
    """Chat models like to wrap JSON in ```json fences; the contract is the JSON inside."""
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text.strip()


def parse_remote_output(
    task: Task, tools: list[dict[str, Any]] | None, message: dict[str, Any], finish_reason: str | None
) -> tuple[Any, str, list[ToolCall] | None]:
    """(typed output, answer text, tool calls) of a remote chat answer; SchemaError if it breaks
    the task's contract."""
    calls = message.get("tool_calls") or []
    text = message.get("content") or ""
    if task.kind == "tool_call" and calls:
        fn = calls[0].get("function") or {}
        args = fn.get("arguments") or "{}"
        text = json.dumps(
            {"name": fn.get("name"), "arguments": json.loads(args) if isinstance(args, str) else args}
        )
    if task.kind == "text":
        return text, text, None
    text = strip_fences(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if task.kind == "label":
            value = text  # a bare label is fine too
        else:
            raise SchemaError(
                f"the remote answer for task {task.name!r} is not valid JSON: {text[:200]!r}"
            ) from exc
    schema = output_schema(task, tools)
    failure = validate_local_answer(
        json.dumps(value), finish_reason, schema=schema if task.kind != "tool_call" else None,
        tools=tools, tool_call=value if task.kind == "tool_call" and isinstance(value, dict) else None,
    )  # fmt: skip
    if failure is not None:
        raise SchemaError(f"the remote answer for task {task.name!r} breaks its contract: {failure}")
    if task.kind == "label":
        return value, value, None
    if task.kind == "tool_call":
        call = ToolCall(
            function=ToolCallFunction(name=value["name"], arguments=json.dumps(value["arguments"]))
        )
        return value, text, [call]
    return value, text, None
