"""The shadow worker: answers already-served requests locally, in the background, and scores them.

The remote has answered the agent; the same request, prepared as a local job, waits here. A daemon
thread runs it on the engine only while the engine is idle (no live request queued or running, and
none finished in the last ``idle_gap_s``), as ``background`` requests, up to ``concurrency`` at a
time (the engine decodes them in one batch). A live submission cancels the running shadow jobs at
once (the engine checks between tokens and between prompt chunks) and they go back to the front
of the queue: live requests never wait on shadow work. Each finished answer is compared with the
remote's and handed to the promoter.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from slm_agent.contracts.tasks import Task
from slm_agent.errors import QueueFullError, SlmAgentError, UnavailableError
from slm_agent.runtime.engine import Engine, GenerationRequest, GenerationResult
from slm_agent.runtime.serving.context import Job
from slm_agent.runtime.serving.responses import assistant_message, chat_answer
from slm_agent.runtime.shadow.agreement import agreement
from slm_agent.runtime.shadow.gate import gate_features
from slm_agent.runtime.shadow.promoter import Promoter
from slm_agent.runtime.shadow.records import PairRecord

log = logging.getLogger(__name__)

EventFn = Callable[[str, dict[str, Any]], object]
# Kinds with a metric; a text task has none, so it stays remote and is never shadowed.
SCORED_KINDS = ("tool_call", "json", "label")


@dataclass
class ShadowJob:
    """One request to answer locally and compare: the prepared local job and the remote's answer."""

    job: Job
    task: Task
    remote: dict[str, Any]  # the remote's assistant message, as the agent received it
    adapter: str | None = None
    remote_ms: float | None = None
    match_score: float | None = None
    input_chars: int = 0
    schema: dict[str, Any] | None = None
    kind: str = ""  # defaults to the job's output kind
    attempts: int = 0

    def __post_init__(self) -> None:
        self.kind = self.kind or self.job.output_kind

    @property
    def trace_id(self) -> str:
        return self.job.trace.id


def local_message(job: ShadowJob, result: GenerationResult) -> dict[str, Any]:
    """The local answer as the assistant message the agent would have received."""
    return assistant_message(chat_answer(job.job, result))


@dataclass
class ShadowCounters:
    """What the worker did since it started (the /metrics counters)."""

    submitted: int = 0
    dropped: int = 0  # the queue was full: the oldest job gave way
    preempted: int = 0  # cancelled by a live request, queued again
    completed: int = 0
    failed: int = 0  # the local side gave no answer (counted as disagreeing)


def _no_event(kind: str, data: dict[str, Any]) -> None:
    return None


