"""Route -> local engine or remote LLM: the orchestration between ``JobBuilder`` (local jobs),
``RuleRouter`` (decisions), ``LocalRunner`` and ``RemoteAnswers`` (who answers), without HTTP.

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
Every attempt's trace is written once, by the ``TraceRecorder``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from slm_agent.contracts.api import ChatCompletionRequest, CompletionRequest, TaskRequest
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import Task
from slm_agent.errors import NotFoundError, SlmAgentError, UnavailableError
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.matching.matcher import Match, TaskMatcher
from slm_agent.runtime.remote.client import RemoteClient
from slm_agent.runtime.remote.settings import RemoteResult
from slm_agent.runtime.routing.matched import MatchedCalls
from slm_agent.runtime.routing.outcome import Outcome
from slm_agent.runtime.routing.remote_answers import RemoteAnswers
from slm_agent.runtime.routing.review import review
from slm_agent.runtime.routing.router import RequestFeatures, RouteDecision, RuleRouter, is_planning_request
from slm_agent.runtime.serving import responses
from slm_agent.runtime.serving.context import CallContext, Job, new_trace
from slm_agent.runtime.serving.jobs import JobBuilder
from slm_agent.runtime.serving.local import LocalRunner
from slm_agent.runtime.serving.recorder import LocalAnswer, TraceRecorder
from slm_agent.runtime.shadow.promoter import Promoter
from slm_agent.runtime.shadow.worker import ShadowWorker

log = logging.getLogger(__name__)

# A content match left to run while the call went on is waited for this long at most.
SETTLE_TIMEOUT_S = 5.0

Publish = Callable[[str, dict[str, Any]], Any]
AskRemote = Callable[[RouteDecision], Awaitable[Outcome | None]]


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
        jobs: JobBuilder,
        local: LocalRunner,
        recorder: TraceRecorder,
        remote: RemoteClient | None,
        publish: Publish,
        router: RuleRouter | None = None,
        *,
        matcher: TaskMatcher | None = None,
        promoter: Promoter | None = None,
        shadow: ShadowWorker | None = None,
    ) -> None:
        self.jobs = jobs
        self.matcher = matcher
        self.matched = (
            MatchedCalls(jobs, local, recorder, promoter, shadow, self._announce)
            if promoter and shadow
            else None
        )
        self.local = local
        self.recorder = recorder
        self.remote = remote
        self.answers = RemoteAnswers(remote, recorder, self._announce) if remote is not None else None
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

    def _offline(self, trace: TraceRecord, attempts: list[dict[str, Any]]) -> RouteDecision:
        error = attempts[-1].get("error") if attempts else None
        decision = RouteDecision(route="local", reason="offline", detail=f"remote failed: {error}")
        self._announce(decision, trace)
        trace.attempts = attempts or None
        return decision

    def _chat_features(
        self, body: ChatCompletionRequest, ctx: CallContext
    ) -> tuple[RequestFeatures, Job | None, Task | None]:
        try:
            job: Job | None = self.jobs.chat_job(body, ctx)
        except NotFoundError as exc:
            if exc.param != "model" or ctx.task_header or not self.remote_serves(body.model):
                raise
            job = None
        task = self.jobs.tasks.get(job.trace.task) if job and job.trace.task else None
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

    # -- chat ----------------------------------------------------------------------------------------
    def route_chat(
        self, body: ChatCompletionRequest, ctx: CallContext, endpoint: str = "chat.completions"
    ) -> Routed:
        """Build the local job (when something local serves the model) and decide; raises the
        request's own errors (unknown model nobody serves, bad tools...) before any trace exists.
        ``endpoint`` names the API the client called in the trace (``responses`` for a Responses
        request carried out as this chat request)."""
        started = time.perf_counter()
        raw = [m.model_dump(exclude_none=True) for m in body.messages]
        with self._rejecting(endpoint, ctx, body.model, raw):
            features, job, task = self._chat_features(body, ctx)
        trace = job.trace if job else _proxy_trace(body, ctx, self.jobs.base.name)
        trace.endpoint = endpoint
        self._match(body, raw, job, trace, ctx)
        decision = self.decide(features, trace)
        return Routed(features, decision, trace, job, task, ctx, started, chat=body)

    def _match(
        self,
        body: ChatCompletionRequest,
        messages: list[dict[str, Any]],
        job: Job | None,
        trace: TraceRecord,
        ctx: CallContext,
    ) -> None:
        """Which task this call is, recorded in its trace: explicit > template signature > embedding.

        Embedding costs milliseconds, so it is awaited here only when its answer can change the
        route (a proxied call, and some task matched by content is live); otherwise it runs while
        the call goes on and the trace writer picks it up."""
        if self.matcher is None:
            return
        explicit = job.target.task.name if job and job.target.task else None
        response_format = body.response_format.model_dump(exclude_none=True) if body.response_format else None
        found = self.matcher.by_template(messages, body.tools, response_format, explicit=explicit)
        if isinstance(found, Match):
            _record_match(trace, found, job)
        elif job is None and ctx.route is None and self._live_by_content():
            _record_match(trace, self.matcher.by_content(found), job)
        else:
            trace.signature = found.signature
            pending = self.matcher.later(found)
            trace.complete_later(lambda: _record_match(trace, _settled(pending, trace), job))

    def _live_by_content(self) -> bool:
        """Whether some task a call can match by content answers locally now."""
        if self.matcher is None or self.matched is None:
            return False
        states = self.matched.promoter
        return any(states.state(name).state == "live" for name in self.matcher.content_tasks())

    async def chat(self, routed: Routed) -> Outcome:
        """Carry out a chat decision; every error from here on is traced before it is raised."""
        body, ctx, features, task, trace = routed.chat, routed.ctx, routed.features, routed.task, routed.trace
        assert body is not None
        job, decision, started = routed.job, routed.decision, routed.started
        raw = body.model_dump(exclude_unset=True)  # what the agent sent, passed on unchanged
        attempts: list[dict[str, Any]] = []

        def ask_remote(trace: TraceRecord, escalation: bool, started: float) -> AskRemote:
            async def ask(decision: RouteDecision) -> Outcome | None:
                assert self.answers is not None
                return await self.answers.chat(
                    raw, trace, decision, attempts, escalation=escalation, started=started
                )

            return ask

        if decision.route == "remote":
            proxy = ask_remote(trace, job is not None, started)
            if self.matched is not None and job is None and ctx.route is None:
                assert self.answers is not None  # a remote route means a remote is configured
                recheck = partial(self.answers.message, raw)
                outcome = await self.matched.answer(body, trace, ctx, decision, proxy, recheck)
            else:
                outcome = await proxy(decision)
            if outcome is not None:
                return outcome
            decision = self._offline(trace, attempts)
        if job is None:  # a proxied id with no remote to take it: the base model answers, and says so
            try:
                fallback = body.model_copy(update={"model": self.jobs.base.name})
                built: Job = await asyncio.to_thread(self.jobs.chat_job, fallback, ctx)
            except SlmAgentError as exc:
                self.recorder.failed(trace, exc, started=started, attempts=attempts)
                raise
            built.trace, job = trace, built
        job.trace.attempts = attempts or None
        reviewable = task is not None and features.task_routing == "auto" and features.route_header is None
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if body.stream and not (reviewable and decision.route == "local" and decision.reason != "offline"):
            return Outcome(job.trace, stream=self.local.stream(job, chat=True, include_usage=include_usage))
        result = await self.local.run(job, ctx)
        if result.finish_reason == "cancelled":
            return self._cancelled(job, result)
        if reviewable and task is not None and decision.reason != "offline":
            asked = ask_remote(job.trace, True, job.started)
            outcome = await self._second_opinion(features, task, job, result, attempts, asked)
            if outcome is not None:
                return outcome
        job.trace.attempts = attempts or None
        answer = self._shaped(job, result, responses.chat_answer)
        response = responses.chat_completion(job, result, answer).model_dump(exclude_none=True)
        self.recorder.local(job, result, answer)
        if body.stream:
            return Outcome(job.trace, stream=responses.replay_as_stream(response))
        return Outcome(job.trace, body=response)

    # -- tasks ---------------------------------------------------------------------------------------
    def route_task(self, name: str, req: TaskRequest, ctx: CallContext) -> Routed:
        started = time.perf_counter()
        with self._rejecting("tasks", ctx, f"task:{name}", req.input):
            job = self.jobs.task_job(name, req, ctx)
        task = self.jobs.tasks.get(name)
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

    async def task(self, routed: Routed) -> Outcome:
        job, task, req, features = routed.job, routed.task, routed.task_request, routed.features
        assert job is not None and task is not None and req is not None
        decision, ctx = routed.decision, routed.ctx
        attempts: list[dict[str, Any]] = []

        async def ask_remote(decision: RouteDecision) -> Outcome | None:
            assert self.answers is not None and job is not None and task is not None and req is not None
            return await self.answers.task(task, req, job, decision, attempts)

        if decision.route == "remote":
            outcome = await ask_remote(decision)
            if outcome is not None:
                return outcome
            decision = self._offline(job.trace, attempts)
        result = await self.local.run(job, ctx)
        if result.finish_reason == "cancelled":
            return self._cancelled(job, result)
        if task.routing == "auto" and ctx.route is None and decision.reason != "offline":
            outcome = await self._second_opinion(features, task, job, result, attempts, ask_remote)
            if outcome is not None:
                return outcome
        job.trace.attempts = attempts or None
        answer = self._shaped(job, result, responses.task_answer)
        response = responses.task_response(job, result, answer)
        self.recorder.local(job, result, answer)
        return Outcome(job.trace, body=response.model_dump())

    # -- text completions: local only ------------------------------------------------------------------
    def route_completion(self, body: CompletionRequest, ctx: CallContext) -> Job:
        """No remote serves text completions: still a recorded decision."""
        with self._rejecting("completions", ctx, body.model, body.prompt):
            job = self.jobs.completion_job(body, ctx)
        features = RequestFeatures(
            model=job.target.model_id, served_locally=True, route_header=ctx.route, remote_available=False
        )
        self.decide(features, job.trace)
        return job

    async def completion(self, job: Job, body: CompletionRequest, ctx: CallContext) -> Outcome:
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return Outcome(job.trace, stream=self.local.stream(job, chat=False, include_usage=include_usage))
        result = await self.local.run(job, ctx)
        if result.finish_reason == "cancelled":
            return self._cancelled(job, result)
        response = responses.completion(job, result)
        self.recorder.local(job, result)
        return Outcome(job.trace, body=response.model_dump(exclude_none=True))

    async def remote_call(
        self, body: dict[str, Any], endpoint: str, ctx: CallContext, reason: str = "planning"
    ) -> tuple[RemoteResult, TraceRecord]:
        """One traced remote chat call made by the daemon itself (agent runs: plan, steps, final)."""
        if self.answers is None:
            raise UnavailableError("no remote provider is configured: add one under [remote] in the config")
        return await self.answers.call(body, endpoint, ctx, reason)

    # -- shared steps --------------------------------------------------------------------------------
    async def _second_opinion(
        self,
        features: RequestFeatures,
        task: Task,
        job: Job,
        result: GenerationResult,
        attempts: list[dict[str, Any]],
        ask_remote: AskRemote,
    ) -> Outcome | None:
        """Review a local answer; if it must escalate, the remote's answer (or None to keep ours)."""
        decision, attempt = review(
            features,
            task,
            job,
            result,
            default_min_logprob=self.router.min_mean_logprob,
            remote_available=self.available(None, escalation=True),
        )
        if decision is None:
            return None
        self._announce(decision, job.trace)
        attempts.append(attempt)
        if decision.route != "remote":
            return None
        outcome = await ask_remote(decision)
        if outcome is None:
            self._offline(job.trace, attempts)
        return outcome

    def _shaped(
        self, job: Job, result: GenerationResult, shape: Callable[[Job, GenerationResult], LocalAnswer]
    ) -> LocalAnswer:
        """The local answer in its typed form; one that breaks its contract is traced, then raised."""
        try:
            return shape(job, result)
        except SlmAgentError as exc:
            self.recorder.local(job, result, error=exc)
            raise

    @contextmanager
    def _rejecting(self, endpoint: str, ctx: CallContext, model: str | None, request: Any) -> Iterator[None]:
        """A request that fails before it can run (unknown model, bad tools, prompt too long) is
        traced with what it asked for."""
        try:
            yield
        except SlmAgentError as exc:
            self.recorder.rejected(endpoint, ctx, model, request, exc)
            raise

    def _cancelled(self, job: Job, result: GenerationResult) -> Outcome:
        """The client went away while its job ran: trace what was said as 499."""
        self.recorder.local(job, result, status=499)
        return Outcome(job.trace, status=499)


def _proxy_trace(body: ChatCompletionRequest, ctx: CallContext, base_model: str) -> TraceRecord:
    return new_trace(
        "chat.completions",
        ctx,
        base_model,
        model=body.model,
        request=[m.model_dump(exclude_none=True) for m in body.messages],
        tools=body.tools,
        params=body.model_dump(exclude={"messages", "tools", "model"}, exclude_none=True),
        stream=body.stream,
    )


def _record_match(trace: TraceRecord, match: Match, job: Job | None) -> None:
    trace.signature, trace.match_method, trace.match_score = match.signature, match.method, match.score
    if job is None and match.task is not None:  # a local job's task is the one it was asked for
        trace.task = match.task


def _settled(pending: Future[Match], trace: TraceRecord) -> Match:
    """A content match run while the call went on; unmatched when it failed or took too long."""
    try:
        return pending.result(timeout=SETTLE_TIMEOUT_S)
    except Exception:  # an encoder failure or a stuck matcher thread must not lose the trace
        log.warning("content match of %s not settled; recorded unmatched", trace.id, exc_info=True)
        return Match(signature=trace.signature or "")
