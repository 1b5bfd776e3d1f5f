"""The real daemon over HTTP: the official openai client, httpx, and the SQLite file it writes."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import Daemon
from lora import make_lora

from slm_agent.models import BUNDLED_NAME

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "create_ticket",
            "description": "Open a support ticket",
            "parameters": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "priority": {"type": "integer"}},
                "required": ["title", "priority"],
            },
        },
    },
]


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_models_and_metrics(daemon: Daemon) -> None:
    with daemon.client() as http:
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["model"] == BUNDLED_NAME
        ids = {m["id"]: m["kind"] for m in http.get("/v1/models").json()["data"]}
        assert ids[BUNDLED_NAME] == "base"
        assert {"task:extract", "task:classify", "task:tool_call"} <= set(ids)
        metrics = http.get("/metrics").text
        assert "slm_queue_depth" in metrics and "slm_batch_sequences" in metrics


def test_chat_completion_with_openai_client(daemon: Daemon, client: openai.OpenAI) -> None:
    response = client.chat.completions.with_raw_response.create(
        model=BUNDLED_NAME,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a color."},
        ],
        max_tokens=12,
        temperature=0,
        extra_headers={"X-SLM-Session": "sess-1", "X-SLM-Agent": "tests"},
    )
    assert response.headers["x-slm-route"] == "local"
    completion = response.parse()
    assert completion.choices[0].message.content
    assert completion.usage and completion.usage.completion_tokens <= 12
    row = daemon.trace(completion.id)
    assert row["status"] == 200 and row["route"] == "local" and row["session_id"] == "sess-1"
    assert json.loads(row["request"])[1]["content"] == "Name a color."
    assert row["response"] == completion.choices[0].message.content
    assert row["latency_ms"] > 0 and row["ttft_ms"] > 0
    session = daemon.query("SELECT * FROM sessions WHERE id = 'sess-1'")[0]
    assert session["agent"] == "tests" and session["request_count"] >= 1


def test_streaming_matches_trace(daemon: Daemon, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunk_id = [], None, None, None
    for chunk in stream:
        chunk_id = chunk.id
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens > 0
    assert chunk_id is not None
    assert daemon.trace(chunk_id)["response"] == "".join(pieces)
    assert daemon.trace(chunk_id)["stream"] == 1


def test_async_client(daemon: Daemon) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
        try:
            answers = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="task:classify", messages=[{"role": "user", "content": text}], max_tokens=8
                    )
                    for text in ("I was charged twice", "The app crashes on start", "Add dark mode please")
                )
            )
        finally:
            await client.close()
        return [a.choices[0].message.content or "" for a in answers]

    labels = {"billing", "bug", "feature_request", "account", "other"}
    assert all(answer in labels for answer in asyncio.run(main()))


def test_tool_calls(daemon: Daemon, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=[{"role": "user", "content": "Open a high priority ticket: the login page is down"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="auto",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name in {"get_weather", "create_ticket"}
    arguments = json.loads(call.function.arguments)
    schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)["function"]["parameters"]
    assert set(arguments) == set(schema["required"])
    forced = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=[{"role": "user", "content": "Is it cold in Oslo?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    forced_call = forced.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert forced_call.function.name == "get_weather"
    assert json.loads(forced_call.function.arguments)["unit"] in {"c", "f"}
    row = daemon.trace(forced.id)
    assert json.loads(row["tool_calls"])[0]["function"]["name"] == "get_weather"
    assert row["task"] == "tool_call"


def test_an_agent_loop_ends_with_an_answer_after_the_tool_result(client: openai.OpenAI) -> None:
    """call -> result -> final answer, with tools still offered and tool_choice left at auto."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Is it cold in Oslo?"}]
    first = client.chat.completions.create(model=BUNDLED_NAME, messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": -3, "sky": "snow"}'},
    ]
    final = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=messages,
        tools=TOOLS,
        max_tokens=40,  # type: ignore[arg-type]
    )
    choice = final.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in {"stop", "length"}
    assert (choice.message.content or "").strip() and "Assistant:" not in (choice.message.content or "")
    none = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=messages[:1],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=20,  # type: ignore[arg-type]
    )
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population_millions": {"type": "number"}},
        "required": ["city", "population_millions"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=[{"role": "user", "content": "Give a large city and its population in millions as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=60,
    )
    value = json.loads(completion.choices[0].message.content or "")
    assert set(value) == {"city", "population_millions"}
    loose = client.chat.completions.create(
        model=BUNDLED_NAME,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"},
        max_tokens=60,
    )
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)


def test_task_api_and_x_slm_task_header(daemon: Daemon) -> None:
    with daemon.client() as http:
        answer = http.post(
            "/v1/tasks/extract",
            json={"input": "Hello, Maria Rossi here, from Fiat in Turin. Write to maria@fiat.example."},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body["output"]) == {"name", "email", "city", "company"}
        assert body["route"] == "local"
        row = daemon.trace(body["id"])
        assert row["endpoint"] == "tasks" and row["task"] == "extract"
        assert json.loads(row["output"]) == body["output"]
        via_header = http.post(
            "/v1/chat/completions",
            headers={"X-SLM-Task": "classify"},
            json={"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "refund my order"}]},
        ).json()
        assert via_header["choices"][0]["message"]["content"] in {
            "billing",
            "bug",
            "feature_request",
            "account",
            "other",
        }


def test_completions_endpoint(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=BUNDLED_NAME, prompt="Paris is the capital of", max_tokens=5, temperature=0
    )
    assert completion.choices[0].text
    assert completion.usage and completion.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("payload", "status", "code", "message"),
    [
        (
            {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "not_found",
            "does not exist here",
        ),
        (
            {"model": "task:nope", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "not_found",
            "unknown task 'nope'",
        ),
        ({"model": BUNDLED_NAME, "messages": []}, 400, "invalid_request", "messages"),
        (
            {"model": BUNDLED_NAME, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "invalid_request",
            "role",
        ),
        (
            {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "x"}], "n": 3},
            400,
            "invalid_request",
            "n",
        ),
        (
            {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "hi " * 3000}]},
            413,
            "context_length_exceeded",
            "context window is 2048",
        ),
        (
            {
                "model": BUNDLED_NAME,
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                },
            },
            422,
            "invalid_schema",
            "invalid JSON schema",
        ),
    ],
)
def test_bad_requests_get_precise_errors(
    daemon: Daemon, payload: dict[str, Any], status: int, code: str, message: str
) -> None:
    with daemon.client() as http:
        response = http.post("/v1/chat/completions", json=payload)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and message in error["message"]
        assert http.get("/healthz").status_code == 200


