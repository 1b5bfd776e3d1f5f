"""Which answer a trace teaches, and in which exact form.

Priority: a user's correction > the remote LLM's answer on an escalated or proxied call > a local
answer a user rated good. An answer is the trace's output, else its tool call (what a remote that
calls a tool returns), else its text. Errors, answers that break the task's contract and answers
rated bad teach nothing. A label is written in the one form the daemon's grammar lets the model
emit (schema property order, ``json.dumps`` spacing), so the adapter never learns a form it
can't produce.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from slm_agent.contracts.schemas import schema_error
from slm_agent.contracts.tasks import Task
from slm_agent.train.data.collected import CollectedTrace
from slm_agent.train.data.contract import tool_call_answer

Source = Literal["correction", "remote", "local_positive"]
SOURCES: tuple[Source, ...] = ("correction", "remote", "local_positive")


class Labeled(BaseModel):
    label: str
    source: Source


class Unusable(BaseModel):
    reason: str


def _ordered(value: Any, schema: dict[str, Any] | None) -> Any:
    """``value`` with object keys in the schema's property order (unknown keys after, sorted)."""
    if isinstance(value, dict):
        props = (schema or {}).get("properties") or {}
        keys = [k for k in props if k in value] + sorted(k for k in value if k not in props)
        return {k: _ordered(value[k], props.get(k)) for k in keys}
    if isinstance(value, list):
        items = (schema or {}).get("items")
        return [_ordered(v, items if isinstance(items, dict) else None) for v in value]
    return value


def _tool_schema(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any] | None:
    for tool in tools or []:
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            params: dict[str, Any] = fn.get("parameters") or {}
            return params
    return None


def canonical(task: Task, answer: Any, tools: list[dict[str, Any]] | None = None) -> str | None:
    """The label text for ``answer`` (text or parsed value), or None when it breaks the contract."""
    if task.kind == "text":
        text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        return text.strip() or None
    if task.kind == "label":
        label = answer.strip() if isinstance(answer, str) else None
        return label if label in task.labels else None
    value = answer
    if isinstance(answer, str):
        try:
            value = json.loads(answer)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict):
        return None
    if task.kind == "json":
        if schema_error(value, task.output_schema or {}) is not None:
            return None
        return json.dumps(_ordered(value, task.output_schema), ensure_ascii=False)
    # tool_call: {"name": ..., "arguments": {...}} for a tool the call offered
    name, arguments = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    params = _tool_schema(tools or task.tools, name)
    if params is None:
        return None
    if schema_error(arguments, params) is not None:
        return None
    return json.dumps({"name": name, "arguments": _ordered(arguments, params)}, ensure_ascii=False)


def given_answer(trace: CollectedTrace) -> Any:
    """The answer the trace recorded (output, tool call or text), or why there is none to use."""
    if trace.output is not None:
        return trace.output
    if trace.tool_calls:
        if len(trace.tool_calls) > 1:
            # A tool_call task's label is one call (the form its adapter is trained to write);
            # parallel calls, which chat requests may get, are not a training label yet.
            return Unusable(reason="several tool calls")
        call = tool_call_answer(trace.tool_calls)
        return call if call is not None else Unusable(reason="invalid output")
    return trace.response if trace.response is not None else Unusable(reason="no answer")


def label_trace(task: Task, trace: CollectedTrace) -> Labeled | Unusable:
    tools = trace.tools or task.tools or None
    correction = trace.correction
    if correction is not None:
        label = canonical(task, correction, tools)
        return Labeled(label=label, source="correction") if label else Unusable(reason="invalid correction")
    if trace.rating == "bad":
        return Unusable(reason="negative feedback")
    if trace.status >= 400 or trace.error:
        return Unusable(reason="error")
    answer = given_answer(trace)
    if isinstance(answer, Unusable):
        return answer
    label = canonical(task, answer, tools)
    if label is None:
        return Unusable(reason="invalid output")
    if trace.route == "remote":
        return Labeled(label=label, source="remote")
    if trace.rating == "good":
        return Labeled(label=label, source="local_positive")
    return Unusable(reason="unlabeled local answer")
