"""A streamed remote answer: server-sent events parsed, placeholders restored, chunks passed on as
they arrive, and a stream that breaks before the provider said it was done raised as an error.

A truncated answer is never passed off as a complete one: the stream ends in a ``RemoteError``
with ``code == STREAM_INTERRUPTED`` when the connection drops (or closes) too early.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from slm_agent.errors import RemoteError
from slm_agent.privacy.redactor import Redactor, StreamRestorer
from slm_agent.runtime.remote.breaker import CircuitBreaker
from slm_agent.runtime.remote.settings import RemoteResult

__all__ = ["STREAM_INTERRUPTED", "AsyncRemoteStream", "SseParser", "StreamState"]

logger = logging.getLogger(__name__)

STREAM_INTERRUPTED = "remote_stream_interrupted"
"""``RemoteError.code`` of a stream that broke after chunks were already passed on."""


class SseParser:
    """OpenAI-style server-sent events: ``data: {json}`` lines, ended by ``data: [DONE]``."""

    def __init__(self) -> None:
        self.done = False
        self.finished: set[int] = set()  # choice indexes that reported a finish_reason

    def parse(self, line: str) -> dict[str, Any] | None:
        if not line.startswith("data:"):
            return None  # blank separators, comments, "event:" lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return None
        chunk: dict[str, Any] = json.loads(payload)
        if "error" in chunk:
            raise RemoteError(
                f"remote provider reported an error mid-stream: {chunk['error']}", code=STREAM_INTERRUPTED
            )
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                self.finished.add(choice.get("index", 0))
        return chunk

    @property
    def complete(self) -> bool:
        # Some servers omit [DONE]; a finish_reason is then the proof of a whole answer.
        return self.done or bool(self.finished)


class StreamState:
    """Per-stream restoration of placeholders and token counting."""

    def __init__(self, redactor: Redactor, mapping: dict[str, str], hide_usage: bool) -> None:
        self.redactor = redactor
        self.mapping = mapping
        self.hide_usage = hide_usage
        self.restorers: dict[tuple[int, int | None], StreamRestorer] = {}
        self.usage: dict[str, Any] | None = None
        self.content_chunks = 0

    def _restorer(self, key: tuple[int, int | None]) -> StreamRestorer:
        if key not in self.restorers:
            self.restorers[key] = StreamRestorer(self.redactor, self.mapping)
        return self.restorers[key]

    def process(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not choices and self.hide_usage and chunk.get("usage"):
            return None  # the usage chunk we asked for ourselves; the caller did not
        for choice in choices:
            delta = choice.get("delta") or {}
            index = choice.get("index", 0)
            if delta.get("content"):
                self.content_chunks += 1
            if self.mapping:
                self._restore_delta(index, delta, flush=bool(choice.get("finish_reason")))
        return chunk

    def _restore_delta(self, index: int, delta: dict[str, Any], flush: bool) -> None:
        if isinstance(delta.get("content"), str) or flush:
            restorer = self._restorer((index, None))
            text = restorer.feed(delta.get("content") or "")
            if flush:
                text += restorer.flush()
            if text or "content" in delta:
                delta["content"] = text
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if isinstance(function.get("arguments"), str):
                restorer = self._restorer((index, call.get("index", 0)))
                function["arguments"] = restorer.feed(function["arguments"]) + (
                    restorer.flush() if flush else ""
                )


class AsyncRemoteStream:
    """Chunks (OpenAI ``chat.completion.chunk`` dicts) as they arrive: ``async for chunk in
    stream``; ``result`` is set once the stream ended well.

    The request goes out on the first ``__anext__``: ``send`` retries like a plain call and raises
    its own ``RemoteError``/``UnavailableError``; a stream that breaks after the response headers
    raises ``RemoteError`` with ``code == STREAM_INTERRUPTED`` (the chunk count in the message; zero
    means nothing reached the caller yet). ``account`` turns (usage, content chunks) into the
    call's ``RemoteResult`` and charges the budget.
    """

    def __init__(
        self,
        state: StreamState,
        *,
        send: Callable[[], Awaitable[httpx.Response]],
        account: Callable[[dict[str, Any], int], RemoteResult],
        breaker: CircuitBreaker,
        provider: str,
    ) -> None:
        self._state = state
        self._send = send
        self._account = account
        self._breaker = breaker
        self._provider = provider
        self.result: RemoteResult | None = None
        self._iter = self._run()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter

    async def __anext__(self) -> dict[str, Any]:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        await self._iter.aclose()

    async def _run(self) -> AsyncGenerator[dict[str, Any], None]:
        response = await self._send()
        parser, chunks = SseParser(), 0
        try:
            async for line in response.aiter_lines():
                chunk = parser.parse(line)
                if chunk is not None and (out := self._state.process(chunk)) is not None:
                    chunks += 1
                    yield out
                if parser.done:
                    break
            if not parser.complete:
                raise RemoteError("the connection closed before the provider sent [DONE]")
        except (httpx.HTTPError, RemoteError, ValueError) as exc:
            raise self._broke(exc, chunks) from exc
        except GeneratorExit:
            self._breaker.release()  # the caller stopped reading; nothing to blame the provider for
            raise
        finally:
            await response.aclose()
        self._breaker.record_success()
        self.result = self._account(self._state.usage or {}, self._state.content_chunks)

    def _broke(self, exc: Exception, chunks: int) -> RemoteError:
        self._breaker.record_failure()
        what = exc.message if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
        logger.warning("remote %s: stream broke after %d chunk(s): %s", self._provider, chunks, what)
        return RemoteError(
            f"remote provider {self._provider!r} stream broke after {chunks} chunk(s), "
            f"the answer is incomplete: {what}",
            code=STREAM_INTERRUPTED,
        )
