"""Shadow mode: agreement, Wilson bounds, the per-request gate, task states, the promotion policy,
the shadow worker on the real engine, and the manual override over HTTP and the CLI."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner
from conftest import free_port
from fastapi import FastAPI

from slm_agent.cli import main as cli
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import Promotion, Task, TaskRegistry
from slm_agent.errors import ConflictError
from slm_agent.models.manifest import PromptFormat
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest
from slm_agent.runtime.http import errors
from slm_agent.runtime.http.routes import promotion
from slm_agent.runtime.serving.context import Job, Target
from slm_agent.runtime.shadow import (
    PairRecord,
    Promoter,
    ShadowJob,
    ShadowWorker,
    TaskState,
    TaskStates,
    agreement,
    fit_gate,
    gate_features,
    next_state,
)
from slm_agent.runtime.shadow.gate import risk_coverage
from slm_agent.runtime.shadow.records import PairStats
from slm_agent.runtime.shadow.stats import Z_ONE_SIDED_95, wilson_bounds
from slm_agent.runtime.store.traces import TraceStore

LABELS = Task(name="triage", kind="label", labels=["bug", "question"], adapter="triage-v1")


def call(name: str, **arguments: Any) -> dict[str, Any]:
    function = {"name": name, "arguments": json.dumps(arguments)}
    return {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": function}]}


def said(text: str | None) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


# -- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agreed", "n", "z", "lower", "upper"),
    [
        (8, 10, 1.96, 0.4902, 0.9433),  # the textbook example (Wilson 1927; Newcombe 1998)
        (0, 10, 1.96, 0.0, 0.2775),
        (10, 10, 1.96, 0.7225, 1.0),
        (81, 263, 1.96, 0.2553, 0.3662),  # Newcombe's 1998 table
        (52, 52, Z_ONE_SIDED_95, 0.9505, 1.0),  # the fewest perfect pairs that clear 0.95
        (51, 51, Z_ONE_SIDED_95, 0.9496, 1.0),
    ],
)
def test_wilson_bounds(agreed: int, n: int, z: float, lower: float, upper: float) -> None:
    assert wilson_bounds(agreed, n, z) == pytest.approx((lower, upper), abs=5e-4)


def test_wilson_bounds_without_pairs_know_nothing() -> None:
    assert wilson_bounds(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_bounds(3, 2)


# -- agreement -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        (call("get_weather", city="Paris"), call("get_weather", city="Paris"), (True, 1.0)),
        (call("get_weather", city="paris "), call("get_weather", city="Paris"), (True, 1.0)),  # BFCL text
        (call("get_weather", city="Rome", days=2), call("get_weather", city="Paris", days=2), (False, 0.5)),
        (call("search", query="Paris"), call("get_weather", city="Paris"), (False, 0.0)),
        (said("It is sunny"), call("get_weather", city="Paris"), (False, 0.0)),
        (said("Done."), said("Done."), (True, 1.0)),  # the remote answered in words: so did local
        (call("get_weather", city="Paris"), said("Done."), (False, 0.0)),
        (
            call("get_weather", city="Paris"),
            {"tool_calls": [{"function": {"name": "x", "arguments": "{"}}]},
            (None, 0.0),
        ),
    ],
)
def test_agreement_of_tool_calls(
    local: dict[str, Any], remote: dict[str, Any], expected: tuple[Any, float]
) -> None:
    assert agreement("tool_call", local, remote) == pytest.approx(expected)


def test_agreement_of_json_answers() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    ada = said('{"name": "Ada", "age": 36}')
    assert agreement("json", said('{"age": 36, "name": "Ada"}'), ada, schema=schema) == (True, 1.0)
    assert agreement("json", said('{"name": "Ada", "age": 37}'), ada, schema=schema) == (False, 0.5)
    assert agreement("json", said('{"name": "Ada", "age": "36"}'), ada, schema=schema)[0] is False
    assert agreement("json", said("Ada, 36"), ada) == (False, 0.0)
    assert agreement("json", ada, said("sorry, I cannot")) == (None, 0.0)  # the remote's says nothing


def test_agreement_of_labels_and_text() -> None:
    assert agreement("label", said(" bug\n"), said("bug")) == (True, 1.0)
    assert agreement("label", said("Bug"), said("bug")) == (False, 0.0)
    assert agreement("label", said(None), said("bug")) == (False, 0.0)
    assert agreement("text", said("hello"), said("hello")) == (None, 0.0)  # no metric: stays remote


# -- the gate ------------------------------------------------------------------------------------


def synthetic_pairs(n: int, seed: int, separable: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Answers whose mean log-prob predicts agreement (or, not separable, says nothing)."""
    rng = np.random.default_rng(seed)
    confidence = rng.normal(size=n)
    x = np.column_stack(
        [
            confidence - 1,
            confidence - 2,
            np.ones(n),
            rng.normal(5, 1, n),
            np.full(n, 3.0),
            rng.normal(2, 0.5, n),
        ]
    )
    p = 1 / (1 + np.exp(-(5 * confidence + 3))) if separable else np.full(n, 0.7)
    return x, rng.random(n) < p


