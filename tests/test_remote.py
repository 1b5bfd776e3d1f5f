"""The remote client against real servers: llama-cpp-python's own OpenAI server for the happy
paths, the fault server for everything that goes wrong."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from datetime import date
from typing import Any, TypeVar

import pytest
from conftest import free_port
from faultserver import Fault, FaultServer

from slm_agent.errors import BadRequestError, BudgetExceededError, RemoteError, UnavailableError
from slm_agent.runtime.config import Settings
from slm_agent.runtime.remote.assembled import AssembledMessage
from slm_agent.runtime.remote.client import RemoteClient
from slm_agent.runtime.remote.settings import RemoteProvider, RemoteResult, RemoteSettings
from slm_agent.runtime.remote.streaming import STREAM_INTERRUPTED, AsyncRemoteStream

# The bundled base model has no chat template; a sentence to complete gets it talking.
PROMPT = "The capital of France is"
PII_TEXT = "I am Jane, mail jane.roe@corp.example or call +1 415-555-0100; card 4111 1111 1111 1111."


# -- fixtures ----------------------------------------------------------------------------------------


T = TypeVar("T")


class Sleeps(list[float]):
    """Records each backoff delay and really waits it, so server-side timestamps show it too."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
        await asyncio.sleep(seconds)


def make_client(url: str, sleeps: Sleeps | None = None, **overrides: Any) -> RemoteClient:
    provider_fields = {k: overrides.pop(k) for k in list(overrides) if k in RemoteProvider.model_fields}
    provider = RemoteProvider(name="test", base_url=url, **{"max_retries": 2, **provider_fields})
    settings = RemoteSettings(providers=[provider], **{"backoff_base_s": 0.05, **overrides})
    return RemoteClient(settings, asleep=sleeps if sleeps is not None else Sleeps())


def body(content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}


def run(client: RemoteClient, call: Coroutine[Any, Any, T]) -> T:
    """One call on an event loop of its own; its connections close with it (they belong to it)."""

    async def once() -> T:
        try:
            return await call
        finally:
            await client.aclose()

    return asyncio.run(once())


def chat(client: RemoteClient, request: dict[str, Any], *, escalation: bool = False) -> RemoteResult:
    return run(client, client.achat(request, escalation=escalation))


def read(
    client: RemoteClient,
    stream: AsyncRemoteStream,
    chunks: list[dict[str, Any]] | None = None,
    arrivals: list[float] | None = None,
) -> list[dict[str, Any]]:
    """Every chunk of ``stream`` (into ``chunks`` as they come, kept when it raises)."""
    out: list[dict[str, Any]] = [] if chunks is None else chunks

    async def drain() -> list[dict[str, Any]]:
        async for chunk in stream:
            if arrivals is not None:
                arrivals.append(time.monotonic())
            out.append(chunk)
        return out

    return run(client, drain())


# -- happy paths through a real server -----------------------------------------------------------------


