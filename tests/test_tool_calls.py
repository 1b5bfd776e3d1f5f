"""Tool calls as agents use them, on the bundled base with its generic prompt format: several calls
in one answer (parallel_tool_calls), exactly one when it is false, streamed as OpenAI streams call
deltas (the openai client's accumulation rebuilds the answer), and escalation when the local call
breaks the task's contract. The reader that turns an answer's text into calls is tested on text."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from conftest import Daemon
from faultserver import FaultServer
from pydantic import ValidationError
from remote_fixtures import API_KEY_ENV, provider, remote_env, start_daemon, write_task

from slm_agent.contracts.api import ChatCompletionRequest
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import EXAMPLE_END, builtin_tasks
from slm_agent.errors import SchemaError
from slm_agent.models import BUNDLED_NAME, ModelStore
from slm_agent.models.manifest import PromptFormat
from slm_agent.runtime.engine import GenerationRequest, GenerationResult, grammars
from slm_agent.runtime.routing.review import local_failure
from slm_agent.runtime.serving import responses
from slm_agent.runtime.serving.context import Job, Target
from slm_agent.runtime.serving.tool_calls import CallReader, read_calls


def tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    function = {"name": name, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


WEATHER = tool("get_weather", "Current weather for a city", {"city": {"type": "string"}})
EMAIL = tool(
    "send_email",
    "Send an email",
    {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
)
TOOLS = [WEATHER, EMAIL]
TWO_CITIES = [{"role": "user", "content": "Weather in Paris and in Rome?"}]
TOOL_CALL = {t.name: t for t in builtin_tasks()}["tool_call"]

# The tool_call task's contract, with a budget no call fits in: every local answer is cut short.
CUT_SHORT = """
kind = "tool_call"
routing = "auto"
instructions = "Call the tools that serve the request."
input_label = "Request"
output_label = "Call"
[sampling]
max_tokens = 4
"""


@pytest.fixture(scope="module")
def daemon(
    fault_server: FaultServer, shared_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """The bundled base, with the fault server as the remote that local answers escalate to."""
    home = tmp_path_factory.mktemp("tool-calls-home")
    write_task(home / "tasks", "cut_short", CUT_SHORT)
    faulty = provider(
        "faulty", fault_server.url, ["fault-model"], escalation_model="fault-model", api_key_env=API_KEY_ENV
    )
    env = remote_env([faulty], default_provider="faulty")
    env["SLM_AGENT_TASKS_DIR"] = str(home / "tasks")
    d = start_daemon(home, shared_store, env)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", timeout=120, max_retries=0)


def ask(client: openai.OpenAI, **kwargs: Any) -> Any:
    fields: dict[str, Any] = {"model": BUNDLED_NAME, "messages": TWO_CITIES, "tools": TOOLS, "temperature": 0}
    return client.chat.completions.create(**(fields | kwargs))


def check_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    """Each call names an offered tool with arguments valid against its schema; ids are unique."""
    assert calls and len({c.id for c in calls}) == len(calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    found = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, schemas[call.function.name])
        found.append((call.function.name, arguments))
    return found


# -- the real daemon -------------------------------------------------------------------------------


def test_two_cities_get_a_call_each_in_order(daemon: Daemon, client: openai.OpenAI) -> None:
    answer = ask(client, tool_choice="required")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    # Measured: greedy, the bundled base calls get_weather for Paris, then for Rome.
    assert check_calls(choice.message.tool_calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    row = daemon.trace(answer.id)
    assert [c["id"] for c in json.loads(row["tool_calls"])] == [c.id for c in choice.message.tool_calls]
    assert json.loads(row["output"]) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}},
    ]


def test_parallel_tool_calls_false_gives_exactly_one_call(client: openai.OpenAI) -> None:
    for choice in ("required", "auto", {"type": "function", "function": {"name": "get_weather"}}):
        answer = ask(client, tool_choice=choice, parallel_tool_calls=False)
        calls = answer.choices[0].message.tool_calls
        assert len(calls) == 1, (choice, calls)
        assert check_calls(calls) == [("get_weather", {"city": "Paris"})]


def test_a_named_tool_holds_every_call_to_it(client: openai.OpenAI) -> None:
    answer = ask(
        client,
        messages=[{"role": "user", "content": "Weather in Oslo? Email sam@example.com that I'm coming."}],
        tool_choice={"type": "function", "function": {"name": "send_email"}},
    )
    assert {name for name, _ in check_calls(answer.choices[0].message.tool_calls)} == {"send_email"}


def test_streamed_call_deltas_rebuild_the_answer(client: openai.OpenAI) -> None:
    whole = ask(client, tool_choice="required")
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert len(expected) == 2
    chunks = list(ask(client, tool_choice="required", stream=True))
    deltas = [(c, d) for c in chunks for choice in c.choices for d in choice.delta.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for _, delta in deltas:
        assert delta.function is not None
        if delta.index not in names:  # a call's first chunk: id, type, name, empty arguments
            assert delta.id and delta.type == "function" and delta.function.name
            assert delta.function.arguments == "" and delta.index == len(names)
            names[delta.index], arguments[delta.index] = delta.function.name, ""
        else:  # then pieces of its arguments, and nothing else
            assert delta.id is None and delta.function.name is None and delta.function.arguments
            arguments[delta.index] += delta.function.arguments
    assert [(names[i], arguments[i]) for i in sorted(names)] == expected
    # The arguments come in pieces as the engine writes them, not as one piece per call.
    assert len(deltas) > 2 * len(expected)
    # The openai client's own accumulation (the stream helper) rebuilds the same calls.
    with client.chat.completions.stream(
        model=BUNDLED_NAME,
        messages=TWO_CITIES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or []] == expected
    check_calls(message.tool_calls)


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    answer = ask(client, tool_choice="none", max_tokens=16)
    assert not answer.choices[0].message.tool_calls and answer.choices[0].message.content


def test_a_cut_short_local_call_escalates(daemon: Daemon, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="task:cut_short",
        messages=TWO_CITIES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[list-item]
    )
    assert (raw.headers["x-slm-route"], raw.headers["x-slm-route-reason"]) == ("remote", "validation")
    local, remote = json.loads(daemon.trace(raw.headers["x-slm-trace-id"])["attempts"])
    assert local["route"] == "local" and "truncated" in local["failure"]
    assert remote["route"] == "remote"


def test_parallel_tool_calls_is_validated(daemon: Daemon) -> None:
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]).parallel_tool_calls
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": "sometimes"}
        )
    with daemon.client() as http:
        body = {"model": BUNDLED_NAME, "messages": TWO_CITIES, "tools": TOOLS, "parallel_tool_calls": [1]}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "parallel_tool_calls"


# -- the reader, the grammars and the chunks, on text ------------------------------------------------

LINES = (
    '{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "days": [1, {"n": 2}]}}'
    + TOOL_CALL.call_separator()
    + '{"arguments": {"to": "a@b.example", "subject": "}{", "body": "x"}, "name": "send_email"}'
)


@pytest.mark.parametrize("text", [LINES, "[" + LINES.replace(TOOL_CALL.call_separator(), ", ") + "]"])
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_pieces_add_up_to_the_finished_calls(text: str, size: int) -> None:
    reader = CallReader()
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for start in range(0, len(text), size):
        for delta in reader.feed(text[start : start + size]):
            if delta.name is not None:
                assert delta.index not in names  # a call's name comes once, in its first delta
                names[delta.index], arguments[delta.index] = delta.name, ""
            arguments[delta.index] += delta.arguments
    finished = read_calls(text)
    assert [(names[i], arguments[i]) for i in sorted(names)] == [(n, a) for n, a, _ in finished]
    assert [json.loads(a) for _, a, _ in finished] == [
        {"city": 'Pa"ris', "days": [1, {"n": 2}]},
        {"to": "a@b.example", "subject": "}{", "body": "x"},
    ]


@pytest.mark.parametrize(
    "text", ["", "I would call get_weather", '{"name": "get_weather", "arguments": {"ci', '{"arguments": {}}']
)
def test_an_answer_that_is_not_whole_calls_is_a_schema_error(text: str) -> None:
    with pytest.raises(SchemaError):
        read_calls(text)


def test_call_grammars_compile_for_both_engines() -> None:
    lines = grammars.task_grammar(TOOL_CALL, TOOLS, parallel=True)
    array = grammars.tool_call_grammar(TOOLS, parallel=True)
    single = grammars.task_grammar(TOOL_CALL, TOOLS)
    assert lines is not None and single is not None
    assert len({lines.key, array.key, single.key}) == 3
    assert grammars.task_grammar(TOOL_CALL, TOOLS, parallel=True) is lines  # compiled once
    for constraint in (lines, array):
        assert constraint.engine == "llguidance"
        assert constraint.gbnf() is not None  # the GBNF fallback builds too
    # A chat-form task's adapter learned one call per answer: it keeps one call.
    chat_form = TOOL_CALL.model_copy(update={"form": "chat"})
    assert grammars.task_grammar(chat_form, TOOLS, parallel=True) is single
    assert TOOL_CALL.call_separator() == "\nCall: " and EXAMPLE_END == "\n\n"


def job(kind: str, *, parallel: bool = True) -> Job:
    target = Target(BUNDLED_NAME, TOOL_CALL, None, 1.0, PromptFormat())
    trace, gen = TraceRecord(endpoint="chat.completions"), GenerationRequest("", "")
    return Job("chat.completions", target, gen, trace, kind, TOOLS, parallel_tool_calls=parallel)


def result(text: str, finish: str = "stop") -> GenerationResult:
    return GenerationResult(text, finish, 10, 5, 0, 0.0, 1.0, 2.0)


def test_answers_of_several_calls_are_numbered_and_reviewed() -> None:
    answer = responses.chat_answer(job("tool_call"), result(LINES))
    calls = answer.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "send_email"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert local_failure(TOOL_CALL, job("tool_call"), result(LINES)) is None
    wrong = LINES.replace('"Pa\\"ris"', "5")  # the second call is fine, the first is not
    assert "not of type 'string'" in (local_failure(TOOL_CALL, job("tool_call"), result(wrong)) or "")
    assert "truncated" in (local_failure(TOOL_CALL, job("tool_call"), result(LINES, "length")) or "")
    assert "not a tool call" in (local_failure(TOOL_CALL, job("tool_call"), result("Paris")) or "")


def test_a_templated_answer_keeps_one_call_when_parallel_calls_are_off() -> None:
    text = (
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]</tool_call>'
    )
    assert len(responses.chat_answer(job("tool_text"), result(text)).tool_calls or []) == 2
    assert len(responses.chat_answer(job("tool_text", parallel=False), result(text)).tool_calls or []) == 1


def test_a_finished_answer_is_replayed_as_call_deltas() -> None:
    calls, finished = job("tool_call"), result(LINES)
    answer = responses.chat_answer(calls, finished)
    response = responses.chat_completion(calls, finished, answer).model_dump(exclude_none=True)

    async def replayed() -> list[bytes]:
        return [e async for e in responses.replay_as_stream(response)]

    events = asyncio.run(replayed())
    chunks = [json.loads(e[len(b"data: ") :]) for e in events if e.startswith(b"data: {")]
    pieces = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [p["index"] for p in pieces] == [0, 0, 1, 1]
    assert pieces[0]["function"] == {"name": "get_weather", "arguments": ""} and pieces[0]["id"]
    assert "id" not in pieces[1] and json.loads(pieces[1]["function"]["arguments"])["city"] == 'Pa"ris'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
