"""/v1/responses on a real daemon through the official openai client: answered by the chat
completions path (traced, routed like chat), continued with previous_response_id, streamed as the
SDK's events; an unknown model id proxied to a real remote (llama-cpp-python's server)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from conftest import Daemon
from remote_fixtures import provider, remote_env, start_daemon

from slm_agent.models import BUNDLED_NAME, ModelStore

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, shared_store: ModelStore, llama_server: str
) -> Iterator[Daemon]:
    env = remote_env([provider("llama", llama_server, ["gpt-4o-mini"])])
    d = start_daemon(tmp_path_factory.mktemp("responses-home"), shared_store, env)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_text_is_a_traced_chat_call(daemon: Daemon, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=BUNDLED_NAME,
        instructions="Answer briefly.",
        input="Name a color.",
        max_output_tokens=12,
        temperature=0,
    )
    response = raw.parse()
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output_text and response.output[0].type == "message"
    assert response.usage and 0 < response.usage.output_tokens <= 12
    assert raw.headers["x-slm-route"] == "local"
    row = daemon.trace(raw.headers["x-slm-trace-id"])
    assert row["endpoint"] == "responses" and row["status"] == 200
    assert json.loads(row["request"]) == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a color."},
    ]
    assert client.responses.retrieve(response.id).output_text == response.output_text


# ~10 s alone, >30 s on a busy 2-core box: a tool-call prompt and grammar-bound decoding.
@pytest.mark.slow
def test_function_call_then_its_output_continues_the_conversation(
    daemon: Daemon, client: openai.OpenAI
) -> None:
    first = client.responses.create(
        model=BUNDLED_NAME,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Is it cold in Oslo?"}]}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["unit"] in ("c", "f")
    raw = client.responses.with_raw_response.create(
        model=BUNDLED_NAME,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp_c": -3}'}],
        max_output_tokens=16,
    )
    follow_up = raw.parse()
    assert follow_up.previous_response_id == first.id and follow_up.output_text
    sent = json.loads(daemon.trace(raw.headers["x-slm-trace-id"])["request"])
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == calls[0].call_id == sent[2]["tool_call_id"]


def test_stream_parses_into_the_final_response(client: openai.OpenAI) -> None:
    # A short answer that ends by itself: one cut at max_output_tokens ends in response.incomplete,
    # on which the SDK (as with OpenAI) has no final response to give.
    with client.responses.stream(
        model=BUNDLED_NAME,
        instructions="Answer with one word.",
        input="Is the sky blue? Answer yes or no.",
        max_output_tokens=24,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and final.output_text == deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert client.responses.retrieve(final.id).output_text == deltas


# ~10 s alone, >30 s on a busy 2-core box: a tool-call prompt and grammar-bound decoding.
@pytest.mark.slow
def test_stream_of_a_function_call(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model=BUNDLED_NAME,
        input="Is it cold in Oslo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        stream=True,
    )
    events = list(stream)
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    completed = events[-1]
    assert completed.type == "response.completed"
    call = completed.response.output[0]
    assert call.type == "function_call" and call.arguments == done.arguments
    json.loads(done.arguments)


def test_store_false_and_unknown_ids(client: openai.OpenAI) -> None:
    kept_out = client.responses.create(model=BUNDLED_NAME, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept_out.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=BUNDLED_NAME, input="Hi", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=BUNDLED_NAME, input="Hi", tools=[{"type": "web_search"}])  # type: ignore[list-item]


def test_unknown_model_is_proxied_to_the_remote(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="Say hello.", max_output_tokens=8
    )
    assert (raw.headers["x-slm-route"], raw.headers["x-slm-route-reason"]) == ("remote", "proxy")
    response = raw.parse()
    assert response.output[0].type == "message" and response.usage and response.usage.input_tokens > 0
    stream = client.responses.create(
        model="gpt-4o-mini", input="Say hello.", max_output_tokens=8, stream=True
    )
    assert stream.response.headers["x-slm-route"] == "remote"
    kinds = [e.type for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
