"""The one writer of trace rows: every attempt's trace is committed here, exactly once, before the
last byte of its answer goes out. Response builders shape answers; they never write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from slm_agent.contracts.api import ToolCall
from slm_agent.contracts.records import TraceRecord
from slm_agent.errors import SlmAgentError, StorageFullError
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.serving.context import CallContext, Job, new_trace
from slm_agent.runtime.store.traces import TraceStore

log = logging.getLogger(__name__)


@dataclass
class LocalAnswer:
    """What a local answer puts in its trace: the text sent, the typed output, the tool calls."""

    text: str | None = None
    output: Any = None
    tool_calls: list[ToolCall] | None = None


# Enough of a rejected request's text to see what it was; the rest is cut and says so.
EXCERPT_CHARS = 4096


def excerpt(value: Any) -> Any:
    """``value`` with every string over ``EXCERPT_CHARS`` cut to its head and marked truncated."""
    if isinstance(value, str):
        if len(value) <= EXCERPT_CHARS:
            return value
        return f"{value[:EXCERPT_CHARS]}…[truncated: {len(value) - EXCERPT_CHARS} more characters]"
    if isinstance(value, dict):
        return {key: excerpt(item) for key, item in value.items()}
    if isinstance(value, list):
        return [excerpt(item) for item in value]
    return value


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


class TraceRecorder:
    def __init__(self, traces: TraceStore, base_model: str) -> None:
        self.traces = traces
        self.base_model = base_model

    def local(
        self,
        job: Job,
        result: GenerationResult | None,
        answer: LocalAnswer | None = None,
        *,
        error: SlmAgentError | None = None,
        status: int | None = None,
    ) -> TraceRecord:
        """A local job's trace: its answer, or its error (the error learns the trace id)."""
        trace = job.trace
        answer = answer or LocalAnswer(text=result.text if result else None)
        trace.response = answer.text
        trace.output = answer.output
        trace.tool_calls = [c.model_dump() for c in answer.tool_calls] if answer.tool_calls else None
        if result is not None:
            trace.finish_reason = result.finish_reason
            trace.prompt_tokens = result.prompt_tokens
            trace.completion_tokens = result.completion_tokens
            trace.cached_tokens = result.cached_tokens
            trace.constraint_engine = result.constraint_engine
            trace.queue_ms = round(result.queue_ms, 3)
            trace.ttft_ms = round(result.ttft_ms, 3) if result.ttft_ms is not None else None
            trace.tokens_per_s = round(result.tokens_per_s, 2) if result.tokens_per_s else None
        trace.latency_ms = ms_since(job.started)
        if status is not None:
            trace.status = status
        if error is not None:
            self.failed(trace, error)
            return trace
        return self._insert(trace)

    def remote(self, trace: TraceRecord, started: float) -> TraceRecord:
        """A remote answer's trace, already filled in by the routing that made the call."""
        trace.latency_ms = ms_since(started)
        return self._insert(trace)

    def failed(
        self,
        trace: TraceRecord,
        error: SlmAgentError | None = None,
        *,
        started: float | None = None,
        attempts: list[dict[str, Any]] | None = None,
    ) -> bool:
        """A failed (or abandoned) request's trace. With the disk full the client must still see
        its own error, so a trace that cannot be written is logged, not raised."""
        if error is not None:
            trace.status, trace.error = error.status_code, error.message
        if attempts is not None:
            trace.attempts = attempts or None
        if started is not None:
            trace.latency_ms = ms_since(started)
        try:
            self._insert(trace)
        except StorageFullError as exc:
            log.warning("failed request %s not traced: %s", trace.id, exc.message)
            return False
        if error is not None:
            error.trace_id = trace.id
        return True

    def _insert(self, trace: TraceRecord) -> TraceRecord:
        trace.complete()  # a content match still embedding: done long before the answer is
        return self.traces.insert(trace)

    def rejected(
        self, endpoint: str, ctx: CallContext, model: str | None, request: Any, error: SlmAgentError
    ) -> None:
        """A request that failed before it could run (unknown model, prompt too long...); its trace
        keeps an excerpt of each long text, not a hostile client's megabytes."""
        trace = new_trace(
            endpoint, ctx, self.base_model, model=model, route="local", request=excerpt(request)
        )
        self.failed(trace, error)
