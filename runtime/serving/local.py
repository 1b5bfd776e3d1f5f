"""Running a prepared job on the local engine from asyncio: wait for it (cancelling it when the
client goes away), or stream it as server-sent events with its trace committed before the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future

from slm_agent.errors import SlmAgentError
from slm_agent.runtime.engine import Engine, GenerationResult
from slm_agent.runtime.serving import responses
from slm_agent.runtime.serving.context import CallContext, Job
from slm_agent.runtime.serving.recorder import LocalAnswer, TraceRecorder
from slm_agent.runtime.serving.sse import DONE, error_event
from slm_agent.runtime.serving.tool_calls import CallReader, call_id


class LocalRunner:
    def __init__(self, engine: Engine, recorder: TraceRecorder) -> None:
        self.engine = engine
        self.recorder = recorder

    async def run(
        self, job: Job, ctx: CallContext, handed_on: tuple[type[SlmAgentError], ...] = ()
    ) -> GenerationResult:
        """Run a job on the engine; cancel it if the client goes away while it waits. An engine
        error (queue full, deadline, context overflow) is traced before it is raised, unless it
        is one of ``handed_on``: the caller then lets the remote answer under the same trace."""
        try:
            future = asyncio.wrap_future(self.engine.submit(job.gen))
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if await ctx.disconnected():
                    job.gen.cancel.set()
        except SlmAgentError as exc:
            if not isinstance(exc, handed_on):
                self.recorder.local(job, None, error=exc)
            raise

    def stream(self, job: Job, *, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        """Submit now (so a full queue is still a plain 429), then stream the answer as it comes."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        # A tool_text answer is held back: it may hold calls in the model's own syntax, known only
        # once it is finished. Any other answer, a grammar-held call included, goes out as it comes.
        if job.output_kind != "tool_text":
            job.gen.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        try:
            future = self.engine.submit(job.gen)
        except SlmAgentError as exc:
            self.recorder.local(job, None, error=exc)
            raise
        return self._events(job, future, pieces, chat=chat, include_usage=include_usage)

    async def _events(
        self,
        job: Job,
        future: Future[GenerationResult],
        pieces: asyncio.Queue[str],
        *,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        waiter = asyncio.wrap_future(future)
        chunks = responses.Chunks(job.trace.id, job.target.model_id, chat=chat)
        calls = CallReader() if job.output_kind == "tool_call" else None
        finished = False
        result: GenerationResult | None = None

        def piece(text: str) -> Iterator[bytes]:
            if calls is None:
                yield chunks.text(text)
                return
            for delta in calls.feed(text):  # the calls' pieces as the grammar-held text comes
                yield from chunks.tool_call(delta, call_id(job.trace.id, delta.index))

        try:
            if chat:
                yield chunks.role()
            while not waiter.done():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    for data in piece(getter.result()):
                        yield data
                else:
                    getter.cancel()
            while not pieces.empty():
                for data in piece(pieces.get_nowait()):
                    yield data
            result = waiter.result()
            finish = responses.finish_reason(result.finish_reason)
            answer = responses.chat_answer(job, result) if chat else LocalAnswer(result.text)
            if answer.tool_calls:
                finish = "tool_calls"
                if calls is None:
                    for data in chunks.finished_tool_calls([c.model_dump() for c in answer.tool_calls]):
                        yield data
            if chat and not answer.tool_calls:
                answer.text = result.text
                if job.output_kind == "tool_text":  # held back in case it was a call: it was not
                    yield chunks.text(result.text)
            self.recorder.local(job, result, answer)
            # The trace is committed; only now do the last bytes go out.
            yield chunks.finish(finish)
            if include_usage:
                yield chunks.usage(responses.usage(result))
            yield DONE
            finished = True
        except SlmAgentError as exc:
            self.recorder.local(job, result, LocalAnswer(result.text if result else None), error=exc)
            finished = True
            yield error_event(exc)
            yield DONE
        finally:
            if not finished:
                # The client went away mid-stream: stop generating, keep the trace of what was said.
                job.gen.cancel.set()
                future.add_done_callback(lambda f: self._abandoned(job, f))

    def _abandoned(self, job: Job, future: Future[GenerationResult]) -> None:
        result = None if future.exception() else future.result()
        self.recorder.local(job, result, status=499)
