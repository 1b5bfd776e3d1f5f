"""An agent's call that matched a chat-shaped task with a published adapter: verify the adapter
against the remote (shadow), and once it has earned it, answer locally (live).

- ``shadow`` / ``demoted``: the remote answers the agent as before; the same request goes to the
  shadow worker, which runs it on the adapter only when the engine is idle and scores the pair.
- ``live``: the adapter answers; the answer stands only if it keeps the task's contract and the
  per-request gate predicts agreement, otherwise the call goes to the remote as before (reason
  ``gate``). A sample of the local answers (``promotion.shadow_sample``) is also asked of the
  remote in the background and scored, so drift demotes the task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from slm_agent.contracts.api import ChatCompletionRequest
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.signature import request_content
from slm_agent.contracts.tasks import Task
from slm_agent.errors import SlmAgentError
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.routing.outcome import Outcome
from slm_agent.runtime.routing.review import local_failure
from slm_agent.runtime.routing.router import RouteDecision
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
        if candidate is not None and candidate[1].state == "live":
            answered = await self.live(body, *candidate, trace, ctx, recheck)
            if isinstance(answered, Outcome):
                return answered
            decision = answered
        outcome = await proxy(decision)
        if outcome is None or outcome.body is None:
            return outcome
        # A content match that could not change the route settles when the trace is written:
        # only now is this call's task known.
        candidate = candidate or self.candidate(trace.task)
        if candidate is not None and candidate[1].state in ("shadow", "demoted"):
            remote = (outcome.body.get("choices") or [{}])[0].get("message") or {}
            # Building the adapter's prompt tokenizes it: off the event loop, and the agent does
            # not wait for it.
            self._spawn(asyncio.to_thread(self.shadow_remote_answer, body, candidate[0], trace, ctx, remote))
        return outcome

    async def live(
        self,
        body: ChatCompletionRequest,
        task: Task,
        state: TaskState,
        trace: TraceRecord,
        ctx: CallContext,
        ask_remote: AskRemote,
    ) -> Outcome | RouteDecision:
        """The adapter's answer, or the decision to let the remote answer this one (reason ``gate``)
        when the gate or the task's contract says so; the caller proxies it."""
        try:
            job = await asyncio.to_thread(self.jobs.chat_task_job, body, task, trace, ctx)
        except SlmAgentError as exc:  # e.g. the prompt does not fit the context: the remote answers
            decision = RouteDecision(
                route="remote", reason="gate", detail=f"not answerable locally: {exc.message}"
            )
            self.announce(decision, trace)
            return decision
        result = await self.local.run(job, ctx)
        if result.finish_reason == "cancelled":
            self.recorder.local(job, result, status=499)
            return Outcome(trace, status=499)
        failure = local_failure(task, job, result)
        features = self._features(body, job, result, trace)
        if failure is not None or (state.gate is not None and not state.gate.allows(features)):
            why = failure or f"the gate predicts disagreement (threshold {state.gate.threshold:.2f})"  # type: ignore[union-attr]
            decision = RouteDecision(route="remote", reason="gate", detail=why)
            self.announce(decision, trace)
            return decision
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
