"""Trace and feedback records: one request as the device stores it, syncs it and trains on it.

The same models are read by the trace store, the monitor, the collector and the training box.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from slm_agent.contracts.clock import new_id, utcnow

JSON_COLUMNS = ("request", "tools", "params", "output", "tool_calls", "attempts", "redactions")


class TraceRecord(BaseModel):
    """One request as stored (and as synced off the device)."""

    id: str = Field(default_factory=new_id)
    seq: int | None = Field(None, description="Store-local sequence number; set by the database.")
    created_at: str = Field(default_factory=utcnow)
    endpoint: str
    client: str | None = None
    session_id: str | None = None
    agent: str | None = None
    task: str | None = None
    model: str | None = None
    base_model: str | None = None
    adapter: str | None = None
    route: str = "local"
    route_reason: str | None = None
    request: Any = None
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] | None = None
    response: str | None = None
    output: Any = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    tokens_per_s: float | None = None
    status: int = 200
    error: str | None = None
    stream: bool = False
    attempts: list[dict[str, Any]] | None = None
    redactions: dict[str, int] | None = None
    remote_model: str | None = None
    remote_latency_ms: float | None = None
    cost_usd: float | None = None
    match_method: str | None = Field(
        None, description="How the request was matched to its task: explicit, signature or embedding."
    )
    match_score: float | None = Field(None, description="The match's cosine (embedding) or 1.0.")
    signature: str | None = Field(None, description="Template signature of a chat request.")
    constraint_engine: str | None = Field(
        None, description="What constrained a local answer: llguidance, or gbnf where it fell back."
    )

    # Fields still being worked out while the call goes on (a content match embedding on the
    # matcher's thread): the trace writer runs this before the row is written. Not a field:
    # it never leaves the process.
    _pending: Callable[[], None] | None = PrivateAttr(default=None)

    def complete_later(self, finish: Callable[[], None]) -> None:
        self._pending = finish

    @property
    def incomplete(self) -> bool:
        """``complete`` has work left (which may block until the matcher's thread answers)."""
        return self._pending is not None

    def complete(self) -> None:
        """Run what ``complete_later`` left (once); the writer calls it before the row is written."""
        finish, self._pending = self._pending, None
        if finish is not None:
            finish()


class Feedback(BaseModel):
    rating: Literal["good", "bad"] | None = None
    correction: str | None = Field(None, description="The answer the model should have given.")
    comment: str | None = None
    source: str | None = None


class FeedbackRecord(Feedback):
    seq: int | None = None
    trace_id: str
    created_at: str = Field(default_factory=utcnow)


def encode_column(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return int(value)
    return value


def decode_row(
    row: dict[str, Any], columns: tuple[str, ...] = JSON_COLUMNS, *, lenient: bool = False
) -> dict[str, Any]:
    """A database row's JSON columns back to values, in place.

    ``lenient`` keeps text that is not JSON as it is, so a reader shows an odd row instead of failing.
    """
    for name in columns:
        value = row.get(name)
        if value is None:
            continue
        if not lenient:
            row[name] = json.loads(value)
        elif isinstance(value, str):
            with contextlib.suppress(json.JSONDecodeError):
                row[name] = json.loads(value)
    return row
