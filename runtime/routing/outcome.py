"""What routing hands the HTTP layer: a JSON body, a stream of SSE bytes, or a bare status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from slm_agent.contracts.records import TraceRecord


@dataclass
class Outcome:
    trace: TraceRecord
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    status: int = 200
