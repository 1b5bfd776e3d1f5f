"""Route -> local engine or remote LLM: the orchestration between ``Service`` (local jobs),
``RuleRouter`` (decisions) and ``RemoteClient`` (escalations), without HTTP.

One request, at most two attempts:

1. ``decide`` on the request's features: policy (header or task routing), proxy (a model id only
   a remote serves), planning, or "try locally"; any remote route becomes ``offline`` when no
   remote would take the call now (none configured, breaker open, budget spent with policy local).
2. A task in ``auto`` routing has its local answer reviewed: an answer that breaks the task's
   contract (``validation``) or whose mean token logprob is under the task's
   ``confidence_threshold`` (``confidence``) is asked again of the remote, and the client gets the
   remote answer; both attempts are kept in the trace.

A remote call that fails before anything reached the client falls back to the local answer
(reason ``offline``, the failure kept in ``attempts``); an exhausted budget under policy
``error`` is a 402, and a refusal to send personal data a 400. A remote stream that breaks
midway ends the client's stream with an SSE error event and is traced with the error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from slm_agent.errors import NotFoundError, RemoteError, SlmAgentError, UnavailableError
from slm_agent.runtime import api_errors, remote_tasks
from slm_agent.runtime.api_types import ChatCompletionRequest, TaskRequest, TaskResponse, Usage
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.remote import AsyncRemoteStream, RemoteClient, RemoteResult
from slm_agent.runtime.router import (
    RequestFeatures,
    RouteDecision,
    RuleRouter,
    confidence,
    is_planning_request,
    validate_local_answer,
)
from slm_agent.runtime.service import CallContext, Job, Service
from slm_agent.runtime.sse import DONE, sse
from slm_agent.runtime.tasks import Task
from slm_agent.runtime.traces import TraceRecord

log = logging.getLogger(__name__)

RunLocal = Callable[[Job], Awaitable[GenerationResult]]
Publish = Callable[[str, dict[str, Any]], Any]
# Failures that mean "the remote did not answer": the local answer is the fallback.
FALLBACK = (RemoteError, UnavailableError)


@dataclass
class Outcome:
    """What the HTTP layer sends: a JSON body, an SSE stream, or a local job to stream itself."""

    trace: TraceRecord
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    local_stream: Job | None = None
    status: int = 200


@dataclass
class Routed:
    """A request with its decision, before anything ran: what ``chat``/``task`` carry out."""

    features: RequestFeatures
    decision: RouteDecision
    trace: TraceRecord
    job: Job | None
    task: Task | None
    ctx: CallContext
    started: float
    chat: ChatCompletionRequest | None = None
    task_request: TaskRequest | None = None


class Escalation:
    def __init__(
        self,
        service: Service,
        remote: RemoteClient | None,
        publish: Publish,
        router: RuleRouter | None = None,
    ) -> None:
        self.service = service
        self.remote = remote
        self.publish = publish
        self.router = router or RuleRouter()

    # -- features and decisions --------------------------------------------------------------------
    def remote_serves(self, model: str) -> bool:
        """Whether a configured provider names ``model`` (or serves any id with "*")."""
        return self.remote is not None and any(p.serves(model) for p in self.remote.settings.providers)

    def available(self, model: str | None, *, escalation: bool) -> bool:
        return self.remote is not None and self.remote.is_available(model, escalation=escalation)

    def decide(self, features: RequestFeatures, trace: TraceRecord) -> RouteDecision:
        decision = self.router.decide(features)
        self._announce(decision, trace)
        return decision

    def _announce(self, decision: RouteDecision, trace: TraceRecord) -> None:
        trace.route, trace.route_reason = decision.route, decision.reason
        self.publish(
            "route",
            {
                "trace_id": trace.id,
                "model": trace.model,
                "task": trace.task,
                "route": decision.route,
                "reason": decision.reason,
                "detail": decision.detail,
                "score": decision.score,
            },
        )

    def _chat_features(
        self, body: ChatCompletionRequest, ctx: CallContext
    ) -> tuple[RequestFeatures, Job | None, Task | None]:
        try:
            job: Job | None = self.service.chat_job(body, ctx)
        except NotFoundError as exc:
            if exc.param != "model" or ctx.task_header or not self.remote_serves(body.model):
                raise
            job = None
        task = self.service.tasks.get(job.trace.task) if job and job.trace.task else None
        explicit = job is not None and job.target.task is not None
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        planner = is_planning_request(
            messages,
            task.name if explicit and task else None,
            task_is_planner=bool(task and task.planner),
            tools=body.tools,
        )
        # The tool_call task a chat with tools falls into is a default, not the agent's choice:
        # its routing must not keep an open-ended planning turn local.
        routing = task.routing if task and (explicit or not planner) else None
        features = RequestFeatures(
            model=body.model,
            served_locally=job is not None,
            task=task.name if task else None,
            task_routing=routing,
            route_header=ctx.route,
            is_planner=planner,
            has_tools=bool(body.tools),
            n_tools=len(body.tools or []),
            matching_local_task=task is not None,
            remote_available=self.available(body.model, escalation=job is not None),
        )
        return features, job, task

    def local_only(self, job: Job, ctx: CallContext) -> RouteDecision:
        """Endpoints no remote serves (text completions): still a recorded decision."""
        features = RequestFeatures(
            model=job.target.model_id, served_locally=True, route_header=ctx.route, remote_available=False
        )
        return self.decide(features, job.trace)

    # -- chat ----------------------------------------------------------------------------------------
    def route_chat(self, body: ChatCompletionRequest, ctx: CallContext) -> Routed:
        """Build the local job (when something local serves the model) and decide; raises the
        request's own errors (unknown model nobody serves, bad tools...) before any trace exists."""
        started = time.perf_counter()
        features, job, task = self._chat_features(body, ctx)
        trace = job.trace if job else self._proxy_trace(body, ctx)
        decision = self.decide(features, trace)
        return Routed(features, decision, trace, job, task, ctx, started, chat=body)

    async def chat(self, routed: Routed, run_local: RunLocal) -> Outcome:
        """Carry out a chat decision; every error from here on is traced before it is raised."""
        body, ctx, features, task, trace = routed.chat, routed.ctx, routed.features, routed.task, routed.trace
        assert body is not None
        job, decision, started = routed.job, routed.decision, routed.started
        raw = body.model_dump(exclude_unset=True)  # what the agent sent, passed on unchanged
        attempts: list[dict[str, Any]] = []
        if decision.route == "remote":
            outcome = await self._remote_chat(raw, trace, decision, attempts, job is not None, started)
            if outcome is not None:
                return outcome
            decision = self._offline(trace, attempts)
        if job is None:  # a proxied id with no remote to take it: the base model answers, and says so
            try:
                job = self.service.chat_job(body.model_copy(update={"model": self.service.base.name}), ctx)
            except SlmAgentError as exc:
                self._fail(trace, exc, attempts, started)
                raise
            job.trace = trace
        job.trace.attempts = attempts or None
        reviewable = task is not None and features.task_routing == "auto" and features.route_header is None
        if body.stream and not (reviewable and decision.route == "local" and decision.reason != "offline"):
            return Outcome(job.trace, local_stream=job)
        result = await self._run_local(job, run_local)
        if result.finish_reason == "cancelled":
            self.service.record(job, result, response_text=result.text, status=499)
            return Outcome(job.trace, status=499)
        if reviewable and task is not None and decision.reason != "offline":
            review, attempt = self.review(features, task, job, result)
            if review is not None:
                self._announce(review, job.trace)
                attempts.append(attempt)
            if review is not None and review.route == "remote":
                outcome = await self._remote_chat(raw, job.trace, review, attempts, True, job.started)
                if outcome is not None:
                    return outcome
                self._offline(job.trace, attempts)
        job.trace.attempts = attempts or None
        try:
            response = self.service.chat_response(job, result).model_dump(exclude_none=True)
        except SlmAgentError as exc:
            self.service.record(job, result, response_text=result.text, error=exc)
            raise
        if body.stream:
            return Outcome(job.trace, stream=_replay_as_stream(response))
        return Outcome(job.trace, body=response)

    async def _remote_chat(
        self,
        raw: dict[str, Any],
        trace: TraceRecord,
        decision: RouteDecision,
        attempts: list[dict[str, Any]],
        escalation: bool,
        started: float,
    ) -> Outcome | None:
        """The remote's answer, or None when it could not answer (the caller falls back)."""
        assert self.remote is not None
        try:
            if raw.get("stream"):
                stream = self.remote.astream_chat(raw, escalation=escalation)
                first = await anext(stream, None)  # failures before any chunk can still fall back
                return Outcome(
                    trace, stream=self._pass_through(stream, first, trace, decision, attempts, started)
                )
            result = await self.remote.achat(raw, escalation=escalation)
        except FALLBACK as exc:
            attempts.append({"route": "remote", "reason": decision.reason, "error": _message(exc)})
            return None
        except SlmAgentError as exc:  # budget spent (402), personal data refused (400)
            self._fail(trace, exc, attempts, started)
            raise
        message = ((result.response.get("choices") or [{}])[0]).get("message") or {}
        finish = ((result.response.get("choices") or [{}])[0]).get("finish_reason")
        trace.tool_calls = message.get("tool_calls")
        self._finish_remote(trace, decision, result, attempts, message.get("content"), finish, started)
        return Outcome(trace, body=result.response)

    async def _pass_through(
        self,
        stream: AsyncRemoteStream,
        first: dict[str, Any] | None,
        trace: TraceRecord,
        decision: RouteDecision,
        attempts: list[dict[str, Any]],
        started: float,
    ) -> AsyncIterator[bytes]:
        parts: list[str] = []
        done = False
        try:
            if first is not None:
                _collect(first, parts)
                yield sse(first)
            async for chunk in stream:
                _collect(chunk, parts)
                yield sse(chunk)
            assert stream.result is not None
            self._finish_remote(trace, decision, stream.result, attempts, "".join(parts), "stop", started)
            done = True
            yield DONE
        except SlmAgentError as exc:
            trace.response = "".join(parts)
            self._fail(trace, exc, attempts, started)
            done = True
            # No [DONE] after it: a client that ignores error events must not see a whole answer.
            yield sse(api_errors.error_body(exc.message, exc.error_type, exc.param, exc.code))
        finally:
            if not done:  # the client went away: stop the remote, keep what was said
                await stream.aclose()
                trace.response, trace.status = "".join(parts), 499
                trace.latency_ms = _ms_since(started)
                self.service.record_error(trace)

    # -- tasks ---------------------------------------------------------------------------------------
    def route_task(self, name: str, req: TaskRequest, ctx: CallContext) -> Routed:
        started = time.perf_counter()
        job = self.service.task_job(name, req, ctx)
        task = self.service.tasks.get(name)
        features = RequestFeatures(
            model=job.target.model_id,
            served_locally=True,
            task=name,
            task_routing=task.routing,
            route_header=ctx.route,
            is_planner=task.planner,
            has_tools=bool(job.tools),
            n_tools=len(job.tools or []),
            matching_local_task=True,
            remote_available=self.available(None, escalation=True),
        )
        decision = self.decide(features, job.trace)
        return Routed(features, decision, job.trace, job, task, ctx, started, task_request=req)

    async def task(self, routed: Routed, run_local: RunLocal) -> Outcome:
        job, task, req, features = routed.job, routed.task, routed.task_request, routed.features
        assert job is not None and task is not None and req is not None
        decision, ctx = routed.decision, routed.ctx
        attempts: list[dict[str, Any]] = []
        if decision.route == "remote":
            outcome = await self._remote_task(task, req, job, decision, attempts)
            if outcome is not None:
                return outcome
            decision = self._offline(job.trace, attempts)
        result = await self._run_local(job, run_local)
        if result.finish_reason == "cancelled":
            self.service.record(job, result, response_text=result.text, status=499)
            return Outcome(job.trace, status=499)
        if task.routing == "auto" and ctx.route is None and decision.reason != "offline":
            review, attempt = self.review(features, task, job, result)
            if review is not None:
                self._announce(review, job.trace)
                attempts.append(attempt)
            if review is not None and review.route == "remote":
                outcome = await self._remote_task(task, req, job, review, attempts)
                if outcome is not None:
                    return outcome
                self._offline(job.trace, attempts)
        job.trace.attempts = attempts or None
        try:
            response = self.service.task_response(job, result)
        except SlmAgentError as exc:
            self.service.record(job, result, response_text=result.text, error=exc)
            raise
        return Outcome(job.trace, body=response.model_dump())

    async def _remote_task(
        self,
        task: Task,
        req: TaskRequest,
        job: Job,
        decision: RouteDecision,
        attempts: list[dict[str, Any]],
    ) -> Outcome | None:
        assert self.remote is not None
        value = req.input if isinstance(req.input, str) else json.dumps(req.input, ensure_ascii=False)
        body = remote_tasks.task_body(
            task, value, job.tools, max_tokens=req.max_tokens, temperature=req.temperature
        )
        trace = job.trace
        try:
            result = await self.remote.achat(body, escalation=True)
        except FALLBACK as exc:
            attempts.append({"route": "remote", "reason": decision.reason, "error": _message(exc)})
            return None
        except SlmAgentError as exc:
            self._fail(trace, exc, attempts, job.started)
            raise
        choice = (result.response.get("choices") or [{}])[0]
        message, finish = choice.get("message") or {}, choice.get("finish_reason") or "stop"
        try:
            output, text, calls = remote_tasks.parse_remote_output(task, job.tools, message, finish)
        except SlmAgentError as exc:
            trace.response = message.get("content")
            self._fail(
                trace, exc, [*attempts, _remote_attempt(result, decision, error=exc.message)], job.started
            )
            raise
        trace.output = output
        trace.tool_calls = [c.model_dump() for c in calls] if calls else None
        self._finish_remote(trace, decision, result, attempts, text, finish, job.started)
        response = TaskResponse(
            id=trace.id,
            task=task.name,
            output=output,
            text=text,
            finish_reason="length" if finish == "length" else "stop",
            route="remote",
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
            latency_ms=trace.latency_ms or 0.0,
        )
        return Outcome(trace, body=response.model_dump())

    async def remote_call(
        self, body: dict[str, Any], endpoint: str, ctx: CallContext, reason: str = "planning"
    ) -> tuple[RemoteResult, TraceRecord]:
        """One traced remote chat call made by the daemon itself (agent runs: plan, steps, final)."""
        if self.remote is None:
            raise UnavailableError("no remote provider is configured: add one under [remote] in the config")
        started = time.perf_counter()
        trace = TraceRecord(
            endpoint=endpoint,
            client=ctx.client,
            session_id=ctx.session_id,
            agent=ctx.agent,
            base_model=self.service.base.name,
            request=body.get("messages"),
        )
        decision = RouteDecision(route="remote", reason=reason, detail=endpoint)  # type: ignore[arg-type]
        self._announce(decision, trace)
        try:
            result = await self.remote.achat(body, escalation=True)
        except SlmAgentError as exc:
            self._fail(trace, exc, [], started)
            raise
        choice = (result.response.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content")
        self._finish_remote(trace, decision, result, [], content, choice.get("finish_reason"), started)
        return result, trace

    # -- reviewing a local answer ------------------------------------------------------------------
    def review(
        self, features: RequestFeatures, task: Task, job: Job, result: GenerationResult
    ) -> tuple[RouteDecision | None, dict[str, Any]]:
        """Whether to escalate a local answer, and the local attempt as the trace keeps it."""
        failure = local_failure(task, job, result)
        mean = low = None
        if task.confidence_threshold is not None and result.token_logprobs:
            mean, low = confidence(result.token_logprobs)
        router = RuleRouter(min_mean_logprob=task.confidence_threshold or self.router.min_mean_logprob)
        features = features.model_copy(update={"remote_available": self.available(None, escalation=True)})
        decision = router.review(features, failure=failure, mean_logprob=mean, min_logprob=None)
        if decision is None and not features.remote_available:
            online = features.model_copy(update={"remote_available": True})
            would = router.review(online, failure=failure, mean_logprob=mean, min_logprob=None)
            if would is not None:  # it would have escalated: say why it did not
                detail = f"{would.reason}: {would.detail}; no remote is available, the local answer stands"
                decision = RouteDecision(route="local", reason="offline", detail=detail)
        attempt = {
            "route": "local",
            "adapter": job.target.adapter,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "failure": failure,
            "mean_logprob": round(mean, 4) if mean is not None else None,
            "min_logprob": round(low, 4) if low is not None else None,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "latency_ms": round(result.total_ms, 3),
        }
        return decision, attempt

    async def _run_local(self, job: Job, run_local: RunLocal) -> GenerationResult:
        try:
            return await run_local(job)
        except SlmAgentError as exc:
            self.service.record(job, None, error=exc)
            raise

    # -- traces --------------------------------------------------------------------------------------
    def _proxy_trace(self, body: ChatCompletionRequest, ctx: CallContext) -> TraceRecord:
        return TraceRecord(
            endpoint="chat.completions",
            client=ctx.client,
            session_id=ctx.session_id,
            agent=ctx.agent,
            model=body.model,
            base_model=self.service.base.name,
            request=[m.model_dump(exclude_none=True) for m in body.messages],
            tools=body.tools,
            params=body.model_dump(exclude={"messages", "tools", "model"}, exclude_none=True),
            stream=body.stream,
        )

    def _offline(self, trace: TraceRecord, attempts: list[dict[str, Any]]) -> RouteDecision:
        error = attempts[-1].get("error") if attempts else None
        decision = RouteDecision(route="local", reason="offline", detail=f"remote failed: {error}")
        self._announce(decision, trace)
        trace.attempts = attempts or None
        return decision

    def _finish_remote(
        self,
        trace: TraceRecord,
        decision: RouteDecision,
        result: RemoteResult,
        attempts: list[dict[str, Any]],
        text: str | None,
        finish_reason: str | None,
        started: float,
    ) -> None:
        trace.route, trace.route_reason = "remote", decision.reason
        trace.response, trace.finish_reason = text, finish_reason
        trace.remote_model = result.model
        trace.remote_latency_ms = round(result.latency_s * 1000, 3)
        trace.prompt_tokens, trace.completion_tokens = result.prompt_tokens, result.completion_tokens
        trace.cost_usd = result.cost_usd
        trace.redactions = result.redactions or None  # kind -> count; values never leave the client
        trace.attempts = [*attempts, _remote_attempt(result, decision)]
        trace.latency_ms = _ms_since(started)
        self.service.traces.insert(trace)

    def _fail(
        self, trace: TraceRecord, exc: SlmAgentError, attempts: list[dict[str, Any]], started: float
    ) -> None:
        trace.status, trace.error = exc.status_code, exc.message
        trace.attempts = attempts or None
        trace.latency_ms = _ms_since(started)
        self.service.record_error(trace)


def local_failure(task: Task, job: Job, result: GenerationResult) -> str | None:
    """Why a local answer breaks the task's contract (validate_local_answer), or None."""
    text = result.text.strip()
    if job.output_kind == "tool_call" and result.finish_reason != "length":
        try:
            call = json.loads(text)
        except ValueError as exc:
            return f"tool call is not valid JSON: {exc}"
        return validate_local_answer(text, result.finish_reason, tools=job.tools, tool_call=call)
    schema = task.output_schema if job.output_kind == "json" else None
    failure = validate_local_answer(text, result.finish_reason, schema=schema)
    if failure is None and job.output_kind == "label" and text not in task.labels:
        return f"label {text!r} is not one of {task.labels}"
    return failure


def _remote_attempt(
    result: RemoteResult, decision: RouteDecision, error: str | None = None
) -> dict[str, Any]:
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


def _collect(chunk: dict[str, Any], parts: list[str]) -> None:
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            parts.append(content)


async def _replay_as_stream(response: dict[str, Any]) -> AsyncIterator[bytes]:
    """A finished (reviewed) answer sent as OpenAI stream chunks: it could not be streamed live
    because it might still have been replaced by the remote's."""
    choice = response["choices"][0]
    message = choice["message"]
    base = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield sse(chunk({"role": "assistant", "content": ""}))
    if message.get("tool_calls"):
        yield sse(chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}))
    elif message.get("content"):
        yield sse(chunk({"content": message["content"]}))
    yield sse(chunk({}, choice["finish_reason"]))
    yield DONE


def _message(exc: SlmAgentError) -> str:
    return exc.message


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
