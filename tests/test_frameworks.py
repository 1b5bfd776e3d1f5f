"""Real agent frameworks against the real daemon: the OpenAI Agents SDK through ``/v1/responses``
(its default model class) and LangChain's ``ChatOpenAI`` with bound tools through
``/v1/chat/completions``. Planning goes to the scripted remote (``tool_remote.py``), whose tool calls
and final answer are known, as a model id only the remote serves; the bundled base answers what
it can (a forced call, then text after the tool's result)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from conftest import Daemon
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from remote_fixtures import provider, remote_env, start_daemon
from tool_remote import FINAL, REMOTE_MODEL, WEATHER_C, ToolRemote, fahrenheit

from slm_agent.models import BUNDLED_NAME, ModelStore

# Nothing leaves the machine: the SDK would otherwise export its traces to OpenAI.
set_tracing_disabled(True)

QUESTION = "What is the weather in Oslo, in Fahrenheit?"
EXPECTED = FINAL.format(
    city="Oslo", celsius=float(WEATHER_C["Oslo"]), fahrenheit=fahrenheit(WEATHER_C["Oslo"])
)


@pytest.fixture(scope="module")
def remote() -> Iterator[ToolRemote]:
    scripted = ToolRemote()
    with scripted:
        yield scripted


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, shared_store: ModelStore, remote: ToolRemote
) -> Iterator[Daemon]:
    env = remote_env([provider("scripted", remote.url, [REMOTE_MODEL])])
    d = start_daemon(tmp_path_factory.mktemp("frameworks-home"), shared_store, env)
    yield d
    d.stop()


class WeatherTools:
    """The agent's two tools, recording every call they get."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get_weather(self, city: str) -> str:
        self.calls.append(("get_weather", {"city": city}))
        return str(WEATHER_C.get(city, 20))

    def to_fahrenheit(self, celsius: float) -> str:
        self.calls.append(("to_fahrenheit", {"celsius": celsius}))
        return str(fahrenheit(celsius))


_CLIENTS: list[AsyncOpenAI] = []


def run_closing(coro: Any) -> Any:
    """``asyncio.run``, closing the SDK clients made meanwhile in the same loop: one left to the
    garbage collector closes its sockets in whatever loop runs then, and fails that other test."""

    async def main() -> Any:
        try:
            return await coro
        finally:
            while _CLIENTS:
                await _CLIENTS.pop().close()

    return asyncio.run(main())


def sdk_agent(daemon: Daemon, tools: WeatherTools, model: str, **settings: Any) -> Agent[Any]:
    @function_tool
    def get_weather(city: str) -> str:
        """Current temperature in degrees Celsius for a city."""
        return tools.get_weather(city)

    @function_tool
    def to_fahrenheit(celsius: float) -> str:
        """Convert degrees Celsius to degrees Fahrenheit."""
        return tools.to_fahrenheit(celsius)

    client = AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
    _CLIENTS.append(client)
    return Agent(
        name="weather",
        instructions="Answer weather questions with the tools.",
        tools=[get_weather, to_fahrenheit],
        model=OpenAIResponsesModel(model=model, openai_client=client),
        model_settings=ModelSettings(**settings),
    )


def traces(daemon: Daemon, after_seq: int) -> list[dict[str, Any]]:
    """The daemon's traces newer than ``after_seq``, oldest first, as GET /v1/traces lists them."""
    items = httpx.get(f"{daemon.url}/v1/traces", params={"limit": 50}).json()["items"]
    return sorted((t for t in items if t["seq"] > after_seq), key=lambda t: t["seq"])


def last_seq(daemon: Daemon) -> int:
    items = httpx.get(f"{daemon.url}/v1/traces", params={"limit": 1}).json()["items"]
    return items[0]["seq"] if items else 0


def assert_remote_loop(daemon: Daemon, tools: WeatherTools, since: int, endpoint: str) -> None:
    """Both tools called once with the script's arguments, and each of the three model calls traced."""
    assert tools.calls == [
        ("get_weather", {"city": "Oslo"}),
        ("to_fahrenheit", {"celsius": float(WEATHER_C["Oslo"])}),
    ]
    made = traces(daemon, since)
    assert [(t["endpoint"], t["route"], t["model"], t["status"]) for t in made] == [
        (endpoint, "remote", REMOTE_MODEL, 200)
    ] * 3


def test_agents_sdk_runs_two_tools_to_the_final_answer(daemon: Daemon) -> None:
    tools = WeatherTools()
    since = last_seq(daemon)
    result = run_closing(Runner.run(sdk_agent(daemon, tools, REMOTE_MODEL), QUESTION))
    assert result.final_output == EXPECTED
    assert_remote_loop(daemon, tools, since, "responses")


