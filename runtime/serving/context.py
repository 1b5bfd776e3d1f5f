"""What one request carries through the request path: who called, what it targets, what runs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import Task
from slm_agent.models.manifest import PromptFormat
from slm_agent.runtime.engine import GenerationRequest
from slm_agent.runtime.serving.adapters import AdapterLease

TASK_PREFIX = "task:"


async def _connected() -> bool:
    return False


@dataclass
class CallContext:
    """Who is calling, from request headers, and how to tell that the caller went away."""

    client: str | None = None
    session_id: str | None = None
    agent: str | None = None
    task_header: str | None = None
    deadline_s: float | None = None
    route: Literal["local", "remote"] | None = None  # the X-SLM-Route override
    # The HTTP layer passes the request's is_disconnected: a local job is cancelled when it says so.
    disconnected: Callable[[], Awaitable[bool]] = _connected


@dataclass
class Target:
    model_id: str
    task: Task | None
    adapter: str | None
    adapter_scale: float
    prompt_format: PromptFormat
    # Holds an adapter loaded on first use while this request lives, so it is not evicted under it.
    lease: AdapterLease | None = None


@dataclass
class Job:
    """A prepared request: what the engine runs, and what the trace and answer need afterwards."""

    endpoint: str
    target: Target
    gen: GenerationRequest
    trace: TraceRecord
    output_kind: str  # text | json | label | tool_call | tool_text (text or calls in the model's syntax)
    tools: list[dict[str, Any]] | None = None
    # The request's parallel_tool_calls. A grammar holds a tool_call answer to it; a tool_text
    # answer (the model's own syntax, unconstrained) keeps its first call when it is false.
    parallel_tool_calls: bool = True
    started: float = field(default_factory=time.perf_counter)
    # Placeholder -> original, for a job prompted with redacted text (a chat task learned from
    # redacted traces sees its input as it was trained on); its answer gets the originals back.
    placeholders: dict[str, str] = field(default_factory=dict)


def new_trace(endpoint: str, ctx: CallContext, base_model: str, **fields: Any) -> TraceRecord:
    """A request's trace as it starts: who called, on which base; the rest is filled in on the way."""
    return TraceRecord(
        endpoint=endpoint,
        client=ctx.client,
        session_id=ctx.session_id,
        agent=ctx.agent,
        base_model=base_model,
        **fields,
    )