def test_gate_covers_requests_where_agreement_is_predictable() -> None:
    x, agreed = synthetic_pairs(600, seed=1)
    assert agreed.mean() < 0.95  # overall, the adapter could never be promoted
    gate = fit_gate(x, agreed, target=0.95)
    assert gate is not None and 0.3 < gate.coverage < 1.0
    assert gate.lower_bound >= 0.95  # chosen on out-of-fold predictions
    allowed = np.array([gate.allows(row) for row in x])
    assert abs(allowed.mean() - gate.coverage) < 0.05
    assert wilson_bounds(int(agreed[allowed].sum()), int(allowed.sum()), Z_ONE_SIDED_95)[0] >= 0.95
    held_x, held_agreed = synthetic_pairs(2000, seed=9)  # new requests of the same task
    held = np.array([gate.allows(row) for row in held_x])
    assert held_agreed[held].mean() >= 0.95 and held.mean() > 0.3
    assert type(gate).model_validate_json(gate.model_dump_json()) == gate  # survives its JSON column


def test_gate_is_none_when_no_threshold_reaches_the_target() -> None:
    x, agreed = synthetic_pairs(600, seed=2, separable=False)
    assert fit_gate(x, agreed, target=0.95) is None
    assert fit_gate(x[:30], np.ones(30, bool), target=0.95) is None  # 30 pairs can never show 0.95


def test_risk_coverage_ends_at_the_overall_agreement() -> None:
    x, agreed = synthetic_pairs(400, seed=3)
    curve = risk_coverage(x, agreed)
    assert curve[-1] == (1.0, pytest.approx(agreed.mean()))
    assert curve[0][1] > agreed.mean()  # the most confident answers agree more often


def test_gate_features() -> None:
    features = gate_features([-0.1, -0.3, -100.0], None, 99, 2, 3)
    assert features == pytest.approx([(-0.4 - 30) / 3, -30.0, 1.0, np.log(100), 2.0, np.log(4)])


# -- states and policy ---------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    store = TraceStore(tmp_path / "traces.db")  # migrates: task_states, task_transitions, shadow_pairs
    yield store.path
    store.close()