def test_agents_sdk_streamed_run(daemon: Daemon) -> None:
    tools = WeatherTools()
    since = last_seq(daemon)

    async def run() -> tuple[Any, list[str], set[str]]:
        streamed = Runner.run_streamed(sdk_agent(daemon, tools, REMOTE_MODEL), QUESTION)
        kinds: list[str] = []
        raw: set[str] = set()
        async for event in streamed.stream_events():
            if event.type == "run_item_stream_event":
                kinds.append(event.item.type)
            elif event.type == "raw_response_event":
                raw.add(event.data.type)
        return streamed, kinds, raw

    streamed, kinds, raw = run_closing(run())
    assert streamed.final_output == EXPECTED
    # The answers came as the daemon's Responses events, not as one replayed body.
    assert {"response.function_call_arguments.delta", "response.output_text.delta"} <= raw
    assert kinds == [
        "tool_call_item",
        "tool_call_output_item",
        "tool_call_item",
        "tool_call_output_item",
        "message_output_item",
    ]
    assert_remote_loop(daemon, tools, since, "responses")


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run_streamed"])
def test_agents_sdk_on_the_bundled_model_calls_a_forced_tool_then_answers(
    daemon: Daemon, stream: bool
) -> None:
    # The SDK resets a forced tool_choice once the tool ran, so the next turn may answer in text:
    # after a tool result the bundled base does. Room and temperature 0 to end by itself every
    # run: a turn cut at max_output_tokens is response.incomplete, which the SDK raises on.
    tools = WeatherTools()
    since = last_seq(daemon)
    # One call a turn: the question names one city, and the tiny base given room for parallel
    # calls may repeat it.
    agent = sdk_agent(
        daemon,
        tools,
        BUNDLED_NAME,
        tool_choice="get_weather",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    result = run_closing(run_agent(agent, stream))
    assert [name for name, _ in tools.calls] == ["get_weather"]
    assert isinstance(tools.calls[0][1]["city"], str)
    assert isinstance(result.final_output, str)
    made = traces(daemon, since)
    assert [(t["endpoint"], t["route"], t["model"], t["status"]) for t in made] == [
        ("responses", "local", BUNDLED_NAME, 200)
    ] * 2
    # Regression: a local answer's stream read only up to [DONE] was closed later as abandoned,
    # and its trace written a second time (a UNIQUE failure in the daemon's log).
    httpx.get(f"{daemon.url}/healthz")
    assert "UNIQUE constraint failed" not in daemon.log()


async def run_agent(agent: Agent[Any], stream: bool) -> Any:
    if not stream:
        return await Runner.run(agent, QUESTION)
    streamed = Runner.run_streamed(agent, QUESTION)
    async for _ in streamed.stream_events():
        pass
    return streamed


def langchain_tools(tools: WeatherTools) -> list[Any]:
    @tool
    def get_weather(city: str) -> str:
        """Current temperature in degrees Celsius for a city."""
        return tools.get_weather(city)

    @tool
    def to_fahrenheit(celsius: float) -> str:
        """Convert degrees Celsius to degrees Fahrenheit."""
        return tools.to_fahrenheit(celsius)

    return [get_weather, to_fahrenheit]


def chat_model(daemon: Daemon, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=f"{daemon.url}/v1", api_key="unused", temperature=0, max_retries=0, timeout=120
    )


def tool_loop(llm: Any, bound: list[Any], messages: list[BaseMessage], stream: bool = False) -> AIMessage:
    """Call, run the tools it asked for, send their results back, until it answers in text."""
    by_name = {t.name: t for t in bound}
    for _ in range(4):
        if stream:
            chunks = list(llm.stream(messages))
            answer: Any = chunks[0]
            for chunk in chunks[1:]:
                answer = answer + chunk
        else:
            answer = llm.invoke(messages)
        messages.append(answer)
        if not answer.tool_calls:
            return AIMessage(content=answer.content)
        for call in answer.tool_calls:
            result = by_name[call["name"]].invoke(call)
            assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
            messages.append(result)
    raise AssertionError(f"no final answer after 4 turns: {messages}")


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_langchain_tool_loop_through_the_remote(daemon: Daemon, stream: bool) -> None:
    tools = WeatherTools()
    since = last_seq(daemon)
    bound = langchain_tools(tools)
    llm = chat_model(daemon, REMOTE_MODEL).bind_tools(bound)
    final = tool_loop(llm, bound, [HumanMessage(QUESTION)], stream=stream)
    assert final.content == EXPECTED
    assert_remote_loop(daemon, tools, since, "chat.completions")


def test_langchain_tool_loop_on_the_bundled_model(daemon: Daemon) -> None:
    tools = WeatherTools()
    since = last_seq(daemon)
    bound = langchain_tools(tools)
    llm = chat_model(daemon, BUNDLED_NAME)
    messages: list[BaseMessage] = [HumanMessage(QUESTION)]
    # The base cannot weigh which tool a turn needs: each call is forced, as an agent pins a step.
    for name in ("get_weather", "to_fahrenheit"):
        call = llm.bind_tools(bound, tool_choice=name, parallel_tool_calls=False).invoke(messages)
        assert [c["name"] for c in call.tool_calls] == [name], call
        messages.append(call)
        messages.append(next(t for t in bound if t.name == name).invoke(call.tool_calls[0]))
    final = llm.bind_tools(bound).invoke(messages, max_tokens=24)
    assert not final.tool_calls and isinstance(final.content, str) and final.content
    assert [name for name, _ in tools.calls] == ["get_weather", "to_fahrenheit"]
    assert isinstance(tools.calls[0][1]["city"], str) and isinstance(tools.calls[1][1]["celsius"], float)
    made = traces(daemon, since)
    assert [(t["endpoint"], t["route"], t["model"], t["status"]) for t in made] == [
        ("chat.completions", "local", BUNDLED_NAME, 200)
    ] * 3
