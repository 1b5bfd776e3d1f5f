"""The generated agent and its scripted teacher, before the loop's test relies on them: the traffic
is varied but one template per step, the teacher is right by the agent's own scoring (and wrong on
cue), and it answers the same through the official SDK, streamed or not, and through the daemon's
own redacting remote client."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from agent_sim import (
    PLANNING,
    SUBTASKS,
    SYSTEM_PROMPTS,
    AgentCall,
    generate_calls,
    ground_truth,
    is_correct,
    run_agent,
    summarize,
)
from openai.lib.streaming.chat import ChatCompletionStreamState
from teacher import PLAN, Teacher, teacher_answer

from slm_agent.contracts.signature import request_content, template_signature
from slm_agent.runtime.remote.client import RemoteClient
from slm_agent.runtime.remote.settings import RemoteProvider, RemoteSettings

N = 40


@pytest.fixture(scope="module")
def calls() -> list[AgentCall]:
    return generate_calls(N, 15, seed=0)


@pytest.fixture(scope="module")
def teacher() -> Iterator[Teacher]:
    with Teacher() as t:
        yield t


def of(calls: list[AgentCall], subtask: str) -> list[AgentCall]:
    return [c for c in calls if c.subtask == subtask]


def signature(call: AgentCall) -> str:
    body = call.body
    return template_signature(body["messages"], body.get("tools"), body.get("response_format"))


def one_each(calls: list[AgentCall]) -> list[AgentCall]:
    return [of(calls, s)[0] for s in (*SUBTASKS, PLANNING)]


# -- the generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic_shuffled_and_varied(calls: list[AgentCall]) -> None:
    assert generate_calls(N, 15, seed=0) == calls
    assert generate_calls(N, 15, seed=1) != calls
    assert Counter(c.subtask for c in calls) == {**dict.fromkeys(SUBTASKS, N), PLANNING: 15}
    assert [c.subtask for c in calls[:12]] != sorted(c.subtask for c in calls[:12])  # interleaved
    for subtask in (*SUBTASKS, PLANNING):
        mine = of(calls, subtask)
        assert len({request_content(c.body["messages"]) for c in mine}) == len(mine)  # all distinct
        assert {c.body["messages"][0]["content"] for c in mine} == {SYSTEM_PROMPTS[subtask]}
        assert {c.body["model"] for c in mine} == {"gpt-4o"}
    # Every tool, label and contact shape shows up, in balance.
    tools = Counter(c.expected["tool_calls"][0]["name"] for c in of(calls, "pick_tool"))
    assert len(tools) == 4 and min(tools.values()) == N // 4
    labels = Counter(c.expected["content"] for c in of(calls, "classify_ticket"))
    assert set(labels) == {"billing", "bug", "account"} and min(labels.values()) >= N // 3
    phones = Counter(json.loads(c.expected["content"])["phone"] is None for c in of(calls, "extract_contact"))
    assert min(phones[True], phones[False]) >= N // 2 - 3


def test_each_step_has_one_template_signature(calls: list[AgentCall]) -> None:
    signatures = {s: {signature(c) for c in of(calls, s)} for s in (*SUBTASKS, PLANNING)}
    assert all(len(sigs) == 1 for sigs in signatures.values()), signatures
    assert len(set.union(*signatures.values())) == 4


def test_ground_truth_is_recomputed_from_the_request_alone(calls: list[AgentCall]) -> None:
    for call in calls:
        assert ground_truth(json.loads(json.dumps(call.body))) == (call.subtask, call.expected)
    stranger = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What's the weather in Paris?"}]}
    assert ground_truth(stranger) is None
    assert teacher_answer(stranger)["content"]  # a remote answers whatever it is asked


# -- scoring -----------------------------------------------------------------------------------------


def test_teacher_answers_are_correct_and_drift_makes_them_wrong(calls: list[AgentCall]) -> None:
    for call in calls:
        assert is_correct(call, teacher_answer(call.body)), call
        drifted = teacher_answer(call.body, drift=True)
        assert is_correct(call, drifted) == (call.subtask == PLANNING), (call, drifted)
    assert teacher_answer(of(calls, PLANNING)[0].body)["content"] == PLAN


def tool_message(name: str, arguments: str) -> dict[str, Any]:
    return {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}]}  # fmt: skip


def test_is_correct_compares_parsed_values() -> None:
    tool = AgentCall("pick_tool", {}, {"tool_calls": [{"name": "set_timer", "arguments": {"minutes": 5}}]})
    assert is_correct(tool, tool_message("set_timer", '{ "minutes" : 5 }'))
    for wrong in (
        tool_message("set_timer", '{"minutes": "5"}'),  # a string where the schema says integer
        tool_message("set_timer", '{"minutes": 6}'),
        tool_message("get_weather", '{"minutes": 5}'),
        tool_message("set_timer", '{"minutes": 5'),  # not JSON
        {"role": "assistant", "content": '{"minutes": 5}'},  # text, not a call
    ):
        assert not is_correct(tool, wrong), wrong
    two = tool_message("set_timer", '{"minutes": 5}')
    two["tool_calls"] *= 2
    assert not is_correct(tool, two)

    contact = AgentCall(
        "extract_contact", {}, {"content": '{"name": "Ana Ruiz", "email": "a@x.example", "phone": null}'}
    )
    assert is_correct(contact, {"content": ' {"email":"a@x.example","name":"Ana Ruiz"}\n'})  # order, null
    assert not is_correct(contact, {"content": '{"name": "Ana", "email": "a@x.example", "phone": null}'})
    assert not is_correct(contact, {"content": "Ana Ruiz, a@x.example"})

    label = AgentCall("classify_ticket", {}, {"content": "bug"})
    assert is_correct(label, {"content": " bug\n"})
    assert not is_correct(label, {"content": "billing"})
    assert not is_correct(label, {"content": None})

    plan = AgentCall(PLANNING, {}, {"content": None})
    assert is_correct(plan, {"content": "1. Start."}) and not is_correct(plan, {"content": " "})


def calls_of(message: Any) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]


# -- over HTTP ---------------------------------------------------------------------------------------


def test_teacher_over_the_sdk_plain_and_streamed(teacher: Teacher, calls: list[AgentCall]) -> None:
    client = openai.OpenAI(base_url=teacher.url, api_key="sk-unused", max_retries=0)
    for call in one_each(calls):
        want = teacher_answer(call.body)
        plain = client.chat.completions.create(**call.body)
        assert plain.choices[0].message.model_dump(exclude_none=True) == {
            k: v for k, v in want.items() if v is not None
        }
        assert plain.choices[0].finish_reason == ("tool_calls" if want.get("tool_calls") else "stop")
        assert plain.usage is not None and plain.usage.completion_tokens > 0

        state = ChatCompletionStreamState()
        pieces = 0
        for chunk in client.chat.completions.create(
            **call.body, stream=True, stream_options={"include_usage": True}
        ):
            state.handle_chunk(chunk)
            pieces += 1
        streamed = state.get_final_completion()
        assert pieces > 3  # really streamed in pieces
        assert streamed.choices[0].message.content == plain.choices[0].message.content
        assert calls_of(streamed.choices[0].message) == calls_of(plain.choices[0].message)
        assert streamed.usage == plain.usage


def test_run_agent_reads_answers_and_teacher_counts_and_drifts(
    teacher: Teacher, calls: list[AgentCall]
) -> None:
    client = openai.OpenAI(base_url=teacher.url, api_key="sk-unused", max_retries=0)
    sample = [c for s in (*SUBTASKS, PLANNING) for c in of(calls, s)[:3]]
    before = teacher.calls.copy()
    results = run_agent(client, sample)
    assert all(r.correct and r.latency_ms > 0 for r in results)
    assert all(r.route == "" and r.trace_id == "" for r in results)  # no daemon in between
    assert teacher.calls - before == dict.fromkeys((*SUBTASKS, PLANNING), 3)
    summary = summarize(results)
    assert summary["pick_tool"]["correct"] == 1.0 and summary["pick_tool"]["local_share"] == 0.0

    teacher.drift()
    try:
        drifted = run_agent(client, sample)
    finally:
        teacher.drift(False)
    assert [r.call.subtask for r in drifted if r.correct] == [PLANNING] * 3


def test_teacher_behind_the_daemons_redacting_remote_client(teacher: Teacher, calls: list[AgentCall]) -> None:
    """The daemon sends the remote placeholders for emails and phones; the teacher copies them and
    the client puts the values back, so the agent still gets the right contact."""
    settings = RemoteSettings(providers=[RemoteProvider(name="teacher", base_url=teacher.url, max_retries=0)])
    client = RemoteClient(settings)
    contacts = of(calls, "extract_contact")

    async def ask_all() -> list[dict[str, Any]]:
        try:
            return [(await client.achat(c.body)).message for c in contacts]
        finally:
            await client.aclose()

    seen = len(teacher.requests)
    messages = asyncio.run(ask_all())
    assert all(is_correct(c, m) for c, m in zip(contacts, messages, strict=True))
    sent = [request_content(b["messages"]) for b in teacher.requests[seen:]]
    assert any("<EMAIL_1>" in text for text in sent)
    assert not any("@" in text for text in sent)