def test_malformed_json_and_unknown_task(daemon: Daemon, client: openai.OpenAI) -> None:
    with daemon.client() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]["message"]
        unknown = http.post("/v1/tasks/summarise", json={"input": "x"})
        assert (
            unknown.status_code == 404
            and "known tasks: classify, extract, tool_call" in unknown.json()["error"]["message"]
        )
        too_big = http.post(
            "/v1/tasks/extract", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
        )
        assert too_big.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    failed = daemon.query("SELECT * FROM traces WHERE status = 404 AND model = 'gpt-4o'")
    assert failed and "does not exist here" in failed[0]["error"]


def test_feedback(daemon: Daemon) -> None:
    with daemon.client() as http:
        answer = http.post("/v1/tasks/classify", json={"input": "my card was charged twice"}).json()
        given = http.post(
            f"/v1/traces/{answer['id']}/feedback", json={"rating": "bad", "correction": "billing"}
        )
        assert given.status_code == 201
        assert http.post("/v1/traces/tr_nope/feedback", json={"rating": "good"}).status_code == 404
        assert http.post(f"/v1/traces/{answer['id']}/feedback", json={}).status_code == 400
        detail = http.get(f"/v1/traces/{answer['id']}").json()
        assert detail["feedback"][0]["correction"] == "billing"
    stored = daemon.query("SELECT * FROM feedback WHERE trace_id = ?", (answer["id"],))
    assert stored[0]["rating"] == "bad"