def test_chat_through_llama_server_counts_cost(llama_server: str) -> None:
    client = make_client(llama_server, price_per_1k_input=1.0, price_per_1k_output=2.0)
    result = chat(client, body(PROMPT, max_tokens=8, temperature=0))
    message = result.response["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)
    assert result.prompt_tokens > 0 and 0 < result.completion_tokens <= 8
    assert not result.usage_estimated
    assert result.cost_usd == pytest.approx(result.prompt_tokens / 1000 + result.completion_tokens * 2 / 1000)
    assert client.budget.tokens == result.prompt_tokens + result.completion_tokens


def test_stream_passes_chunks_through_as_they_arrive(llama_server: str) -> None:
    client = make_client(llama_server, price_per_1k_output=1.0)
    stream = client.astream_chat(body(PROMPT, max_tokens=24, temperature=0))
    arrivals: list[float] = []
    pieces: list[str] = []
    for chunk in read(client, stream, arrivals=arrivals):
        for choice in chunk["choices"]:
            pieces.append(choice["delta"].get("content") or "")
    assert len(arrivals) >= 5
    assembled = AssembledMessage()
    for chunk in read(client, client.astream_chat(body(PROMPT, max_tokens=24, temperature=0))):
        assembled.add(chunk)
    assert assembled.message == {"role": "assistant", "content": "".join(pieces)}
    assert assembled.finish_reason in ("stop", "length")
    # Chunks come as the model decodes (~tens of ms apart), not in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.1
    assert "".join(pieces)
    assert stream.result is not None and stream.result.completion_tokens > 0
    assert stream.result.cost_usd > 0


def test_streamed_tool_calls_add_up_to_the_message() -> None:
    """Deltas as OpenAI streams parallel calls: id and name once, arguments in fragments, each
    call keyed by its index, interleaved."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        ]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz"'}},
        ]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": ': "CET"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}},
    ]  # fmt: skip
    assembled = AssembledMessage()
    for chunk in chunks:
        assembled.add(chunk)
    assert assembled.finish_reason == "tool_calls"
    assert assembled.message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
            },
        ],
    }


def test_async_stream_and_chat_through_llama_server(llama_server: str) -> None:
    client = make_client(llama_server)

    async def run() -> tuple[int, str]:
        stream = client.astream_chat(body(PROMPT, max_tokens=6, temperature=0))
        n = sum([1 async for _ in stream])
        result = await client.achat(body(PROMPT, max_tokens=6, temperature=0))
        await client.aclose()
        return n, result.response["choices"][0]["finish_reason"]

    n, finish = asyncio.run(run())
    assert n >= 2
    assert finish in ("stop", "length")


# -- retries ---------------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(fs: FaultServer) -> None:
    sleeps = Sleeps()
    client = make_client(fs.url, sleeps)
    fs.push(Fault.status(429, retry_after=1))
    result = chat(client, body())
    assert result.attempts == 2
    assert sleeps == [1.0]
    first, second = fs.requests
    assert second.at - first.at >= 1.0


def test_5xx_is_retried_with_jittered_exponential_backoff(fs: FaultServer) -> None:
    sleeps = Sleeps()
    client = make_client(fs.url, sleeps, max_retries=3, backoff_base_s=0.1, breaker_failures=10)
    fs.push(Fault.status(500), Fault.status(502), Fault.status(503))
    result = chat(client, body())
    assert result.attempts == 4
    assert len(sleeps) == 3
    for i, delay in enumerate(sleeps):
        cap = 0.1 * 2**i
        assert cap / 2 <= delay <= cap


def test_retries_run_out_into_a_remote_error(fs: FaultServer) -> None:
    client = make_client(fs.url, max_retries=1, breaker_failures=10)
    fs.push(Fault.status(500), Fault.status(500))
    with pytest.raises(RemoteError) as info:
        chat(client, body())
    assert info.value.status_code == 502 and info.value.code == "remote_server_error"
    assert len(fs.requests) == 2


def test_4xx_is_not_retried(fs: FaultServer) -> None:
    client = make_client(fs.url)
    fs.push(Fault.status(400))
    with pytest.raises(RemoteError, match="HTTP 400"):
        chat(client, body())
    assert len(fs.requests) == 1
    assert client.breaker("test").consecutive_failures == 0


def test_connection_refused_is_retried_then_fails() -> None:
    sleeps = Sleeps()
    client = make_client(f"http://127.0.0.1:{free_port()}/v1", sleeps, max_retries=2, breaker_failures=10)
    with pytest.raises(RemoteError, match="cannot reach"):
        chat(client, body())
    assert len(sleeps) == 2


def test_hanging_provider_times_out(fs: FaultServer) -> None:
    client = make_client(fs.url, timeout_s=0.5, max_retries=0)
    fs.push(Fault.hang(5))
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        chat(client, body())
    assert info.value.code == "remote_timeout"
    assert time.monotonic() - start < 3


# -- circuit breaker ------------------------------------------------------------------------------------


def test_breaker_opens_after_n_failures_and_recovers_after_cooldown(fs: FaultServer) -> None:
    client = make_client(fs.url, max_retries=0, breaker_failures=3, breaker_cooldown_s=0.5)
    breaker = client.breaker("test")
    fs.push(*[Fault.status(500)] * 3)
    for _ in range(3):
        with pytest.raises(RemoteError):
            chat(client, body())
    assert breaker.state == "open"
    assert not client.is_available("gpt-test")
    with pytest.raises(UnavailableError) as info:
        chat(client, body())
    assert info.value.code == "breaker_open" and info.value.retry_after_s is not None
    assert len(fs.requests) == 3  # the open breaker kept the call from the provider

    time.sleep(0.55)
    assert breaker.state == "half_open" and client.is_available("gpt-test")
    fs.push(Fault.status(500))  # a failed probe opens it again at once
    with pytest.raises(RemoteError):
        chat(client, body())
    assert breaker.state == "open"

    time.sleep(0.55)
    chat(client, body())  # a successful probe closes it
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    chat(client, body())


def test_breaker_stops_retries_of_the_call_that_opened_it(fs: FaultServer) -> None:
    client = make_client(fs.url, max_retries=5, breaker_failures=2, breaker_cooldown_s=30)
    fs.push(*[Fault.status(503)] * 5)
    with pytest.raises(RemoteError, match="circuit breaker opened"):
        chat(client, body())
    assert len(fs.requests) == 2


# -- budgets ---------------------------------------------------------------------------------------------


def test_daily_token_budget_is_enforced_and_resets_next_utc_day(fs: FaultServer) -> None:
    day = [date(2025, 1, 1)]
    provider = RemoteProvider(name="test", base_url=fs.url)
    settings = RemoteSettings(providers=[provider], daily_token_budget=10, on_budget_exhausted="local")
    client = RemoteClient(settings, today=lambda: day[0])
    chat(client, body("one two three four five six seven"))  # 7 + 7 tokens: over the budget now
    assert client.budget.tokens == 14
    assert not client.is_available("gpt-test")  # "local": the router answers locally instead
    with pytest.raises(BudgetExceededError) as info:
        chat(client, body())
    assert info.value.status_code == 402
    assert len(fs.requests) == 1
    day[0] = date(2025, 1, 2)
    assert client.is_available("gpt-test")
    chat(client, body("hi"))


def test_daily_cost_budget_with_error_policy(fs: FaultServer) -> None:
    client = make_client(
        fs.url, price_per_1k_input=100.0, daily_cost_budget_usd=0.5, on_budget_exhausted="error"
    )
    result = chat(client, body("a b c d e f"))
    assert result.cost_usd == pytest.approx(0.6)
    # "error": still "available", so the call is made and fails with 402 for the agent to see.
    assert client.is_available("gpt-test")
    with pytest.raises(BudgetExceededError):
        chat(client, body())


# -- streams that break ---------------------------------------------------------------------------------


def test_mid_stream_drop_is_an_error_not_a_short_answer(fs: FaultServer) -> None:
    client = make_client(fs.url)
    fs.push(Fault.drop(after_chunks=3))
    stream = client.astream_chat(body("one two three four five six"))
    received: list[dict[str, Any]] = []
    with pytest.raises(RemoteError) as info:
        read(client, stream, received)
    assert len(received) == 3
    assert info.value.code == STREAM_INTERRUPTED
    assert "after 3 chunk(s)" in info.value.message
    assert stream.result is None
    assert len(fs.requests) == 1  # never retried once chunks were passed on


def test_clean_close_without_done_is_detected(fs: FaultServer) -> None:
    client = make_client(fs.url)
    fs.push(Fault.eof(after_chunks=2))
    with pytest.raises(RemoteError) as info:
        read(client, client.astream_chat(body("one two three four")))
    assert info.value.code == STREAM_INTERRUPTED
    assert "[DONE]" in info.value.message


def test_async_mid_stream_drop_is_detected(fs: FaultServer) -> None:
    client = make_client(fs.url)
    fs.push(Fault.drop(after_chunks=2))

    async def run() -> int:
        n = 0
        try:
            async for _ in client.astream_chat(body("one two three four")):
                n += 1
        finally:
            await client.aclose()
        return n

    with pytest.raises(RemoteError) as info:
        asyncio.run(run())
    assert info.value.code == STREAM_INTERRUPTED


def test_stream_start_is_retried_before_any_chunk(fs: FaultServer) -> None:
    client = make_client(fs.url)
    fs.push(Fault.status(503))
    stream = client.astream_chat(body("alpha beta"))
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in read(client, stream) if c["choices"]
    )
    assert text.split() == ["alpha", "beta"]
    assert stream.result is not None and stream.result.attempts == 2
    assert not stream.result.usage_estimated


# -- privacy ----------------------------------------------------------------------------------------------


def test_pii_is_redacted_before_sending_and_restored_in_the_answer(fs: FaultServer) -> None:
    client = make_client(fs.url)
    request = {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Answer the user. Escalations go to ops@corp.example."},
            {"role": "user", "content": PII_TEXT},
        ],
    }
    result = chat(client, request)  # the fault server echoes the last user message back
    assert result.response["choices"][0]["message"]["content"] == PII_TEXT
    assert result.redactions == {"email": 2, "phone": 1, "card": 1}
    sent = json.dumps(fs.requests[0].body)
    for value in ("jane.roe@corp.example", "ops@corp.example", "415-555-0100", "4111 1111 1111 1111"):
        assert value not in sent
    assert fs.requests[0].body["messages"][1]["content"] == (
        "I am Jane, mail <EMAIL_2> or call <PHONE_1>; card <CARD_1>."
    )
    assert request["messages"][1]["content"] == PII_TEXT  # the caller's body is untouched


def test_pii_restored_in_a_stream(fs: FaultServer) -> None:
    client = make_client(fs.url)
    stream = client.astream_chat(body(PII_TEXT))
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in read(client, stream) if c["choices"]
    )
    assert text.strip() == PII_TEXT
    assert "jane.roe" not in json.dumps(fs.requests[0].body)


def test_pii_in_tool_call_arguments_is_redacted(fs: FaultServer) -> None:
    client = make_client(fs.url)
    request = body("ok")
    request["messages"].insert(
        0,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_Xy7pQ2rT9uV4wZ1aB3cD5eF7",
                    "type": "function",
                    "function": {"name": "send_mail", "arguments": '{"to": "bob@example.org"}'},
                }
            ],
        },
    )
    chat(client, request)
    sent = fs.requests[0].body["messages"][0]["tool_calls"][0]
    assert sent["function"]["arguments"] == '{"to": "<EMAIL_1>"}'
    assert sent["id"] == "call_Xy7pQ2rT9uV4wZ1aB3cD5eF7"  # structure is not redacted


def test_refuse_mode_sends_nothing(fs: FaultServer) -> None:
    client = make_client(fs.url, redaction="refuse")
    with pytest.raises(BadRequestError) as info:
        chat(client, body(PII_TEXT))
    assert info.value.code == "pii_refused"
    assert fs.requests == []
    chat(client, body("nothing personal here"))
    assert len(fs.requests) == 1


def test_off_mode_sends_as_is(fs: FaultServer) -> None:
    client = make_client(fs.url, redaction="off")
    result = chat(client, body(PII_TEXT))
    assert fs.requests[0].body["messages"][0]["content"] == PII_TEXT
    assert result.redactions == {}


def test_api_key_from_env_is_sent_and_never_logged(
    fs: FaultServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-test-SECRETKEY1234567890abcdef"
    client = make_client(fs.url, api_key_env="TEST_REMOTE_KEY", max_retries=1)
    monkeypatch.delenv("TEST_REMOTE_KEY", raising=False)
    assert not client.is_available("gpt-test")
    with pytest.raises(UnavailableError, match=r"\$TEST_REMOTE_KEY"):
        chat(client, body())
    monkeypatch.setenv("TEST_REMOTE_KEY", key)
    caplog.set_level(logging.DEBUG)
    fs.push(Fault.status(500))
    chat(client, body())
    assert fs.requests[-1].headers["Authorization"] == f"Bearer {key}"
    assert key not in caplog.text
    assert key not in repr(client.settings)


# -- choosing a provider and settings ---------------------------------------------------------------------


def test_provider_selection_and_escalation_model(fs: FaultServer) -> None:
    settings = RemoteSettings(
        providers=[
            RemoteProvider(name="a", base_url=fs.url, models=["gpt-4o", "gpt-4o-mini"]),
            RemoteProvider(name="b", base_url=fs.url, models=["*"], escalation_model="claude-x"),
        ],
        default_provider="b",
    )
    client = RemoteClient(settings)
    assert client.provider_for("gpt-4o").name == "a"
    assert client.provider_for("something-else").name == "b"
    assert client.provider_for("gpt-4o", escalation=True).name == "b"
    chat(
        client, {"model": "extract-invoice", "messages": [{"role": "user", "content": "x"}]}, escalation=True
    )
    assert fs.requests[-1].body["model"] == "claude-x"
    chat(client, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert fs.requests[-1].body["model"] == "gpt-4o"


def test_no_provider_means_unavailable() -> None:
    client = RemoteClient(RemoteSettings())
    assert not client.is_available("gpt-4o")
    with pytest.raises(UnavailableError):
        chat(client, body())


def test_remote_settings_from_env_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_AGENT_REMOTE__DAILY_TOKEN_BUDGET", "1234")
    monkeypatch.setenv(
        "SLM_AGENT_REMOTE__PROVIDERS",
        '[{"name": "oa", "base_url": "https://api.example/v1", "api_key_env": "K"}]',
    )
    settings = Settings()
    assert settings.remote.daily_token_budget == 1234
    assert settings.remote.providers[0].redaction == "redact"
    with pytest.raises(ValueError, match="default_provider"):
        RemoteSettings(providers=[RemoteProvider(name="a", base_url="http://x")], default_provider="zz")