@pytest.fixture
def states(db: Path) -> Iterator[tuple[TaskStates, list[tuple[str, dict[str, Any]]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    store = TaskStates(db, lambda kind, data: events.append((kind, data)))
    yield store, events
    store.close()


def pair(agreed: bool | None, adapter: str = "triage-v1", features: list[float] | None = None) -> PairRecord:
    return PairRecord(
        trace_id="tr_x", task="triage", adapter=adapter, kind="label", agreed=agreed, score=float(bool(agreed)),
        local_output=said("bug"), remote_output=said("bug"), features=features or [-0.1, -0.2, 1, 4, 0, 1],
    )  # fmt: skip


def test_states_store_transitions_events_and_pairs(db: Path, states: tuple[TaskStates, list[Any]]) -> None:
    store, events = states
    assert store.state("triage").state == "proxied" and store.state("triage").changed_at is None
    store.set_state("triage", "triage-v1", "shadow", "adapter published")
    store.set_state("triage", "triage-v1", "live", "promoted")
    assert [(t.from_state, t.to_state) for t in store.transitions("triage")] == [
        ("shadow", "live"),
        (None, "shadow"),
    ]
    assert [e[1]["state"] for e in events if e[0] == "task_state"] == ["shadow", "live"]
    for verdict in (True, True, False, None):
        stats = store.add_pair(pair(verdict))
    assert (stats.n, stats.agreed, stats.rate) == (3, 2, pytest.approx(2 / 3))
    assert [p.agreed for p in store.pairs("triage", "triage-v1")] == [True, True, False]
    assert store.pair_totals() == {"triage": (3, 2)}
    assert sum(kind == "shadow_pair" for kind, _ in events) == 4
    assert store.set_gate("fresh", None).changed_at is not None  # a row the database accepts
    reopened = TaskStates(db)
    assert reopened.state("triage").state == "live" and reopened.state("triage").reason == "promoted"
    assert [s.task for s in reopened.all_states()] == ["fresh", "triage"]
    reopened.close()


def tally(verdicts: list[bool]) -> PairStats:
    return PairStats.of("triage", "triage-v1", verdicts, window=20)


def test_policy_keeps_a_task_with_too_few_pairs_in_shadow() -> None:
    shadow = TaskState(task="triage", adapter="triage-v1", state="shadow")
    assert next_state(LABELS, shadow, tally([True] * 49)) is None  # perfect, but under min_pairs
    assert next_state(LABELS, shadow, tally([True] * 51)) is None  # lower bound 0.9496 < 0.95


def test_policy_promotes_at_the_bound() -> None:
    shadow = TaskState(task="triage", adapter="triage-v1", state="shadow")
    decision = next_state(LABELS, shadow, tally([True] * 52))
    assert decision == ("live", "promoted: agreement 1.00 (lower bound 0.95) over 52 pairs")
    demoted = shadow.model_copy(update={"state": "demoted"})
    assert next_state(LABELS, demoted, tally([True] * 52)) is not None  # demoted earns it back alike


def test_policy_demotes_on_drift_only_when_confidently_worse() -> None:
    live = TaskState(task="triage", adapter="triage-v1", state="live")
    drifted = [True] * 80 + [True, False] * 10
    assert next_state(LABELS, live, tally(drifted)) == (
        "demoted",
        "demoted: recent agreement 0.50 over 20 pairs",
    )
    one_miss = [True] * 80 + [False] + [True] * 19
    assert next_state(LABELS, live, tally(one_miss)) is None
    assert next_state(LABELS, live, tally([False] * 10)) is None  # the window is not full yet


def promoted_with_a_gate(promoter: Promoter, task: Task) -> TaskState:
    assert promoter.ensure_adapter("triage", "triage-v1").state == "shadow"
    x, agreed = synthetic_pairs(400, seed=4)
    state = None
    for features, verdict in zip(x.tolist(), agreed.tolist(), strict=True):
        state = promoter.record_pair(task, pair(verdict, features=features))
        if state.state == "live":
            break
    assert state is not None and state.state == "live" and state.gate is not None
    return state


GATED = LABELS.model_copy(update={"promotion": Promotion(min_pairs=50, drift_window=20)})


def test_promoter_promotes_with_a_gate_then_demotes(states: tuple[TaskStates, list[Any]]) -> None:
    store, _ = states
    promoter = Promoter(store)
    state = promoted_with_a_gate(promoter, GATED)
    assert state.gate is not None
    assert state.reason.startswith("promoted with a gate") and state.gate.coverage < 1
    assert promoter.ensure_adapter("triage", "triage-v1").state == "live"  # a restart keeps it
    confident = [0.5, 0.5, 1.0, 5.0, 3.0, 2.0]  # far on the gate's "agrees" side
    for _ in range(20):
        state = promoter.record_pair(GATED, pair(False, features=confident))
    assert state.state == "demoted" and state.gate is None
    again = promoter.record_pair(GATED, pair(True, features=confident))
    assert again.state == "demoted" and store.stats("triage", "triage-v1").n == 1  # new pairs only
    assert promoter.ensure_adapter("triage", "triage-v2").state == "shadow"


def test_a_live_gate_is_refitted_as_pairs_arrive(states: tuple[TaskStates, list[Any]]) -> None:
    """Sampled and gated-out live requests keep adding pairs: the gate learns from them, and
    from the shadow pairs before."""
    promoter = Promoter(states[0])
    state = promoted_with_a_gate(promoter, GATED)
    assert state.gate is not None
    fitted_on = state.gate.n
    x, agreed = synthetic_pairs(120, seed=5)
    for features, verdict in zip(x.tolist(), agreed.tolist(), strict=True):
        state = promoter.record_pair(GATED, pair(verdict, features=features))
    assert state.state == "live" and state.gate is not None and state.gate.n > fitted_on


def test_manual_override_needs_an_adapter(states: tuple[TaskStates, list[Any]]) -> None:
    store, _ = states
    promoter = Promoter(store)
    assert promoter.promote(LABELS).state == "live" and store.state("triage").gate is None
    assert promoter.demote(LABELS).reason == "manual"
    with pytest.raises(ConflictError, match="no adapter"):
        promoter.promote(LABELS.model_copy(update={"name": "plain", "adapter": None}))


# -- the worker, on the real engine --------------------------------------------------------------

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the base model keeps counting: a long answer


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    # One thread: on a shared, oversubscribed CI machine llama.cpp's spinning thread barrier makes
    # a single eval take seconds now and then, which would drown the latencies asserted here.
    engine = Engine(EngineConfig(model_path=model_path, n_ctx=2048, n_threads=1, queue_size=8))
    engine.load()
    yield engine
    engine.shutdown()


def label_job(prompt: str, max_tokens: int) -> ShadowJob:
    """A prepared local job of the triage task, whose remote answered "bug"."""
    gen = GenerationRequest(prefix="", body=prompt, max_tokens=max_tokens, temperature=0.0)
    target = Target("task:triage", LABELS, None, 1.0, PromptFormat())
    job = Job("tasks", target, gen, TraceRecord(endpoint="tasks"), "label")
    return ShadowJob(job=job, task=LABELS, remote=said("bug"), match_score=0.9, input_chars=len(prompt))


def wait_for(condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def worker(engine: Engine, states: tuple[TaskStates, list[Any]]) -> Iterator[ShadowWorker]:
    wait_for(lambda: engine.idle)
    shadow = ShadowWorker(engine, Promoter(states[0]), idle_gap_s=0.3)
    shadow.start()
    yield shadow
    shadow.stop()


def test_shadow_work_runs_only_when_the_engine_is_idle(
    engine: Engine, worker: ShadowWorker, states: tuple[TaskStates, list[Any]]
) -> None:
    live = engine.submit(GenerationRequest(prefix="", body=COUNTING, max_tokens=40))
    worker.submit(label_job("Report: the app crashes on start. Bug or question? Answer:", 3))
    live.result()
    live_done = time.perf_counter()
    assert worker.counters.completed == 0
    wait_for(lambda: worker.counters.completed == 1)
    (stored,) = states[0].pairs("triage", None)
    assert stored.kind == "label" and stored.agreed is not None and len(stored.features) == 6
    assert stored.local_ms is not None
    # It started on the engine only after the idle gap that followed the live request.
    assert time.perf_counter() - live_done > 0.3 + stored.local_ms / 1000 - 0.05


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "after_s"),
    [
        (COUNTING, 150, 0.5),  # cancelled between generated tokens
        (" ".join(f"item{i}," for i in range(400)), 4, 0.05),  # cancelled in its long prompt prefill
    ],
    ids=["decoding", "prefill"],
)
def test_a_live_request_preempts_shadow_work(
    engine: Engine, worker: ShadowWorker, prompt: str, max_tokens: int, after_s: float
) -> None:
    worker.submit(label_job(prompt, max_tokens))
    wait_for(lambda: worker.running and engine.queue_depth == 1)
    time.sleep(after_s)
    assert worker.running, "the shadow job should still be running"
    live = engine.generate(GenerationRequest(prefix="", body="Q: What is 2 + 2?\nA:", max_tokens=3))
    assert live.finish_reason != "cancelled"
    assert live.queue_ms < 250, f"the live request waited {live.queue_ms:.0f} ms behind shadow work"
    wait_for(lambda: worker.counters.completed == 1)  # cancelled, queued again, run when idle
    assert worker.counters.preempted >= 1


def test_interrupted_background_prefill_resumes_where_it_stopped(engine: Engine) -> None:
    """A shadow job that never gets a long enough idle window still progresses: its computed
    prefix is kept aside (never in the live requests' prefix cache) and resumed."""
    wait_for(lambda: engine.idle)
    prefix = " ".join(f"rule{i}: answer briefly." for i in range(120))  # ~600 tokens
    saved_before = len(engine.prefix_cache)
    first = GenerationRequest(prefix=prefix, body="\nQ: hi\nA:", max_tokens=2, background=True)
    unsubscribe = engine.on_submit(lambda live: first.cancel.set())  # what the shadow worker does
    running = engine.submit(first)
    time.sleep(0.5)
    live = engine.generate(GenerationRequest(prefix="", body="Q: What is 2 + 2?\nA:", max_tokens=2))
    unsubscribe()
    assert running.result().finish_reason == "cancelled" and live.queue_ms < 250
    again = engine.generate(
        GenerationRequest(prefix=prefix, body="\nQ: hi\nA:", max_tokens=2, background=True)
    )
    assert again.finish_reason != "cancelled"
    assert again.cached_tokens >= 48  # resumed from the interrupted run's snapshot
    assert len(engine.prefix_cache) == saved_before  # live requests' saved prefixes untouched


def test_a_job_whose_adapter_is_gone_is_dropped(engine: Engine, worker: ShadowWorker) -> None:
    """Its adapter was replaced since the job was queued: the worker drops it and goes on (put
    back on every 503, it would hold the worker forever)."""
    stale = label_job("Report: login fails. Bug or question? Answer:", 2)
    stale.job.gen.adapter = "replaced-v1"
    worker.submit(stale)
    worker.submit(label_job("Report: the app crashes. Bug or question? Answer:", 2))
    wait_for(lambda: worker.counters.completed == 1, timeout=60)
    assert worker.counters.dropped == 1 and worker.pending == 0


def test_a_full_queue_drops_its_oldest_job_and_stop_is_clean(engine: Engine, states: Any) -> None:
    shadow = ShadowWorker(engine, Promoter(states[0]), capacity=2)
    jobs = [label_job(f"case {i}", 2) for i in range(3)]
    for job in jobs:
        assert shadow.submit(job)
    text = label_job("free text", 2)
    text.kind = "text"
    assert not shadow.submit(text)  # no metric: never shadowed
    assert shadow.pending == 2 and shadow.counters.dropped == 1
    assert shadow.clear() == 2 and shadow.pending == 0
    shadow.submit(jobs[0])
    shadow.start()
    shadow.stop(timeout=10)
    assert shadow._thread is not None and not shadow._thread.is_alive() and shadow.pending == 0
    assert shadow._preempt not in engine._submit_listeners  # the engine outlives its workers


# -- manual override over HTTP and the CLI --------------------------------------------------------


@pytest.fixture
def admin(db: Path, tmp_path: Path) -> Iterator[tuple[int, Promoter]]:
    """The promotion routes on a real HTTP server, over real task states and the built-in tasks."""
    promoter = Promoter(TaskStates(db))
    app = FastAPI()
    errors.install(app)
    app.include_router(promotion.router)
    app.state.services = SimpleNamespace(
        load_error=None, promoter=promoter, tasks=TaskRegistry(tmp_path / "tasks")
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30)
    yield port, promoter
    server.should_exit = True
    thread.join(10)
    promoter.states.close()


def test_cli_promotes_and_demotes_through_the_daemon(
    admin: tuple[int, Promoter], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, promoter = admin
    monkeypatch.setenv("SLM_AGENT_PORT", str(port))
    runner = CliRunner()
    refused = runner.invoke(cli, ["tasks", "promote", "classify"])
    assert refused.exit_code == 1 and "no adapter to promote" in refused.output
    promoter.ensure_adapter("classify", "classify-v1")
    promoted = runner.invoke(cli, ["tasks", "promote", "classify"])
    assert promoted.exit_code == 0, promoted.output
    assert "classify is live on adapter classify-v1 (manual)" in " ".join(promoted.output.split())
    listed = {s["task"]: s for s in httpx_get(port, "/v1/admin/task-states")}
    assert listed["classify"]["state"] == "live" and listed["classify"]["stats"]["n"] == 0
    assert listed["extract"]["state"] == "proxied" and listed["extract"]["stats"] is None
    demoted = runner.invoke(cli, ["tasks", "demote", "classify"])
    assert demoted.exit_code == 0 and promoter.state("classify").state == "demoted"
    unknown = runner.invoke(cli, ["tasks", "demote", "nope"])
    assert unknown.exit_code == 1 and "unknown task 'nope'" in unknown.output


def test_cli_says_when_no_daemon_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_AGENT_PORT", str(free_port()))
    result = CliRunner().invoke(cli, ["tasks", "promote", "classify"])
    assert result.exit_code == 1 and "slm-agentd is not running" in result.output


def httpx_get(port: int, path: str) -> Any:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).json()