def test_adapters_hot_load_switch_and_unload(daemon: Daemon, model_path: Path, tmp_path: Path) -> None:
    from slm_agent.models import ModelStore

    store = ModelStore(Path(daemon.env["SLM_AGENT_STORE_DIR"]))
    for i in (1, 2):
        if not store.has(f"api-lora{i}"):
            store.add(
                make_lora(tmp_path / f"api-lora{i}.gguf", model_path, seed=10 + i, std=0.08),
                name=f"api-lora{i}",
            )
    body = {
        "messages": [{"role": "user", "content": "Tell me about rivers."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    with daemon.client() as http:
        base = http.post("/v1/chat/completions", json={**body, "model": BUNDLED_NAME}).json()
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["api-lora1"]["loaded"] is False  # listed from the store, not loaded yet
        # Every listed model answers: an adapter in the store loads on its first request.
        one = http.post("/v1/chat/completions", json={**body, "model": "api-lora1"}).json()
        loaded = http.post("/v1/admin/adapters", json={"name": "api-lora2"})
        assert loaded.status_code == 200, loaded.text
        two = http.post("/v1/chat/completions", json={**body, "model": "api-lora2"}).json()
        again = http.post("/v1/chat/completions", json={**body, "model": BUNDLED_NAME}).json()
        texts = [r["choices"][0]["message"]["content"] for r in (base, one, two, again)]
        assert texts[0] == texts[3] and len(set(texts[:3])) == 3
        unscaled = http.post(
            "/v1/chat/completions", json={**body, "model": "api-lora1", "adapter_scale": 0}
        ).json()
        assert unscaled["choices"][0]["message"]["content"] == texts[0]  # scale 0 is the base model
        assert daemon.trace(one["id"])["adapter"] == "api-lora1"
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert models["api-lora1"]["kind"] == "adapter" and models["api-lora1"]["loaded"]
        assert http.delete("/v1/admin/adapters/api-lora1").status_code == 200
        assert http.delete("/v1/admin/adapters/api-lora1").status_code == 404
        reloaded = http.post("/v1/chat/completions", json={**body, "model": "api-lora1"}).json()
        assert reloaded["choices"][0]["message"]["content"] == texts[1]
        assert http.post("/v1/chat/completions", json={**body, "model": "no-such-lora"}).status_code == 404
        assert http.post("/v1/admin/adapters", json={"name": BUNDLED_NAME}).status_code == 400


def test_task_policy_admin(daemon: Daemon) -> None:
    with daemon.client() as http:
        changed = http.patch("/v1/admin/tasks/extract", json={"routing": "auto"})
        assert changed.status_code == 200 and changed.json()["routing"] == "auto"
        tasks = {t["name"]: t for t in http.get("/v1/admin/tasks").json()}
        assert tasks["extract"]["routing"] == "auto"
        assert http.patch("/v1/admin/tasks/extract", json={"routing": "sideways"}).status_code == 400
        http.patch("/v1/admin/tasks/extract", json={"routing": "local"})


def test_client_disconnect_mid_stream_cancels_and_keeps_trace(daemon: Daemon) -> None:
    body = {
        "model": BUNDLED_NAME,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 400,
        "stream": True,
    }
    with (
        httpx.Client(base_url=daemon.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        trace_id = response.headers["x-slm-trace-id"]
        for n, _ in enumerate(response.iter_lines()):
            if n > 6:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = daemon.query("SELECT * FROM traces WHERE id = ?", (trace_id,))
        if found:
            break
        time.sleep(0.2)
    assert found, "the abandoned stream left no trace"
    assert found[0]["status"] == 499 and found[0]["finish_reason"] == "cancelled"
    assert found[0]["completion_tokens"] < 400
    with daemon.client() as http:
        assert http.get("/healthz").json()["status"] == "ok"


def test_queue_overflow_answers_429_with_retry_after(make_daemon: Any) -> None:
    daemon = make_daemon(env={"SLM_AGENT_QUEUE_SIZE": "1"})
    body = {"model": BUNDLED_NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0.8}
    results: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            results.append(http.post("/v1/completions", json=body))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) >= 2 and 429 in statuses, statuses
    rejected = next(r for r in results if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "queue_full"


def test_sigterm_drains_in_flight_requests(make_daemon: Any) -> None:
    daemon = make_daemon()
    results: list[httpx.Response] = []

    def call(i: int) -> None:
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            results.append(
                http.post(
                    "/v1/completions", json={"model": BUNDLED_NAME, "prompt": f"Story {i}:", "max_tokens": 60}
                )
            )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    # uvicorn re-raises the signal once it has shut down cleanly, so -SIGTERM is a clean exit.
    assert daemon.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in daemon.log()
    assert [r.status_code for r in results] == [200, 200, 200]
    ids = {r.json()["id"] for r in results}
    stored = {r["id"] for r in daemon.query("SELECT id FROM traces")}
    assert ids <= stored


def test_token_required_beyond_loopback(make_daemon: Any) -> None:
    daemon = make_daemon(env={"SLM_AGENT_TOKEN": "s3cret"})
    with daemon.client() as http:
        assert http.get("/healthz").status_code == 200
        denied = http.get("/v1/models")
        assert denied.status_code == 401 and "bearer token" in denied.json()["error"]["message"]
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert "s3cret" not in daemon.log()


def test_refuses_to_bind_beyond_loopback_without_token(make_daemon: Any) -> None:
    with pytest.raises(RuntimeError, match="set a token"):
        make_daemon("--host", "0.0.0.0")


def test_corrupt_model_file_fails_clearly(make_daemon: Any, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(RuntimeError, match="truncated inside its GGUF header"):
        make_daemon("--model", str(bad))


def test_full_disk_answers_507_keeps_serving_and_keeps_written_traces(make_daemon: Any) -> None:
    """RLIMIT_FSIZE stands in for a full disk: no file of the daemon may grow past 768 KiB."""
    import resource

    limit = 768 * 1024
    daemon = make_daemon(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    filler = {"model": "no-such-model", "messages": [{"role": "user", "content": "x" * 60_000}]}
    answer = {"model": BUNDLED_NAME, "prompt": "Hi", "max_tokens": 1}
    with daemon.client() as http:
        first = http.post("/v1/completions", json=answer)
        assert first.status_code == 200
        for _ in range(40):  # fill the trace database; the client always sees its own error
            assert http.post("/v1/chat/completions", json=filler).status_code == 404
        statuses = [http.post("/v1/completions", json=answer) for _ in range(8)]
        full = [r for r in statuses if r.status_code == 507]
        assert full, [r.status_code for r in statuses]
        error = full[0].json()["error"]
        assert error["code"] == "storage_full" and "trace database" in error["message"]
        assert http.get("/healthz").json()["status"] == "ok"
    assert daemon.trace(first.json()["id"])["status"] == 200
    assert daemon.query("SELECT count(*) AS n FROM traces")[0]["n"] > 1
