"""Escalation end to end: the real daemon, the official openai client, llama-cpp-python's server as
the remote, the fault server for failures, and the traces in SQLite."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Daemon
from faultserver import Fault, FaultServer
from remote_fixtures import API_KEY_ENV, provider, remote_env, start_daemon, write_task

from slm_agent.models import BUNDLED_NAME, ModelStore

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
    "required": ["city"],
}
PII_TEXT = "Write to jane.roe@corp.example or call +1 415-555-0100 about card 4111 1111 1111 1111."

TASKS = {
    # kind=json, auto, and a cap too small for any answer: the local try is always truncated.
    "pick_city": f"""
kind = "json"
routing = "auto"
instructions = "Answer with the city the text is about."
output_schema = {json.dumps(CITY_SCHEMA).replace('":', '" =')}
[sampling]
max_tokens = 2
""",
    # A threshold no small model clears: every local answer is escalated on confidence.
    "mood": """
kind = "label"
routing = "auto"
labels = ["happy", "sad"]
confidence_threshold = -0.0001
instructions = "Is the message happy or sad?"
[sampling]
max_tokens = 8
""",
    "sentiment": """
kind = "label"
routing = "remote"
labels = ["positive", "negative"]
instructions = "Classify the sentiment of the message as positive or negative."
""",
}


@pytest.fixture(scope="module")
def daemon(
    llama_server: str,
    fault_server: FaultServer,
    shared_store: ModelStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Daemon]:
    """One daemon: llama server serves gpt-4o (and escalations), the fault server fault-model."""
    home = tmp_path_factory.mktemp("esc-home")
    for name, toml in TASKS.items():
        write_task(home / "tasks", name, toml)
    env = remote_env(
        [
            provider(
                "llama", llama_server, ["gpt-4o"], escalation_model="gpt-4o", api_key_env=API_KEY_ENV,
                price_per_1k_input=0.5, price_per_1k_output=1.5,
            ),
            provider("faulty", fault_server.url, ["fault-model"], timeout_s=10),
        ],
        default_provider="llama",
        breaker_failures=2,
        breaker_cooldown_s=1.5,
    )  # fmt: skip
    env["SLM_AGENT_TASKS_DIR"] = str(home / "tasks")
    d = start_daemon(home, shared_store, env)
    yield d
    d.stop()


def oa(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


def trace(daemon: Daemon, trace_id: str) -> dict[str, Any]:
    """The trace row with its JSON columns `attempts` and `redactions` decoded."""
    out = dict(daemon.trace(trace_id))
    for name in ("attempts", "redactions"):
        out[name] = json.loads(out[name]) if out[name] else None
    return out


def chat(daemon: Daemon, headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[Any, dict[str, str]]:
    raw = oa(daemon).chat.completions.with_raw_response.create(extra_headers=headers, **kwargs)
    return raw.parse(), dict(raw.headers)


def route_of(headers: dict[str, str]) -> tuple[str, str]:
    return headers["x-slm-route"], headers["x-slm-route-reason"]


USER = [{"role": "user", "content": "The capital of France is"}]


# -- proxy ---------------------------------------------------------------------------------------------


def test_proxy_passes_an_unserved_model_to_its_remote(daemon: Daemon) -> None:
    completion, headers = chat(daemon, model="gpt-4o", messages=USER, max_tokens=8)
    assert route_of(headers) == ("remote", "proxy")
    assert completion.choices[0].message.content is not None
    row = trace(daemon, headers["x-slm-trace-id"])
    assert (row["route"], row["route_reason"], row["model"]) == ("remote", "proxy", "gpt-4o")
    assert row["remote_model"] == "gpt-4o" and row["remote_latency_ms"] > 0
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["cost_usd"] > 0
    assert row["response"] == completion.choices[0].message.content
    assert [a["route"] for a in row["attempts"]] == ["remote"]


def test_proxy_streams_chunks_as_they_arrive(daemon: Daemon) -> None:
    stream = oa(daemon).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=12, stream=True)
    assert route_of(dict(stream.response.headers)) == ("remote", "proxy")
    trace_id = stream.response.headers["x-slm-trace-id"]
    arrivals, text = [], ""
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 0.01  # spread out, not one burst
    row = trace(daemon, trace_id)
    assert (row["route_reason"], row["stream"], row["status"]) == ("proxy", 1, 200)
    assert row["response"] == text and row["completion_tokens"] > 0


def test_a_model_no_remote_serves_is_still_404(daemon: Daemon) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oa(daemon).chat.completions.create(model="no-such-model", messages=USER)


# -- policy, planning -----------------------------------------------------------------------------------


def test_policy_header_sends_a_local_model_remote_or_keeps_it_local(daemon: Daemon) -> None:
    _, headers = chat(daemon, {"X-SLM-Route": "remote"}, model=BUNDLED_NAME, messages=USER, max_tokens=6)
    assert route_of(headers) == ("remote", "policy")
    assert trace(daemon, headers["x-slm-trace-id"])["remote_model"] == "gpt-4o"  # the escalation model
    _, headers = chat(daemon, {"X-SLM-Route": "local"}, model=BUNDLED_NAME, messages=USER, max_tokens=4)
    assert route_of(headers) == ("local", "policy")
    assert trace(daemon, headers["x-slm-trace-id"])["remote_model"] is None


def test_policy_task_routing_remote_gives_the_typed_output(daemon: Daemon) -> None:
    with daemon.client() as client:
        r = client.post("/v1/tasks/sentiment", json={"input": "I love this product, it works great"})
    assert r.status_code == 200, r.text
    assert (r.headers["x-slm-route"], r.headers["x-slm-route-reason"]) == ("remote", "policy")
    body = r.json()
    assert body["route"] == "remote" and body["output"] in ("positive", "negative")
    row = trace(daemon, body["id"])
    assert row["task"] == "sentiment" and row["remote_model"] == "gpt-4o"
    # The same task through the chat API: the agent's messages go to the remote as they are.
    _, headers = chat(daemon, model="task:sentiment", messages=USER, max_tokens=8)
    assert route_of(headers) == ("remote", "policy")


def test_planning_request_goes_remote(daemon: Daemon) -> None:
    messages = [
        {"role": "system", "content": "You are the planner: make a plan of the next steps."},
        {"role": "user", "content": "Ship the release."},
    ]
    _, headers = chat(daemon, model=BUNDLED_NAME, messages=messages, max_tokens=8)
    assert route_of(headers) == ("remote", "planning")


# -- validation, confidence -----------------------------------------------------------------------------


def test_invalid_local_answer_is_retried_remotely(daemon: Daemon) -> None:
    completion, headers = chat(
        daemon,
        model="task:pick_city",
        messages=[{"role": "user", "content": "The Eiffel Tower stands in"}],
        response_format={"type": "json_object", "schema": CITY_SCHEMA},
    )
    assert route_of(headers) == ("remote", "validation")
    assert json.loads(completion.choices[0].message.content)["city"] in ("Paris", "Oslo", "Lima")
    row = trace(daemon, headers["x-slm-trace-id"])
    local, remote = row["attempts"]
    assert local["route"] == "local" and "truncated" in local["failure"]
    assert remote["route"] == "remote" and remote["reason"] == "validation"


def test_invalid_local_task_output_escalates_through_the_task_api(daemon: Daemon) -> None:
    with daemon.client() as client:
        r = client.post("/v1/tasks/pick_city", json={"input": "The Eiffel Tower stands in"})
    assert r.status_code == 200, r.text
    assert r.headers["x-slm-route-reason"] == "validation"
    assert r.json()["output"]["city"] in ("Paris", "Oslo", "Lima")


def test_low_confidence_local_answer_escalates(daemon: Daemon) -> None:
    messages = [{"role": "user", "content": "I love sunny days!"}]
    _, headers = chat(daemon, model="task:mood", messages=messages, max_tokens=16)
    assert route_of(headers) == ("remote", "confidence")
    local, _ = trace(daemon, headers["x-slm-trace-id"])["attempts"]
    assert local["failure"] is None and local["mean_logprob"] < -0.0001


# -- the fault server: breaker, PII, broken streams ----------------------------------------------------


def test_breaker_opens_answers_offline_and_recovers(daemon: Daemon, fs: FaultServer) -> None:
    def ask() -> dict[str, str]:
        return chat(daemon, model="fault-model", messages=USER, max_tokens=3)[1]

    assert route_of(ask()) == ("remote", "proxy")  # a success first: no failures left over
    fs.push(Fault.status(500), Fault.status(500))
    for _ in range(2):
        headers = ask()
        assert route_of(headers) == ("local", "offline")
        attempts = trace(daemon, headers["x-slm-trace-id"])["attempts"]
        assert "HTTP 500" in attempts[0]["error"]
    sent = len(fs.requests)
    assert route_of(ask()) == ("local", "offline")  # breaker open: not even tried
    assert len(fs.requests) == sent
    time.sleep(1.6)
    assert route_of(ask()) == ("remote", "proxy")  # the probe succeeds; closed again
    assert len(fs.requests) == sent + 1


def test_pii_never_reaches_the_remote_and_is_restored(daemon: Daemon, fs: FaultServer) -> None:
    completion, headers = chat(daemon, model="fault-model", messages=[{"role": "user", "content": PII_TEXT}])
    sent = json.dumps(fs.requests[-1].body)
    for secret in ("jane.roe@corp.example", "415-555-0100", "4111 1111 1111 1111"):
        assert secret not in sent
        assert secret in completion.choices[0].message.content  # the echo, restored
    row = trace(daemon, headers["x-slm-trace-id"])
    assert row["redactions"] and sum(row["redactions"].values()) >= 3
    assert "jane.roe" not in json.dumps(row["redactions"])


def test_remote_stream_broken_midway_ends_in_an_error_event(daemon: Daemon, fs: FaultServer) -> None:
    fs.push(Fault.drop(after_chunks=3))
    stream = oa(daemon).chat.completions.create(
        model="fault-model",
        messages=[{"role": "user", "content": "one two three four five six"}],
        stream=True,
    )
    trace_id = stream.response.headers["x-slm-trace-id"]
    received = []
    with pytest.raises(openai.APIError, match="stream broke"):
        for chunk in stream:
            received.append(chunk)
    assert received  # some text did arrive before the break
    row = trace(daemon, trace_id)
    assert row["status"] == 502 and "stream broke" in row["error"]


def test_bad_route_header_is_a_400(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": BUNDLED_NAME, "messages": USER},
            headers={"X-SLM-Route": "moon"},
        )
    assert r.status_code == 400 and "X-SLM-Route" in r.json()["error"]["message"]


# -- budgets ---------------------------------------------------------------------------------------------


def test_budget_spent_answers_locally_when_policy_is_local(make_daemon: Any, fs: FaultServer) -> None:
    env = remote_env([provider("faulty", fs.url, ["fault-model"])], daily_token_budget=5)
    d = make_daemon(env=env)
    hello = [{"role": "user", "content": "hello there my friend"}]
    assert route_of(chat(d, model="fault-model", messages=hello)[1]) == ("remote", "proxy")
    _, headers = chat(d, model="fault-model", messages=hello, max_tokens=3)
    assert route_of(headers) == ("local", "offline")
    assert len(fs.requests) == 1


def test_budget_spent_is_a_402_when_policy_is_error(make_daemon: Any, fs: FaultServer) -> None:
    env = remote_env(
        [provider("faulty", fs.url, ["fault-model"])], daily_token_budget=5, on_budget_exhausted="error"
    )
    d = make_daemon(env=env)
    hello = [{"role": "user", "content": "hello there my friend"}]
    chat(d, model="fault-model", messages=hello)
    with pytest.raises(openai.APIStatusError) as caught:
        chat(d, model="fault-model", messages=hello)
    assert caught.value.status_code == 402 and "budget" in caught.value.message
    statuses = [r["status"] for r in d.query("SELECT status FROM traces ORDER BY seq")]
    assert statuses == [200, 402]
