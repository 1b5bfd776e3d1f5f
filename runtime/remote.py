"""Remote OpenAI-compatible LLM providers: the escalation path of the router.

``RemoteClient`` sends chat completions over httpx (sync and async, streaming or not) with:

- retries with exponential backoff and jitter on 429, 5xx and connection errors, honouring
  ``Retry-After``;
- a circuit breaker per provider (closed -> open after N consecutive failures -> half-open after a
  cooldown -> closed on the first success);
- daily token and cost budgets (in memory, reset at midnight UTC);
- PII redaction of what is sent and restoration of what comes back (``runtime/redact.py``);
- streams that pass each chunk through as it arrives, and that end in a ``RemoteError`` with
  ``code == STREAM_INTERRUPTED`` when the connection drops before the provider said it was done:
  a truncated answer is never passed off as a complete one.

The API key is read from the provider's ``api_key_env`` at each call; it is never stored, logged,
or put into an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, model_validator

from slm_agent.errors import BadRequestError, RemoteError, UnavailableError
from slm_agent.runtime.breaker import CircuitBreaker, DailyBudget
from slm_agent.runtime.redact import Redactor, StreamRestorer

__all__ = [
    "STREAM_INTERRUPTED",
    "AsyncRemoteStream",
    "RemoteClient",
    "RemoteProvider",
    "RemoteResult",
    "RemoteSettings",
    "RemoteStream",
]

logger = logging.getLogger(__name__)

STREAM_INTERRUPTED = "remote_stream_interrupted"
"""``RemoteError.code`` of a stream that broke after chunks were already passed on."""


class RemoteProvider(BaseModel):
    name: str = Field(description="Name used in logs, traces and default_provider.")
    base_url: str = Field(description="OpenAI-compatible API root, e.g. https://api.openai.com/v1.")
    models: list[str] = Field(default_factory=lambda: ["*"], description='Model ids it serves; "*" = any.')
    escalation_model: str | None = Field(
        None, description="Model id sent when a local request escalates here (default: first of models)."
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key is never stored)."
    )
    price_per_1k_input: float = Field(0.0, ge=0, description="USD per 1,000 prompt tokens.")
    price_per_1k_output: float = Field(0.0, ge=0, description="USD per 1,000 completion tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Connect/read timeout of one attempt, in seconds.")
    max_retries: int = Field(
        2, ge=0, description="Retries after the first attempt on 429, 5xx, network errors."
    )
    redaction: Literal["off", "redact", "refuse"] = Field(
        "redact", description="PII handling: send as is, replace with placeholders, or refuse to send."
    )

    def serves(self, model: str) -> bool:
        return model in self.models or "*" in self.models

    def upstream_model(self) -> str | None:
        return self.escalation_model or next((m for m in self.models if m != "*"), None)


class RemoteSettings(BaseModel):
    providers: list[RemoteProvider] = Field(default_factory=list, description="Remote providers.")
    default_provider: str | None = Field(
        None, description="Provider for escalations and model ids no provider names (default: the first)."
    )
    daily_token_budget: int | None = Field(
        None, ge=0, description="Remote tokens per UTC day; none = unlimited."
    )
    daily_cost_budget_usd: float | None = Field(
        None, ge=0, description="Remote USD per UTC day; none = unlimited."
    )
    on_budget_exhausted: Literal["local", "error"] = Field(
        "local", description="When a budget is spent: answer locally, or fail with 402."
    )
    breaker_failures: int = Field(3, ge=1, description="Consecutive failures that open a provider's breaker.")
    breaker_cooldown_s: float = Field(30.0, ge=0, description="Seconds an open breaker waits before a probe.")
    backoff_base_s: float = Field(
        0.5, ge=0, description="First retry delay; doubles each retry (with jitter)."
    )
    backoff_max_s: float = Field(8.0, ge=0, description="Longest delay between two retries.")
    max_retry_after_s: float = Field(30.0, ge=0, description="A longer Retry-After fails the call instead.")
    redact_patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra PII kinds to redact: kind -> regex."
    )

    @model_validator(mode="after")
    def _known_default(self) -> RemoteSettings:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"remote provider names must be unique, got {names}")
        if self.default_provider is not None and self.default_provider not in names:
            raise ValueError(
                f"default_provider {self.default_provider!r} is not one of the providers {names}"
            )
        return self


class RemoteResult(BaseModel):
    """What a remote call cost and did, for the trace store; ``response`` is the OpenAI body."""

    response: dict[str, Any] = Field(default_factory=dict)
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = Field(False, description="True when the provider reported no usage.")
    cost_usd: float = 0.0
    attempts: int = 1
    latency_s: float = 0.0
    redactions: dict[str, int] = Field(default_factory=dict, description="PII kind -> values redacted.")


# -- one call's plumbing ---------------------------------------------------------------------------


@dataclass
class _Call:
    provider: RemoteProvider
    breaker: CircuitBreaker
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    mapping: dict[str, str]
    counts: dict[str, int]
    started: float
    attempts: int = 0


@dataclass
class _Failure:
    error: RemoteError
    retryable: bool
    provider_fault: bool  # counts toward the breaker: 5xx, timeouts, network; not 4xx or 429
    retry_after_s: float | None = None


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, (parsed - datetime.now(UTC)).total_seconds()) if parsed else None


def _failure_from_status(provider: str, status: int, headers: httpx.Headers, body: bytes) -> _Failure:
    try:
        detail = json.loads(body).get("error", {})
        message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    text = f"remote provider {provider!r} answered HTTP {status}: {message or 'no message'}"
    if status == 429:
        return _Failure(RemoteError(text, code="remote_rate_limited"), True, False, _retry_after(headers))
    if status >= 500:
        return _Failure(RemoteError(text, code="remote_server_error"), True, True, _retry_after(headers))
    # 4xx: the request (or our key) is wrong; sending it again will not help.
    return _Failure(RemoteError(text + " (check the provider's settings and the request)"), False, False)


def _failure_from_exc(provider: str, exc: httpx.HTTPError) -> _Failure:
    if isinstance(exc, httpx.TimeoutException):
        error = RemoteError(
            f"remote provider {provider!r} timed out ({type(exc).__name__})", code="remote_timeout"
        )
    else:
        error = RemoteError(f"cannot reach remote provider {provider!r}: {type(exc).__name__}: {exc}")
    return _Failure(error, True, True)


class _SseParser:
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


class _StreamState:
    """Per-stream restoration of placeholders and token counting."""

    def __init__(self, redactor: Redactor, call: _Call, hide_usage: bool) -> None:
        self.redactor = redactor
        self.call = call
        self.hide_usage = hide_usage
        self.restorers: dict[tuple[int, int | None], StreamRestorer] = {}
        self.usage: dict[str, Any] | None = None
        self.content_chunks = 0

    def _restorer(self, key: tuple[int, int | None]) -> StreamRestorer:
        if key not in self.restorers:
            self.restorers[key] = StreamRestorer(self.redactor, self.call.mapping)
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
            if self.call.mapping:
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


# -- the client ------------------------------------------------------------------------------------


class RemoteClient:
    """Calls remote providers on behalf of the router; one per daemon, shared by all requests.

    Build it with ``RemoteClient(settings.remote)``. ``sleep``/``asleep``/``clock`` are there so
    tests can watch the backoff without waiting for it.
    """

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Any] = asyncio.sleep,
        today: Callable[[], date] = lambda: datetime.now(UTC).date(),
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._asleep = asleep
        self._redactor = Redactor(settings.redact_patterns)
        self._breakers = {
            p.name: CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s, clock=clock)
            for p in settings.providers
        }
        self.budget = DailyBudget(settings.daily_token_budget, settings.daily_cost_budget_usd, today=today)
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None

    # -- choosing ----------------------------------------------------------------------------------

    def provider_for(self, model: str | None, *, escalation: bool = False) -> RemoteProvider:
        """The provider for ``model``: one that names it, else one serving "*", else the default.

        ``escalation`` (a local task's request going remote) always takes the default provider.
        """
        providers = self.settings.providers
        if not providers:
            raise UnavailableError("no remote provider is configured: add one under [remote] in the config")
        default = next((p for p in providers if p.name == self.settings.default_provider), providers[0])
        if escalation or not model:
            return default
        return (
            next((p for p in providers if model in p.models), None)
            or next((p for p in providers if "*" in p.models), None)
            or default
        )

    def breaker(self, provider: str) -> CircuitBreaker:
        return self._breakers[provider]

    def is_available(self, model: str | None = None, *, escalation: bool = False) -> bool:
        """Whether a call would be attempted now: a provider, its key, a closed (or probing) breaker,
        and budget left unless an exhausted budget should surface as an error (402)."""
        try:
            provider = self.provider_for(model, escalation=escalation)
        except UnavailableError:
            return False
        if provider.api_key_env and not os.environ.get(provider.api_key_env):
            return False
        if not self._breakers[provider.name].would_allow():
            return False
        return self.settings.on_budget_exhausted == "error" or not self.budget.exhausted()

    # -- calls ---------------------------------------------------------------------------------------

    def chat(self, body: dict[str, Any], *, escalation: bool = False) -> RemoteResult:
        call = self._prepare(body, escalation, stream=False)
        response = self._send(call)
        return self._finish(call, response.json())

    async def achat(self, body: dict[str, Any], *, escalation: bool = False) -> RemoteResult:
        call = self._prepare(body, escalation, stream=False)
        response = await self._asend(call)
        return self._finish(call, response.json())

    def stream_chat(self, body: dict[str, Any], *, escalation: bool = False) -> RemoteStream:
        """Chunks (OpenAI ``chat.completion.chunk`` dicts) as they arrive; ``.result`` once done.

        The request goes out on the first ``next()``: a failure before the response headers is
        retried like ``chat`` and raised as its own ``RemoteError``/``UnavailableError``; a stream
        that breaks after the headers raises ``RemoteError`` with ``code == STREAM_INTERRUPTED``
        (``chunks_sent`` in the message; zero means nothing reached the caller yet).
        """
        call = self._prepare(body, escalation, stream=True)
        return RemoteStream(
            self, call, hide_usage=not (body.get("stream_options") or {}).get("include_usage")
        )

    def astream_chat(self, body: dict[str, Any], *, escalation: bool = False) -> AsyncRemoteStream:
        call = self._prepare(body, escalation, stream=True)
        return AsyncRemoteStream(
            self, call, hide_usage=not (body.get("stream_options") or {}).get("include_usage")
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
        self.close()

    # -- steps shared by sync and async -------------------------------------------------------------

    def _prepare(self, body: dict[str, Any], escalation: bool, *, stream: bool) -> _Call:
        model = body.get("model")
        provider = self.provider_for(model, escalation=escalation)
        breaker = self._breakers[provider.name]
        if not breaker.allow():
            raise UnavailableError(
                f"remote provider {provider.name!r} is failing (circuit breaker open); "
                f"retry in {breaker.retry_after_s():.0f}s",
                retry_after_s=breaker.retry_after_s(),
                code="breaker_open",
            )
        try:
            self.budget.check()
            headers = {
                "Content-Type": "application/json",
                "Accept": "text/event-stream" if stream else "application/json",
            }
            if provider.api_key_env:
                key = os.environ.get(provider.api_key_env)
                if not key:
                    raise UnavailableError(
                        f"remote provider {provider.name!r} needs an API key in ${provider.api_key_env}",
                        code="remote_no_key",
                    )
                headers["Authorization"] = f"Bearer {key}"
            out = dict(body)
            if escalation or not (model and provider.serves(model)):
                upstream = provider.upstream_model() or model
                if upstream is None:
                    raise BadRequestError(f"no model id to send to provider {provider.name!r}", param="model")
                out["model"] = upstream
            out["stream"] = stream
            if stream:
                out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            mapping: dict[str, str] = {}
            counts: dict[str, int] = {}
            if provider.redaction != "off":
                out["messages"], counts = self._redact_messages(body.get("messages") or [], mapping)
                if counts and provider.redaction == "refuse":
                    found = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
                    raise BadRequestError(
                        f"request contains personal data ({found}) and provider {provider.name!r} "
                        "is set to refuse it: answer locally or set its redaction to 'redact'",
                        code="pii_refused",
                    )
        except BaseException:
            breaker.release()  # a half-open probe slot taken above must not leak
            raise
        url = provider.base_url.rstrip("/") + "/chat/completions"
        return _Call(provider, breaker, url, headers, out, mapping, counts, time.monotonic())

    def _redact_messages(
        self, messages: list[dict[str, Any]], mapping: dict[str, str]
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Redact what people and tools wrote (content, tool-call arguments), not the structure
        (roles, ids, names), so tool-call ids still pair up at the provider."""
        counts: dict[str, int] = {}

        def red(text: str) -> str:
            r = self._redactor.redact(text, mapping)
            for kind, n in r.counts.items():
                counts[kind] = counts.get(kind, 0) + n
            return r.text

        out = []
        for message in messages:
            m = dict(message)
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = red(content)
            elif isinstance(content, list):
                m["content"] = [
                    {**part, "text": red(part["text"])} if isinstance(part.get("text"), str) else part
                    for part in content
                ]
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        **tc,
                        "function": {
                            **tc["function"],
                            "arguments": red(tc["function"].get("arguments") or ""),
                        },
                    }
                    if isinstance(tc.get("function"), dict)
                    else tc
                    for tc in m["tool_calls"]
                ]
            out.append(m)
        return out, counts

    def _after_failure(self, call: _Call, failure: _Failure) -> float:
        """Record the failure; the delay before the next attempt, or raise when there is none."""
        if failure.provider_fault:
            call.breaker.record_failure()
        else:
            call.breaker.record_neutral()
        name = call.provider.name
        if not failure.retryable or call.attempts > call.provider.max_retries:
            logger.warning("remote %s: giving up after %d attempt(s): %s", name, call.attempts, failure.error)
            raise failure.error
        if not call.breaker.allow():
            raise RemoteError(
                f"{failure.error.message}; circuit breaker opened, not retrying", code=failure.error.code
            )
        if failure.retry_after_s is not None:
            if failure.retry_after_s > self.settings.max_retry_after_s:
                call.breaker.release()
                raise failure.error
            delay = failure.retry_after_s
        else:
            cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (call.attempts - 1))
            delay = random.uniform(cap / 2, cap)  # "equal jitter": spread out, never near zero
        logger.info(
            "remote %s: attempt %d failed (%s); retrying in %.2fs", name, call.attempts, failure.error, delay
        )
        return delay

    def _finish(self, call: _Call, response: dict[str, Any]) -> RemoteResult:
        call.breaker.record_success()
        if call.mapping:
            for choice in response.get("choices") or []:
                message = choice.get("message") or {}
                if isinstance(message.get("content"), str):
                    message["content"] = self._redactor.restore(message["content"], call.mapping)
                for tc in message.get("tool_calls") or []:
                    fn = tc.get("function") or {}
                    if isinstance(fn.get("arguments"), str):
                        fn["arguments"] = self._redactor.restore(fn["arguments"], call.mapping)
        usage = response.get("usage") or {}
        return self._account(call, response, usage, completion_guess=0)

    def _account(
        self, call: _Call, response: dict[str, Any], usage: dict[str, Any], completion_guess: int
    ) -> RemoteResult:
        estimated = not usage
        prompt = (
            int(usage.get("prompt_tokens") or 0) if usage else len(json.dumps(call.body.get("messages"))) // 4
        )
        completion = int(usage.get("completion_tokens") or 0) if usage else completion_guess
        p = call.provider
        cost = prompt / 1000 * p.price_per_1k_input + completion / 1000 * p.price_per_1k_output
        self.budget.record(prompt + completion, cost)
        return RemoteResult(
            response=response,
            provider=p.name,
            model=str(call.body.get("model")),
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_estimated=estimated,
            cost_usd=cost,
            attempts=call.attempts,
            latency_s=time.monotonic() - call.started,
            redactions=call.counts,
        )

    def _timeout(self, provider: RemoteProvider) -> httpx.Timeout:
        return httpx.Timeout(provider.timeout_s, connect=min(provider.timeout_s, 10.0))

    # -- sync transport --------------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client()
        return self._client

    def _send(self, call: _Call) -> httpx.Response:
        """The first successful response (status < 400), its body not yet read when streaming."""
        client = self._http()
        stream = bool(call.body.get("stream"))
        while True:
            call.attempts += 1
            try:
                request = client.build_request(
                    "POST",
                    call.url,
                    json=call.body,
                    headers=call.headers,
                    timeout=self._timeout(call.provider),
                )
                response = client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                failure = _failure_from_exc(call.provider.name, exc)
            else:
                if response.status_code < 400:
                    return response
                body = response.read()
                response.close()
                failure = _failure_from_status(
                    call.provider.name, response.status_code, response.headers, body
                )
            self._sleep(self._after_failure(call, failure))

    # -- async transport -------------------------------------------------------------------------------

    def _ahttp(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient()
        return self._aclient

    async def _asend(self, call: _Call) -> httpx.Response:
        client = self._ahttp()
        stream = bool(call.body.get("stream"))
        while True:
            call.attempts += 1
            try:
                request = client.build_request(
                    "POST",
                    call.url,
                    json=call.body,
                    headers=call.headers,
                    timeout=self._timeout(call.provider),
                )
                response = await client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                failure = _failure_from_exc(call.provider.name, exc)
            else:
                if response.status_code < 400:
                    return response
                body = await response.aread()
                await response.aclose()
                failure = _failure_from_status(
                    call.provider.name, response.status_code, response.headers, body
                )
            await self._asleep(self._after_failure(call, failure))

    def _stream_broke(self, call: _Call, exc: Exception, chunks: int) -> RemoteError:
        call.breaker.record_failure()
        what = exc.message if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
        logger.warning("remote %s: stream broke after %d chunk(s): %s", call.provider.name, chunks, what)
        return RemoteError(
            f"remote provider {call.provider.name!r} stream broke after {chunks} chunk(s), "
            f"the answer is incomplete: {what}",
            code=STREAM_INTERRUPTED,
        )


class RemoteStream:
    """A streamed remote answer: iterate for chunks; ``result`` is set when it ended well."""

    def __init__(self, client: RemoteClient, call: _Call, *, hide_usage: bool) -> None:
        self._client = client
        self._call = call
        self._state = _StreamState(client._redactor, call, hide_usage)
        self.result: RemoteResult | None = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter

    def __next__(self) -> dict[str, Any]:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()

    def _run(self) -> Generator[dict[str, Any], None, None]:
        call, client = self._call, self._client
        response = client._send(call)
        parser, chunks = _SseParser(), 0
        try:
            for line in response.iter_lines():
                chunk = parser.parse(line)
                if chunk is not None and (out := self._state.process(chunk)) is not None:
                    chunks += 1
                    yield out
                if parser.done:
                    break
            if not parser.complete:
                raise RemoteError("the connection closed before the provider sent [DONE]")
        except (httpx.HTTPError, RemoteError, ValueError) as exc:
            raise client._stream_broke(call, exc, chunks) from exc
        except GeneratorExit:
            call.breaker.release()  # the caller stopped reading; nothing to blame the provider for
            raise
        finally:
            response.close()
        call.breaker.record_success()
        self.result = client._account(call, {}, self._state.usage or {}, self._state.content_chunks)


class AsyncRemoteStream:
    """The async twin of ``RemoteStream``: ``async for chunk in stream``."""

    def __init__(self, client: RemoteClient, call: _Call, *, hide_usage: bool) -> None:
        self._client = client
        self._call = call
        self._state = _StreamState(client._redactor, call, hide_usage)
        self.result: RemoteResult | None = None
        self._iter = self._run()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter

    async def __anext__(self) -> dict[str, Any]:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        await self._iter.aclose()

    async def _run(self) -> AsyncGenerator[dict[str, Any], None]:
        call, client = self._call, self._client
        response = await client._asend(call)
        parser, chunks = _SseParser(), 0
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
            raise client._stream_broke(call, exc, chunks) from exc
        except GeneratorExit:
            call.breaker.release()
            raise
        finally:
            await response.aclose()
        call.breaker.record_success()
        self.result = client._account(call, {}, self._state.usage or {}, self._state.content_chunks)
