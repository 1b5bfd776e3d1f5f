"""The loop's device side on a real daemon: an unmodified agent's `gpt-4o` calls are matched to
chat tasks and traced, untagged calls are tagged when a task appears, a published adapter is
verified in shadow, and a live task answers on the laptop with the model id the agent asked for.

The remote is the scripted teacher (tests/teacher.py): these tests need a remote whose answers
are known. The adapter is a small random LoRA: what is checked here is the path a call takes,
not the adapter's quality (tests/test_loop_e2e.py trains real ones).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agent_sim import PLANNING, SUBTASKS, generate_calls, run_agent
from conftest import Daemon
from lora import make_lora
from match_tasks import signature_of, task_fields, write_task
from remote_fixtures import provider, remote_env
from teacher import Teacher

from slm_agent.models import ModelStore
from slm_agent.models.encoder import Encoder
from slm_agent.runtime.matching import load_encoder
from slm_agent.train.task_toml import task_toml

KIND = {"pick_tool": "tool_call", "extract_contact": "json", "classify_ticket": "label"}


def chat_task(subtask: str, calls: list[Any], **extra: Any) -> str:
    """A chat task for one agent step, as `train discover --accept` writes one."""
    body = calls[0].body
    data: dict[str, Any] = {
        "kind": KIND[subtask],
        "form": "chat",
        "signature": signature_of(body),
        "sampling": {"max_tokens": 48},
    }
    if subtask == "classify_ticket":
        data["labels"] = ["billing", "bug", "account"]
    if subtask == "extract_contact":
        data["output_schema"] = body["response_format"]["json_schema"]["schema"]
    return task_toml({**data, **extra})


def wait_until(condition: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def teacher() -> Iterator[Teacher]:
    with Teacher(latency_s=0.05) as t:
        yield t


def agent_daemon(make_daemon: Any, teacher: Teacher, **env: str) -> tuple[Daemon, openai.OpenAI]:
    daemon = make_daemon(env={**remote_env([provider("teacher", teacher.url, ["gpt-4o"])]), **env})
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return daemon, client


def test_calls_are_matched_by_template_and_tagged_when_a_task_appears(
    make_daemon: Any, teacher: Teacher
) -> None:
    daemon, client = agent_daemon(make_daemon, teacher)
    calls = generate_calls(3, 2, seed=5)
    first = run_agent(client, calls)
    assert {r.route_reason for r in first} == {"proxy"} and all(r.correct for r in first)
    rows = daemon.query("SELECT task, match_method, signature FROM traces")
    assert all(r["signature"] for r in rows) and not any(r["task"] for r in rows)

    # Accepting the tasks (a file in the tasks dir) is picked up without a restart, and the calls
    # already traced with their signature are tagged.
    tasks_dir = Path(os.environ["SLM_AGENT_HOME"]) / "config" / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for subtask in SUBTASKS:
        mine = [c for c in calls if c.subtask == subtask]
        (tasks_dir / f"{subtask.replace('_', '-')}.toml").write_text(chat_task(subtask, mine))
    time.sleep(1.2)  # the registry is checked at most once a second
    second = run_agent(client, calls)
    assert {r.route_reason for r in second} == {"proxy"}  # no adapter yet: the remote answers
    by_trace = {r["id"]: r for r in daemon.query("SELECT id, task, match_method, match_score FROM traces")}
    for result in [*first, *second]:
        row = by_trace[result.trace_id]
        if result.call.subtask == PLANNING:
            assert row["task"] is None and row["match_method"] is None
        else:
            assert row["task"] == result.call.subtask.replace("_", "-"), row
            assert row["match_method"] == "signature" and row["match_score"] == 1.0


def test_shadow_then_promotion_answers_locally_and_demotion_hands_back(
    make_daemon: Any, teacher: Teacher, bundled: Any, model_path: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "store")
    store.add(model_path, name=bundled.name, expected_sha256=bundled.sha256)
    store.add(make_lora(tmp_path / "pick.gguf", model_path, seed=3, std=0.02), name="pick-lora")
    calls = [c for c in generate_calls(12, 0, seed=6) if c.subtask == "pick_tool"]
    tasks_dir = Path(os.environ["SLM_AGENT_HOME"]) / "config" / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "pick-tool.toml").write_text(
        chat_task("pick_tool", calls, adapter="pick-lora") + "[promotion]\nmin_pairs = 500\n"
    )
    daemon, client = agent_daemon(
        make_daemon,
        teacher,
        SLM_AGENT_STORE_DIR=str(store.root),
        SLM_AGENT_QUEUE_SIZE="1",
        SLM_AGENT_MAX_SEQUENCES="1",
    )
    states = lambda: {s["task"]: s for s in httpx.get(f"{daemon.url}/v1/admin/task-states").json()}  # noqa: E731

    # Shadow: the remote answers the agent; the adapter is compared in the background. A streamed
    # answer is passed on as it comes and its assembled tool calls make a pair as well.
    shadowed = run_agent(client, calls[:8]) + run_agent(client, calls[8:], stream=True)
    assert {r.route for r in shadowed} == {"remote"} and all(r.correct for r in shadowed)
    streamed = [httpx.get(f"{daemon.url}/v1/traces/{r.trace_id}").json()["trace"] for r in shadowed[8:]]
    assert all(t["tool_calls"] and t["finish_reason"] == "tool_calls" for t in streamed), streamed
    assert wait_until(lambda: (states()["pick-tool"]["stats"] or {}).get("n", 0) >= 3, timeout=180), states()[
        "pick-tool"
    ]
    state = states()["pick-tool"]
    assert state["state"] == "shadow", state  # far fewer pairs than min_pairs: it stays in shadow
    assert wait_until(lambda: len(daemon.query("SELECT 1 FROM shadow_pairs")) == len(calls), timeout=180)
    pairs = daemon.query("SELECT trace_id, agreed, local_output FROM shadow_pairs")
    assert {p["trace_id"] for p in pairs} == {r.trace_id for r in shadowed}
    assert all(json.loads(p["local_output"])["tool_calls"] for p in pairs)  # the grammar's valid calls

    # Promoted by hand: the adapter answers, under the model id the agent asked for.
    assert httpx.post(f"{daemon.url}/v1/admin/tasks/pick-tool/promote").json()["state"] == "live"
    live = run_agent(client, calls[:4])
    assert {(r.route, r.route_reason) for r in live} == {("local", "promoted")}
    raw = client.chat.completions.create(**calls[0].body)
    assert raw.model == "gpt-4o" and raw.choices[0].message.tool_calls
    # More at once than the engine takes (one running, one queued): the rest go to the remote
    # instead of a 429 (its answers are right; the random adapter's need not be).
    with ThreadPoolExecutor(6) as pool:
        burst = [r for rs in pool.map(lambda c: run_agent(client, [c]), calls[:6]) for r in rs]
    assert {r.route_reason for r in burst} == {"promoted", "busy"}
    assert all(r.correct for r in burst if r.route_reason == "busy")
    trace = httpx.get(f"{daemon.url}/v1/traces/{live[0].trace_id}").json()["trace"]
    assert trace["adapter"] == "pick-lora" and trace["task"] == "pick-tool"

    # Demoted: the remote answers again.
    assert httpx.post(f"{daemon.url}/v1/admin/tasks/pick-tool/demote").json()["state"] == "demoted"
    back = run_agent(client, calls[:3])
    assert {r.route for r in back} == {"remote"} and all(r.correct for r in back)
    transitions = daemon.query("SELECT to_state, reason FROM task_transitions ORDER BY seq")
    assert [t["to_state"] for t in transitions] == ["shadow", "live", "demoted"]


def test_a_task_matched_by_content_is_shadowed_then_answers_live(
    make_daemon: Any, teacher: Teacher, bundled: Any, model_path: Path, tmp_path: Path, int8_encoder: Encoder
) -> None:
    """A task known by content only (no signature: its template drifts). While it is not live its
    match embeds while the call goes on and still lands in the trace, so its calls are shadowed;
    once live the match is made before routing and the adapter answers."""
    store = ModelStore(tmp_path / "store")
    store.add(model_path, name=bundled.name, expected_sha256=bundled.sha256)
    store.add(make_lora(tmp_path / "pick.gguf", model_path, seed=3, std=0.02), name="pick-lora")
    calls = generate_calls(10, 4, seed=7)
    picks = [c for c in calls if c.subtask == "pick_tool"]
    encoder, problem = load_encoder(int8_encoder.folder)  # capped as the daemon embeds requests
    assert encoder is not None, problem
    others = [c.body for c in calls if c.subtask != "pick_tool"]
    fields = task_fields(encoder, [c.body for c in picks], others, kind="tool_call", with_signature=False)
    tasks_dir = Path(os.environ["SLM_AGENT_HOME"]) / "config" / "tasks"
    path = write_task(tasks_dir, "pick-tool", {**fields, "adapter": "pick-lora"})
    path.write_text(path.read_text() + "[sampling]\nmax_tokens = 48\n[promotion]\nmin_pairs = 500\n")
    daemon, client = agent_daemon(
        make_daemon,
        teacher,
        SLM_AGENT_STORE_DIR=str(store.root),
        SLM_AGENT_ENCODER_DIR=str(int8_encoder.folder),
    )

    shadowed = run_agent(client, picks[:4])
    assert {r.route for r in shadowed} == {"remote"} and all(r.correct for r in shadowed)
    rows = daemon.query("SELECT task, match_method FROM traces WHERE task IS NOT NULL")
    assert len(rows) == 4 and {(r["task"], r["match_method"]) for r in rows} == {("pick-tool", "embedding")}
    assert wait_until(lambda: len(daemon.query("SELECT 1 FROM shadow_pairs")) >= 2, timeout=180), (
        httpx.get(f"{daemon.url}/v1/admin/task-states").json(),
        daemon.log()[-3000:],
    )

    assert httpx.post(f"{daemon.url}/v1/admin/tasks/pick-tool/promote").json()["state"] == "live"
    live = run_agent(client, picks[4:7])
    # The live path ran for each (a random adapter's answer may still be handed to the remote).
    routes = [(r.route, r.route_reason) for r in live]
    assert ("local", "promoted") in routes and set(routes) <= {("local", "promoted"), ("remote", "gate")}
    served = next(r for r in live if r.route == "local")
    trace = httpx.get(f"{daemon.url}/v1/traces/{served.trace_id}").json()["trace"]
    assert trace["match_method"] == "embedding" and trace["adapter"] == "pick-lora"


def test_a_chat_task_answers_with_the_originals_of_its_placeholders() -> None:
    """Adapters learn from redacted traces; the device prompts them with the same placeholders
    and the agent gets the real values back."""
    from slm_agent.contracts.records import TraceRecord
    from slm_agent.models.manifest import PromptFormat
    from slm_agent.runtime.engine import GenerationRequest, GenerationResult
    from slm_agent.runtime.serving.context import Job, Target
    from slm_agent.runtime.serving.responses import assistant_message, chat_answer

    job = Job(
        "chat.completions",
        Target("gpt-4o", None, "extract-lora", 1.0, PromptFormat()),
        GenerationRequest(prefix="", body=""),
        TraceRecord(endpoint="chat.completions"),
        "json",
        placeholders={"<EMAIL_1>": "ann.lee@globex.example"},
    )
    result = GenerationResult(
        text='{"name": "Ann Lee", "email": "<EMAIL_1>", "phone": null}',
        finish_reason="stop",
        prompt_tokens=30,
        completion_tokens=12,
        cached_tokens=0,
        queue_ms=0.0,
        ttft_ms=10.0,
        total_ms=100.0,
    )
    message = assistant_message(chat_answer(job, result))
    assert json.loads(message["content"])["email"] == "ann.lee@globex.example"
