"""Prompts exactly as the daemon builds them: the training box tokenizes the same text it serves.

A prompt is a cacheable ``prefix`` (system turns, a task's instructions and examples) and a
``body`` (the conversation or the task input, ending with the answer cue).
"""

from __future__ import annotations

import json
from typing import Any

from slm_agent.contracts.api import ChatMessage
from slm_agent.contracts.tasks import EXAMPLE_END, Task, render_tools
from slm_agent.errors import BadRequestError
from slm_agent.models.manifest import PromptFormat


def render_chat(messages: list[ChatMessage], fmt: PromptFormat) -> tuple[str, str]:
    """System turns form the cacheable prefix; the conversation and the answer cue the body."""
    prefix_parts: list[str] = []
    body_parts: list[str] = []
    for message in messages:
        text = message.text()
        if message.role in ("system", "developer") and not body_parts:
            prefix_parts.append(fmt.system.format(content=text))
        elif message.role == "assistant":
            if message.tool_calls:
                text = text or json.dumps([c.get("function") for c in message.tool_calls])
            body_parts.append(fmt.assistant.format(content=text))
        elif message.role == "tool":
            body_parts.append(fmt.user.format(content=f"[tool result] {text}"))
        else:
            body_parts.append(fmt.user.format(content=text))
    body_parts.append(fmt.generation_prefix)
    return "".join(prefix_parts), "".join(body_parts)


def chat_stop(fmt: PromptFormat) -> list[str]:
    """A chat answer's stop strings: the format's own, and a new line opening any turn the format
    writes, so a base model never runs on into turns of its own ('… Assistant: … Assistant: …')."""
    stops = list(fmt.stop)
    for turn in (fmt.user, fmt.assistant):
        cue = turn.split("{content}")[0].strip()
        if cue and f"\n{cue}" not in stops:
            stops.append(f"\n{cue}")
    return stops


def task_prompt(
    task: Task, value: str, tools: list[dict[str, Any]] | None, fmt: PromptFormat
) -> tuple[str, str, list[str]]:
    """A task's prompt (cached prefix, body) and default stop strings, as the daemon and training see it."""
    if task.kind == "tool_call" and not tools:
        raise BadRequestError(
            f"task {task.name!r} chooses among tools, but the request has none: send them in 'tools'",
            param="tools",
        )
    # Structured answers are one line (several calls of a tool_call task one line each, as its
    # examples write them); free text ends where the prompt format says.
    stop = fmt.stop if task.kind == "text" else [EXAMPLE_END] if task.kind == "tool_call" else ["\n"]
    return task.prefix(), task.body(value, tools), stop


def last_user_text(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.text()
    raise BadRequestError("the request has no user message for the task to work on", param="messages")


def chat_task_prompt(
    task: Task, messages: list[ChatMessage], tools: list[dict[str, Any]] | None, fmt: PromptFormat
) -> tuple[str, str, list[str]]:
    """A chat-shaped task's prompt: the agent's own conversation, its tools listed after the system
    turns (part of the cached prefix, since an agent step sends the same tools every time).

    The answer is one line for structured kinds (a label, compact JSON, or a tool call as
    ``{"name": ..., "arguments": {...}}``), free text ends where the prompt format says.
    """
    prefix, body = render_chat(messages, fmt)
    if tools:
        prefix += fmt.system.format(content=render_tools(tools).rstrip("\n"))
    stop = ["\n"] if task.kind != "text" else chat_stop(fmt)
    return prefix, body, stop
