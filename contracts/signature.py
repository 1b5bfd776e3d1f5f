"""What makes agent calls "the same task": the fixed parts of a request's template.

An agent step sends the same system prompt, tool set and response format every time, with a user
message that varies. The signature hashes those fixed parts, plus the fixed lead of the user
message (the text before its first ``:`` or line break, with digits masked), so every call of one
step shares one signature whatever its content. The device (matching) and the training box
(discovery) compute it with this one function.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_LEAD = re.compile(r"^(.{1,120}?)(?::|\n)")
_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def user_lead(text: str) -> str:
    """The fixed lead of a templated user message ("Classify this message:"), or "" for free text."""
    match = _LEAD.match(text.strip())
    return _DIGITS.sub("0", _norm(match.group(1))).lower() if match else ""


def _tool_key(tool: Mapping[str, Any]) -> list[Any]:
    fn = tool.get("function", tool)
    return [fn.get("name"), fn.get("parameters") or {}]


def template(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fixed parts of a chat request, as the signature hashes them."""
    system = [_norm(message_text(m)) for m in messages if m.get("role") in ("system", "developer")]
    users = [m for m in messages if m.get("role") == "user"]
    return {
        "system": system,
        "tools": sorted((_tool_key(t) for t in tools or ()), key=lambda k: str(k[0])),
        "response_format": dict(response_format) if response_format else None,
        "user_lead": user_lead(message_text(users[-1])) if users else "",
    }


def template_signature(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> str:
    """A short stable hash of the request's template (see the module docstring)."""
    canonical = json.dumps(template(messages, tools, response_format), sort_keys=True, ensure_ascii=False)
    return "sig_" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def request_content(messages: Sequence[Mapping[str, Any]]) -> str:
    """The variable part a content match embeds: the last user message (system text is template)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""
