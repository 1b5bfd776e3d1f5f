"""An agent's call that matched a chat-shaped task with a published adapter: verify the adapter
against the remote (shadow), and once it has earned it, answer locally (live).

- ``shadow`` / ``demoted``: the remote answers the agent as before; the same request goes to the
  shadow worker, which runs it on the adapter only when the engine is idle and scores the pair.
- ``live``: the adapter answers; the answer stands only if it keeps the task's contract and the
  per-request gate predicts agreement, otherwise the call goes to the remote as before (reason
  ``gate``; ``busy`` when the engine's queue is full). A sample of the local answers
  (``promotion.shadow_sample``) is also asked of the remote in the background and scored, so
  drift demotes the task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from slm_agent.contracts.api import ChatCompletionRequest
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.signature import request_content
from slm_agent.contracts.tasks import Task
from slm_agent.errors import QueueFullError, SlmAgentError, UnavailableError
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.routing.outcome import Outcome
from slm_agent.runtime.routing.review import local_failure
from slm_agent.runtime.routing.router import RouteDecision, RouteReason
from slm_agent.runtime.serving import responses
from slm_agent.runtime.serving.context import CallContext, Job
from slm_agent.runtime.serving.jobs import JobBuilder
from slm_agent.runtime.serving.local import LocalRunner
from slm_agent.runtime.serving.recorder import TraceRecorder
from slm_agent.runtime.shadow.gate import gate_features
from slm_agent.runtime.shadow.promoter import Promoter
from slm_agent.runtime.shadow.records import TaskState
from slm_agent.runtime.shadow.worker import ShadowJob, ShadowWorker

log = logging.getLogger(__name__)

Announce = Callable[[RouteDecision, TraceRecord], None]
# Proxy the call as decided (None: the remote could not answer, the caller falls back).
Proxy = Callable[[RouteDecision], Awaitable[Outcome | None]]
# The agent's request asked of the remote once more (non-streaming): its assistant message.
AskRemote = Callable[[], Awaitable[dict[str, Any]]]


# Engine refusals a live task hands to the remote (which then writes the call's one trace).
HANDED_ON = (QueueFullError, UnavailableError)
# A local answer made but not given: the job and what the engine said.
Local = tuple[Job, GenerationResult]


@dataclass
class ToRemote:
    """A live task's call the remote answers after all, with the local answer held back, if any."""

    decision: RouteDecision
    held: Local | None = None