class ShadowWorker:
    def __init__(
        self,
        engine: Engine,
        promoter: Promoter,
        on_event: EventFn = _no_event,
        *,
        answer: Callable[[ShadowJob, GenerationResult], dict[str, Any]] = local_message,
        capacity: int = 64,
        idle_gap_s: float = 0.2,
        max_attempts: int = 8,
        concurrency: int = 4,
    ) -> None:
        self.engine = engine
        self.promoter = promoter
        self.counters = ShadowCounters()
        self._on_event = on_event
        self._answer = answer
        self._capacity = capacity
        self._idle_gap_s = idle_gap_s
        self._max_attempts = max_attempts
        self._jobs: deque[ShadowJob] = deque()
        self._wake = threading.Condition()
        self._concurrency = concurrency
        self._inflight: list[GenerationRequest] = []
        self._stopping = False
        self._generation = 0  # bumped by clear(): a job cancelled by it is not queued again
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = engine.on_submit(self._preempt)

    @property
    def pending(self) -> int:
        with self._wake:
            return len(self._jobs)

    @property
    def running(self) -> bool:
        """Shadow jobs are on the engine (queued there or generating)."""
        return bool(self._inflight)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shadow-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Cancel the running jobs, drop the queue, end the thread (before the engine shuts down)."""
        with self._wake:
            self._stopping = True
            self._jobs.clear()
            self._wake.notify_all()
        self._cancel_running()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def submit(self, job: ShadowJob) -> bool:
        """Queue a job; False when its kind has no metric. A full queue drops its oldest job."""
        if job.kind not in SCORED_KINDS:
            return False
        with self._wake:
            if self._stopping:
                return False
            if len(self._jobs) >= self._capacity:
                self._jobs.popleft()
                self.counters.dropped += 1
            self._jobs.append(job)
            self.counters.submitted += 1
            self._wake.notify()
        return True

    def clear(self) -> int:
        """Drop every job, the running ones included (their adapter was replaced, say); how many
        were pending."""
        with self._wake:
            dropped = len(self._jobs)
            self._jobs.clear()
            self._generation += 1
        self._cancel_running()
        return dropped

    def _preempt(self, req: GenerationRequest) -> None:
        """Engine submit listener (on the live request's thread): stop shadow work now."""
        self._cancel_running()

    def _cancel_running(self) -> None:
        for gen in list(self._inflight):
            gen.cancel.set()

    # -- the thread ------------------------------------------------------------------------------
    def _next(self) -> list[ShadowJob]:
        """Up to ``concurrency`` jobs once the engine has been idle for ``idle_gap_s``; none when
        stopping."""
        with self._wake:
            while not self._stopping and (not self._jobs or self.engine.serving(self._idle_gap_s)):
                self._wake.wait(timeout=None if not self._jobs else self._idle_gap_s / 4)
            if self._stopping:
                return []
            return [self._jobs.popleft() for _ in range(min(self._concurrency, len(self._jobs)))]

    def _pause(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping:
                self._wake.wait(seconds)

    def _requeue(self, jobs: list[ShadowJob], generation: int) -> None:
        """Put jobs back at the front, in their order (unless ``clear`` dropped their generation)."""
        with self._wake:
            if not self._stopping and generation == self._generation:
                self._jobs.extendleft(reversed(jobs))

    def _loop(self) -> None:
        while batch := self._next():
            try:
                self._shadow(batch)
            except Exception as exc:  # one bad job must not end shadow mode
                log.exception("shadow jobs %s failed", [job.trace_id for job in batch])
                self._emit(
                    "error", {"message": f"shadow comparison failed for task {batch[0].task.name}: {exc}"}
                )
            finally:
                self._inflight = []

    def _shadow(self, batch: list[ShadowJob]) -> None:
        """Run ``batch`` on the engine together (it decodes them in one batch) and score each."""
        generation = self._generation
        running: list[tuple[ShadowJob, Future[GenerationResult]]] = []
        back: list[ShadowJob] = []  # to run again: preempted, or the engine could not take them
        busy = False  # the engine refused one: a burst filled its queue, or it is not serving
        for job in batch:
            adapter = job.job.gen.adapter
            if adapter is not None and adapter not in self.engine.adapters:
                # Its adapter was replaced or removed since the job was queued: nothing to verify
                # (a job put back on every UnavailableError would hold the worker forever).
                self.counters.dropped += 1
            elif busy:
                back.append(job)
            elif not self._start(job, running):
                busy = True
                back.append(job)
        for job, future in running:
            try:
                result: GenerationResult | None = future.result()
                error = None
            except (QueueFullError, UnavailableError):
                busy = True
                back.append(job)
                continue
            except SlmAgentError as exc:
                result, error = None, exc.message
            if result is not None and result.finish_reason == "cancelled":
                self.counters.preempted += 1
                job.attempts += 1
                if job.attempts < self._max_attempts:
                    back.append(job)
                else:
                    self.counters.dropped += 1
                continue
            self.compare(job, result, error)
        self._requeue(back, generation)
        if busy:
            self._pause(1.0)

    def _start(
        self,
        job: ShadowJob,
        running: list[tuple[ShadowJob, Future[GenerationResult]]],
    ) -> bool:
        """Submit ``job`` as background work; False when the engine cannot take it now."""
        gen = dataclasses.replace(
            job.job.gen,
            background=True,
            cancel=threading.Event(),
            deadline=None,
            on_text=None,
            logprobs=True,  # the gate's features
        )
        self._inflight.append(gen)  # before submitting: a live request may cancel it at once
        try:
            running.append((job, self.engine.submit(gen)))
        except (QueueFullError, UnavailableError):
            return False
        except SlmAgentError as exc:
            self.compare(job, None, exc.message)
        return True

    def compare(self, job: ShadowJob, result: GenerationResult | None, error: str | None = None) -> None:
        """Score a local answer against the remote's and hand the pair to the promoter. Public for
        a live task's sampled requests, whose local answer already exists: nothing to re-run."""
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if result is not None:
            try:
                message = self._answer(job, result)
            except SlmAgentError as exc:  # the local answer broke its contract: a disagreement
                error = exc.message
        agreed, score = agreement(job.kind, message, job.remote, schema=job.schema)
        n_tools = len(job.job.tools or [])
        pair = PairRecord(
            trace_id=job.trace_id,
            task=job.task.name,
            adapter=job.adapter,
            kind=job.kind,
            agreed=agreed,
            score=score,
            local_output=message if error is None else None,
            remote_output=job.remote,
            # A failed answer is never served (the router escalates it): the gate does not learn from it.
            features=gate_features(
                result.token_logprobs, job.match_score, job.input_chars, n_tools, result.completion_tokens
            )
            if result is not None and error is None
            else [],
            local_ms=(result.total_ms - result.queue_ms) if result else None,
            remote_ms=job.remote_ms,
            error=error,
        )
        self.promoter.record_pair(job.task, pair)
        if error is None:
            self.counters.completed += 1
        else:
            self.counters.failed += 1

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._on_event(kind, data)
        except Exception:
            log.exception("publishing %s event failed", kind)
