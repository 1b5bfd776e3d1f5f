"""Server-sent events framing shared by every streaming route."""

from __future__ import annotations

import json
from typing import Any

from slm_agent.contracts.api import error_body
from slm_agent.errors import SlmAgentError

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One ``data:`` event holding ``data`` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def error_event(exc: SlmAgentError) -> bytes:
    """A stream's error, as OpenAI sends one mid-stream: an event holding the error body."""
    return sse(error_body(exc.message, exc.error_type, exc.param, exc.code))
