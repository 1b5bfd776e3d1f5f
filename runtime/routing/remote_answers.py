"""Asking the remote LLM on a request's behalf: its answer, with route, cost and attempts in the
trace; a stream passed through chunk by chunk; ``None`` when it could not answer, so the caller
falls back to the local model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from slm_agent.contracts.api import TaskRequest, TaskResponse, Usage
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import Task
from slm_agent.errors import RemoteError, SlmAgentError, UnavailableError
from slm_agent.runtime.remote import tasks as remote_tasks
from slm_agent.runtime.remote.assembled import AssembledMessage
from slm_agent.runtime.remote.client import RemoteClient
from slm_agent.runtime.remote.settings import RemoteResult
from slm_agent.runtime.remote.streaming import AsyncRemoteStream
from slm_agent.runtime.routing.outcome import Outcome
from slm_agent.runtime.routing.router import RouteDecision
from slm_agent.runtime.serving.context import CallContext, Job, new_trace
from slm_agent.runtime.serving.recorder import TraceRecorder
from slm_agent.runtime.serving.responses import finish_reason
from slm_agent.runtime.serving.sse import DONE, error_event, sse


async def completed(trace: TraceRecord) -> None:
    """Let a content match still embedding finish off the event loop: the trace writer would
    otherwise wait for it there, holding up every other request."""
    if trace.incomplete:
        await asyncio.to_thread(trace.complete)


# Failures that mean "the remote did not answer": the local answer is the fallback.
FALLBACK = (RemoteError, UnavailableError)
Attempts = list[dict[str, Any]]


def remote_attempt(result: RemoteResult, decision: RouteDecision, error: str | None = None) -> dict[str, Any]:
    return {
        "route": "remote",
        "reason": decision.reason,
        "provider": result.provider,
        "model": result.model,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cost_usd": result.cost_usd,
        "latency_ms": round(result.latency_s * 1000, 3),
        "retries": result.attempts - 1,
        "error": error,
    }


class RemoteAnswers:
    def __init__(
        self,
        remote: RemoteClient,
        recorder: TraceRecorder,
        announce: Callable[[RouteDecision, TraceRecord], None],
    ) -> None:
        self.remote = remote
        self.recorder = recorder
        self.announce = announce

    async def chat(
        self,
        raw: dict[str, Any],
        trace: TraceRecord,
        decision: RouteDecision,
        attempts: Attempts,
        *,
        escalation: bool,
        started: float,
    ) -> Outcome | None:
        """The remote's chat answer as the agent sent it, or None when it could not answer."""
        try:
            if raw.get("stream"):
                stream = self.remote.astream_chat(raw, escalation=escalation)
                first = await anext(stream, None)  # failures before any chunk can still fall back
                return Outcome(
                    trace, stream=self._pass_through(stream, first, trace, decision, attempts, started)
                )
            result = await self.remote.achat(raw, escalation=escalation)
        except FALLBACK as exc:
            attempts.append({"route": "remote", "reason": decision.reason, "error": exc.message})
            return None
        except SlmAgentError as exc:  # budget spent (402), personal data refused (400)
            self.recorder.failed(trace, exc, started=started, attempts=attempts)
            raise
        trace.tool_calls = result.message.get("tool_calls")
        await completed(trace)
        self.finish(
            trace, decision, result, attempts, result.message.get("content"), result.finish_reason, started
        )
        return Outcome(trace, body=result.response)

    async def _pass_through(
        self,
        stream: AsyncRemoteStream,
        first: dict[str, Any] | None,
        trace: TraceRecord,
        decision: RouteDecision,
        attempts: Attempts,
        started: float,
    ) -> AsyncIterator[bytes]:
        answer = AssembledMessage()
        done = False
        try:
            if first is not None:
                answer.add(first)
                yield sse(first)
            async for chunk in stream:
                answer.add(chunk)
                yield sse(chunk)
            assert stream.result is not None
            trace.tool_calls = answer.tool_calls
            finish = answer.finish_reason or "stop"
            await completed(trace)
            self.finish(trace, decision, stream.result, attempts, answer.text, finish, started)
            done = True
            yield DONE
        except SlmAgentError as exc:
            trace.response = answer.text
            self.recorder.failed(trace, exc, started=started, attempts=attempts)
            done = True
            # No [DONE] after it: a client that ignores error events must not see a whole answer.
            yield error_event(exc)
        finally:
            if not done:  # the client went away: stop the remote, keep what was said
                await stream.aclose()
                trace.response, trace.status = answer.text, 499
                self.recorder.failed(trace, started=started)

    async def task(
        self, task: Task, req: TaskRequest, job: Job, decision: RouteDecision, attempts: Attempts
    ) -> Outcome | None:
        """A local task asked of the remote, its answer held to the task's contract."""
        value = req.input if isinstance(req.input, str) else json.dumps(req.input, ensure_ascii=False)
        body = remote_tasks.task_body(
            task, value, job.tools, max_tokens=req.max_tokens, temperature=req.temperature
        )
        trace = job.trace
        try:
            result = await self.remote.achat(body, escalation=True)
        except FALLBACK as exc:
            attempts.append({"route": "remote", "reason": decision.reason, "error": exc.message})
            return None
        except SlmAgentError as exc:
            self.recorder.failed(trace, exc, started=job.started, attempts=attempts)
            raise
        finish = result.finish_reason or "stop"
        try:
            output, text, calls = remote_tasks.parse_remote_output(task, job.tools, result.message, finish)
        except SlmAgentError as exc:
            trace.response = result.message.get("content")
            tried = [*attempts, remote_attempt(result, decision, error=exc.message)]
            self.recorder.failed(trace, exc, started=job.started, attempts=tried)
            raise
        trace.output = output
        trace.tool_calls = [c.model_dump() for c in calls] if calls else None
        self.finish(trace, decision, result, attempts, text, finish, job.started)
        response = TaskResponse(
            id=trace.id,
            task=task.name,
            output=output,
            text=text,
            finish_reason=finish_reason(finish),
            route="remote",
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
            latency_ms=trace.latency_ms or 0.0,
        )
        return Outcome(trace, body=response.model_dump())

    async def call(
        self, body: dict[str, Any], endpoint: str, ctx: CallContext, reason: str
    ) -> tuple[RemoteResult, TraceRecord]:
        """One traced call made by the daemon itself (agent runs: plan, steps, final answer)."""
        started = time.perf_counter()
        trace = new_trace(endpoint, ctx, self.recorder.base_model, request=body.get("messages"))
        decision = RouteDecision(route="remote", reason=reason, detail=endpoint)  # type: ignore[arg-type]
        self.announce(decision, trace)
        try:
            result = await self.remote.achat(body, escalation=True)
        except SlmAgentError as exc:
            self.recorder.failed(trace, exc, started=started, attempts=[])
            raise
        self.finish(trace, decision, result, [], result.message.get("content"), result.finish_reason, started)
        return result, trace

    async def message(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The agent's request asked of the remote once more, untraced: a live answer's spot check.
        Budgets and redaction apply as to any remote call."""
        result = await self.remote.achat({**raw, "stream": False}, escalation=False)
        return result.message

    def finish(
        self,
        trace: TraceRecord,
        decision: RouteDecision,
        result: RemoteResult,
        attempts: Attempts,
        text: str | None,
        finish: str | None,
        started: float,
    ) -> None:
        trace.route, trace.route_reason = "remote", decision.reason
        trace.response, trace.finish_reason = text, finish
        trace.remote_model = result.model
        trace.remote_latency_ms = round(result.latency_s * 1000, 3)
        trace.prompt_tokens, trace.completion_tokens = result.prompt_tokens, result.completion_tokens
        trace.cost_usd = result.cost_usd
        trace.redactions = result.redactions or None  # kind -> count; values never leave the client
        trace.attempts = [*attempts, remote_attempt(result, decision)]
        self.recorder.remote(trace, started)