class MatchedCalls:
    def __init__(
        self,
        jobs: JobBuilder,
        local: LocalRunner,
        recorder: TraceRecorder,
        promoter: Promoter,
        shadow: ShadowWorker,
        announce: Announce,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.jobs = jobs
        self.local = local
        self.recorder = recorder
        self.promoter = promoter
        self.shadow = shadow
        self.announce = announce
        self.sample = sample
        self._background: set[asyncio.Task[None]] = set()

    def candidate(self, task_name: str | None) -> tuple[Task, TaskState] | None:
        """The chat task a proxied call matched, with its state, when it has a loaded adapter."""
        if task_name is None or not self.jobs.tasks.has(task_name):
            return None
        task = self.jobs.tasks.get(task_name)
        if task.form != "chat" or task.adapter is None or task.adapter not in self.jobs.engine.adapters:
            return None
        return task, self.promoter.ensure_adapter(task.name, task.adapter)

    async def answer(
        self,
        body: ChatCompletionRequest,
        trace: TraceRecord,
        ctx: CallContext,
        decision: RouteDecision,
        proxy: Proxy,
        recheck: AskRemote,
    ) -> Outcome | None:
        """A proxied call: answered by a live adapter, or by the remote (then shadowed when its
        task's adapter is still being verified)."""
        candidate = self.candidate(trace.task)
        held: Local | None = None
        if candidate is not None and candidate[1].state == "live":
            answered = await self.live(body, *candidate, trace, ctx, recheck)
            if isinstance(answered, Outcome):
                return answered
            decision, held = answered.decision, answered.held
        outcome = await proxy(decision)
        if outcome is None:
            return outcome
        if outcome.stream is not None:
            shadowed = self._shadow_after_stream(outcome.stream, body, trace, ctx, candidate, held)
            return Outcome(trace, stream=shadowed, status=outcome.status)
        if outcome.body is not None:
            remote = (outcome.body.get("choices") or [{}])[0].get("message") or {}
            self._shadow_remote(body, trace, ctx, candidate, remote, held)
        return outcome

    async def _shadow_after_stream(
        self,
        stream: AsyncIterator[bytes],
        body: ChatCompletionRequest,
        trace: TraceRecord,
        ctx: CallContext,
        candidate: tuple[Task, TaskState] | None,
        held: Local | None,
    ) -> AsyncIterator[bytes]:
        """Pass a streamed remote answer on; once it has ended well (and its trace holds the
        assembled message), make its shadow pair as for a non-streamed one."""
        try:
            async for part in stream:
                yield part
        finally:
            # A client that goes away closes this generator only: the remote stream's own
            # cleanup (stop the remote, trace what was said as 499) must still run now.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if trace.status == 200 and trace.route == "remote":
            remote: dict[str, Any] = {"role": "assistant", "content": trace.response or None}
            if trace.tool_calls:
                remote["tool_calls"] = trace.tool_calls
            self._shadow_remote(body, trace, ctx, candidate, remote, held)

    def _shadow_remote(
        self,
        body: ChatCompletionRequest,
        trace: TraceRecord,
        ctx: CallContext,
        candidate: tuple[Task, TaskState] | None,
        remote: dict[str, Any],
        held: Local | None,
    ) -> None:
        """Pair a remote answer with the adapter's: the one a live task's gate held back (scored
        now: the gate keeps learning where it said no), or one the shadow worker will make when
        the task is being verified."""
        if candidate is not None and held is not None:
            pair = self._shadow_job(body, candidate[0], held[0], remote, trace.remote_latency_ms)
            # SQLite writes and maybe a gate refit: off the event loop.
            self._spawn(asyncio.to_thread(self.shadow.compare, pair, held[1]))
            return
        # A content match that could not change the route settles when the trace is written:
        # only now is this call's task known.
        candidate = candidate or self.candidate(trace.task)
        if candidate is not None and candidate[1].state in ("shadow", "demoted"):
            # Building the adapter's prompt tokenizes it: off the event loop, and the agent does
            # not wait for it.
            self._spawn(asyncio.to_thread(self.shadow_remote_answer, body, candidate[0], trace, ctx, remote))

    async def live(
        self,
        body: ChatCompletionRequest,
        task: Task,
        state: TaskState,
        trace: TraceRecord,
        ctx: CallContext,
        ask_remote: AskRemote,
    ) -> Outcome | ToRemote:
        """The adapter's answer, or the decision to let the remote answer this one (reason ``gate``)
        when the gate or the task's contract says so; the caller proxies it."""
        try:
            job = await asyncio.to_thread(self.jobs.chat_task_job, body, task, trace, ctx)
        except SlmAgentError as exc:  # e.g. the prompt does not fit the context: the remote answers
            return self._to_remote("gate", f"not answerable locally: {exc.message}", trace)
        try:
            result = await self.local.run(job, ctx, handed_on=HANDED_ON)
        except HANDED_ON as exc:
            # The agent asked the remote's model: a saturated engine (or an adapter being
            # replaced) hands the call back to the remote instead of answering 429/503.
            return self._to_remote("busy", f"the local engine cannot take it now: {exc.message}", trace)
        if result.finish_reason == "cancelled":
            self.recorder.local(job, result, status=499)
            return Outcome(trace, status=499)
        failure = local_failure(task, job, result)
        features = self._features(body, job, result, trace)
        if failure is not None or (state.gate is not None and not state.gate.allows(features)):
            why = failure or f"the gate predicts disagreement (threshold {state.gate.threshold:.2f})"  # type: ignore[union-attr]
            return self._to_remote("gate", why, trace, held=(job, result))
        answer = responses.chat_answer(job, result)
        response = responses.chat_completion(job, result, answer).model_dump(exclude_none=True)
        detail = f"task {task.name!r} is live on adapter {task.adapter!r}"
        self.announce(RouteDecision(route="local", reason="promoted", detail=detail), trace)
        trace.adapter = task.adapter
        self.recorder.local(job, result, answer)
        if self.sample() < task.promotion.shadow_sample:
            self._spawn(self._sampled(body, task, job, result, ask_remote))
        if body.stream:
            return Outcome(trace, stream=responses.replay_as_stream(response))
        return Outcome(trace, body=response)

    def _to_remote(
        self, reason: RouteReason, detail: str, trace: TraceRecord, held: Local | None = None
    ) -> ToRemote:
        decision = RouteDecision(route="remote", reason=reason, detail=detail)
        self.announce(decision, trace)
        return ToRemote(decision, held)

    def shadow_remote_answer(
        self,
        body: ChatCompletionRequest,
        task: Task,
        trace: TraceRecord,
        ctx: CallContext,
        remote: dict[str, Any],
    ) -> None:
        """Queue the adapter's side of a pair whose remote side the agent just got."""
        try:
            job = self.jobs.chat_task_job(body, task, trace.model_copy(), ctx)
        except SlmAgentError as exc:  # e.g. the prompt does not fit: the pair cannot be made
            log.info("no shadow run for %s: %s", trace.id, exc.message)
            return
        self.shadow.submit(self._shadow_job(body, task, job, remote, trace.remote_latency_ms))

    def _shadow_job(
        self,
        body: ChatCompletionRequest,
        task: Task,
        job: Job,
        remote: dict[str, Any],
        remote_ms: float | None,
    ) -> ShadowJob:
        """One pair to score: the adapter's side (``job``) and the remote's answer."""
        return ShadowJob(
            job=job,
            task=task,
            remote=remote,
            adapter=task.adapter,
            remote_ms=remote_ms,
            match_score=job.trace.match_score,
            input_chars=len(request_content([m.model_dump(exclude_none=True) for m in body.messages])),
            schema=task.output_schema,
        )

    def _features(
        self, body: ChatCompletionRequest, job: Job, result: GenerationResult, trace: TraceRecord
    ) -> list[float]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return gate_features(
            result.token_logprobs or [],
            trace.match_score,
            len(request_content(messages)),
            len(job.tools or []),
            result.completion_tokens,
        )

    async def _sampled(
        self,
        body: ChatCompletionRequest,
        task: Task,
        job: Job,
        result: GenerationResult,
        ask_remote: AskRemote,
    ) -> None:
        """A live answer checked against the remote after the agent got it: drift shows here."""
        started = time.perf_counter()
        try:
            remote = await ask_remote()
        except SlmAgentError as exc:  # a remote failure changes nothing the agent saw
            log.info("live sample of %s not checked: %s", job.trace.id, exc.message)
            return
        pair = self._shadow_job(body, task, job, remote, (time.perf_counter() - started) * 1000)
        # The shadow worker's own scoring; SQLite writes and maybe a gate fit: off the event loop.
        await asyncio.to_thread(self.shadow.compare, pair, result)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)
