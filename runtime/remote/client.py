"""Remote OpenAI-compatible LLM providers: the escalation path of the router.

``RemoteClient`` sends chat completions over httpx (async, streaming or not) with:

- retries with exponential backoff and jitter on 429, 5xx and connection errors, honouring
  ``Retry-After`` (``failures.py`` says which failures are worth another attempt);
- a circuit breaker per provider and daily token and cost budgets (``breaker.py``);
- PII redaction of what is sent and restoration of what comes back (``runtime/privacy/``);
- streams that pass each chunk through as it arrives and never pass off a truncated answer as a
  complete one (``streaming.py``).

The API key is read from the provider's ``api_key_env`` at each call; it is never stored, logged,
or put into an error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from typing import Any

import httpx

from slm_agent.errors import BadRequestError, RemoteError, UnavailableError
from slm_agent.privacy.redactor import Redactor
from slm_agent.runtime.remote.breaker import CircuitBreaker, DailyBudget
from slm_agent.runtime.remote.failures import Failure, failure_from_exc, failure_from_status
from slm_agent.runtime.remote.settings import RemoteProvider, RemoteResult, RemoteSettings
from slm_agent.runtime.remote.streaming import AsyncRemoteStream, StreamState

__all__ = ["RemoteClient"]

logger = logging.getLogger(__name__)


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


class RemoteClient:
    """Calls remote providers on behalf of the router; one per daemon, shared by all requests.

    Build it with ``RemoteClient(settings.remote)``. ``asleep``/``clock``/``today`` are there so
    tests can watch the backoff, the breaker and the budget without waiting for them.
    """

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        asleep: Callable[[float], Any] = asyncio.sleep,
        today: Callable[[], date] = lambda: datetime.now(UTC).date(),
    ) -> None:
        self.settings = settings
        self._asleep = asleep
        self._redactor = Redactor(settings.redact_patterns)
        self._breakers = {
            p.name: CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s, clock=clock)
            for p in settings.providers
        }
        self.budget = DailyBudget(settings.daily_token_budget, settings.daily_cost_budget_usd, today=today)
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

    async def achat(self, body: dict[str, Any], *, escalation: bool = False) -> RemoteResult:
        call = self._prepare(body, escalation, stream=False)
        response = await self._send(call)
        return self._finish(call, response.json())

    async def aembed(self, body: dict[str, Any]) -> RemoteResult:
        """``POST /embeddings`` for a model id a provider serves, with the same retries, breaker,
        budget and redaction as chat."""
        call = self._prepare(body, False, stream=False, endpoint="embeddings")
        response = await self._send(call)
        call.breaker.record_success()
        payload = response.json()
        return self._account(call, payload, payload.get("usage") or {}, completion_guess=0)

    def astream_chat(self, body: dict[str, Any], *, escalation: bool = False) -> AsyncRemoteStream:
        """The answer streamed (see ``AsyncRemoteStream``); nothing is sent before the first chunk
        is asked for."""
        call = self._prepare(body, escalation, stream=True)
        hide_usage = not (body.get("stream_options") or {}).get("include_usage")
        return AsyncRemoteStream(
            StreamState(self._redactor, call.mapping, hide_usage),
            send=partial(self._send, call),
            account=partial(self._account, call, {}),
            breaker=call.breaker,
            provider=call.provider.name,
        )

    async def aclose(self) -> None:
        """Close the connections; a later call opens new ones (on whatever event loop it runs)."""
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    # -- one call's steps ---------------------------------------------------------------------------

    def _prepare(
        self, body: dict[str, Any], escalation: bool, *, stream: bool, endpoint: str = "chat/completions"
    ) -> _Call:
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
            if endpoint == "chat/completions":
                out["stream"] = stream
                if stream:
                    out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            mapping: dict[str, str] = {}
            counts: dict[str, int] = {}
            if provider.redaction != "off":
                if endpoint == "embeddings":
                    out["input"], counts = self._redact_input(body.get("input"), mapping)
                else:
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
        url = provider.base_url.rstrip("/") + "/" + endpoint
        return _Call(provider, breaker, url, headers, out, mapping, counts, time.monotonic())

    def _redact_input(self, value: Any, mapping: dict[str, str]) -> tuple[Any, dict[str, int]]:
        """Embedding texts redacted like message content (token arrays pass as they are); the
        embedding of a placeholder needs nothing restored."""
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return value, {}
        counts: dict[str, int] = {}
        out = []
        for text in texts:
            r = self._redactor.redact(text, mapping)
            for kind, n in r.counts.items():
                counts[kind] = counts.get(kind, 0) + n
            out.append(r.text)
        return (out[0] if isinstance(value, str) else out), counts

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

    def _after_failure(self, call: _Call, failure: Failure) -> float:
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
            int(usage.get("prompt_tokens") or 0)
            if usage
            else len(json.dumps(call.body.get("messages", call.body.get("input")))) // 4
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

    # -- transport -----------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient()
        return self._aclient

    async def _send(self, call: _Call) -> httpx.Response:
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
                response = await client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                failure = failure_from_exc(call.provider.name, exc)
            else:
                if response.status_code < 400:
                    return response
                body = await response.aread()
                await response.aclose()
                failure = failure_from_status(
                    call.provider.name, response.status_code, response.headers, body
                )
            await self._asleep(self._after_failure(call, failure))
