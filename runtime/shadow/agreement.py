"""Does the local answer agree with the remote's? One shadow pair scored with the task's metric.

Both answers are OpenAI assistant messages (``content``, ``tool_calls``): what the agent would
have received either way. The comparisons are the eval step's (contracts/scoring.py), so an
adapter's eval figure and its live agreement mean the same thing. A remote answer that cannot be
compared (no JSON where JSON was due, free text) scores ``None``: it says nothing about the
adapter and must not count against it.
"""

from __future__ import annotations

import json
from typing import Any

from slm_agent.contracts.schemas import schema_error
from slm_agent.contracts.scoring import argument_f1, field_f1, json_equal, parse_call

Message = dict[str, Any]
Verdict = tuple[bool | None, float]


def agreement(kind: str, local: Message, remote: Message, *, schema: dict[str, Any] | None = None) -> Verdict:
    """(agreed, score in [0, 1]); agreed is None when the pair cannot be judged.

    tool_call: same tools called with the same arguments (score: argument F1); json: equal values
    (score: field F1), a local answer outside ``schema`` disagrees; label: equal stripped text.
    Text tasks have no metric: they stay remote, so their pairs are (None, 0.0).
    """
    if kind == "tool_call":
        return _tool_calls(local, remote)
    if kind == "json":
        return _json(local, remote, schema)
    if kind == "label":
        return _label(local, remote)
    return None, 0.0


def _content(message: Message) -> str | None:
    content = message.get("content")
    if isinstance(content, list):  # content parts: the text ones, in order
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else None


def _label(local: Message, remote: Message) -> Verdict:
    expected = _content(remote)
    if expected is None or not expected.strip():
        return None, 0.0
    agreed = (_content(local) or "").strip() == expected.strip()
    return agreed, float(agreed)


def _json(local: Message, remote: Message, schema: dict[str, Any] | None) -> Verdict:
    try:
        expected = json.loads(_content(remote) or "")
    except ValueError:
        return None, 0.0
    try:
        value = json.loads(_content(local) or "")
    except ValueError:
        return False, 0.0
    score, _ = field_f1(value, expected)
    if schema and schema_error(value, schema) is not None:
        return False, score
    return json_equal(value, expected), score


def _calls(message: Message) -> list[tuple[str, dict[str, Any]]]:
    """The message's tool calls as (name, arguments); ValueError when one does not parse."""
    return [parse_call(call) for call in message.get("tool_calls") or []]


def _tool_calls(local: Message, remote: Message) -> Verdict:
    try:
        expected = _calls(remote)
    except ValueError:
        return None, 0.0
    if not expected:  # the remote answered in words: agreeing means doing the same
        if local.get("tool_calls"):
            return False, 0.0
        return _label(local, remote)
    try:
        calls = _calls(local)
    except ValueError:
        return False, 0.0
    compared: list[tuple[float, bool]] = []  # (argument F1, exact) per call, in order
    for (name, args), (expected_name, expected_args) in zip(calls, expected, strict=False):
        if name != expected_name:
            compared.append((0.0, False))
            continue
        f1, differing = argument_f1(args, expected_args)
        compared.append((f1, not differing))
    agreed = len(calls) == len(expected) and all(exact for _, exact in compared)
    return agreed, sum(f1 for f1, _ in compared) / max(len(calls), len(expected))
