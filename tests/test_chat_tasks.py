"""Chat-shaped tasks on the training box, from an unmodified agent's proxied calls.

The traces are written as the daemon stores a proxied call (runtime/routing/escalation.py:
endpoint chat.completions, route remote, reason proxy, the agent's messages, tools and params, the
remote's content or tool calls): the generated agent's requests (tests/agent_sim.py) answered by
the scripted remote (tests/teacher.py, right by construction), then pushed and imported for real.
Then: discovery by template (one chat proposal per agent step, none for planning) → accept (task
file + tags) → dataset with the remote's answers as labels, tool calls included → the daemon's
tokens → a short LoRA run and eval → publish carries the task file, pull installs it.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_sim import (
    CONTACT_SCHEMA,
    LABELS,
    MODEL,
    PLANNING,
    SUBTASKS,
    TOOLS,
    AgentCall,
    generate_calls,
    ground_truth,
)
from click.testing import CliRunner
from lora import make_lora
from teacher import teacher_answer

from slm_agent.collector.catalogue import Catalogue
from slm_agent.collector.ingest import Collector
from slm_agent.collector.publish import publish_adapter
from slm_agent.collector.storage import TraceStorage
from slm_agent.collector.tags import read_tags
from slm_agent.contracts.api import ChatMessage
from slm_agent.contracts.centroids import cosines
from slm_agent.contracts.prompts import chat_task_prompt
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.signature import request_content, template_signature
from slm_agent.contracts.tasks import Task, TaskRegistry, load_task_file, parse_task
from slm_agent.contracts.wire import SyncSettings
from slm_agent.models.encoder import Encoder
from slm_agent.models.manifest import ModelManifest, PromptFormat
from slm_agent.models.store import ModelStore
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.pull import pull
from slm_agent.runtime.sync.push import push
from slm_agent.train.box import TrainingBox
from slm_agent.train.data.chat import ChatInput
from slm_agent.train.data.collected import CollectedTrace, read_traces
from slm_agent.train.data.dataset import build_dataset, load_split
from slm_agent.train.data.labels import Labeled, Unusable, label_trace
from slm_agent.train.data.tokenizer import ServingTokenizer
from slm_agent.train.discovery.discover import DiscoveryReport, TaskProposal, accept, discover
from slm_agent.train.discovery.discover_cli import discover as discover_cli
from slm_agent.train.settings import LoraConfig, TrainSettings
from slm_agent.train.task_toml import shipped_task_file

N = 60  # calls per subtask
N_PLANNING = 20
KIND = {"pick_tool": "tool_call", "extract_contact": "json", "classify_ticket": "label"}


def signature_of(body: dict[str, Any]) -> str:
    return template_signature(body["messages"], body.get("tools"), body.get("response_format"))


def proxy_trace(call: AgentCall, *, with_signature: bool) -> TraceRecord:
    """A proxied call as the daemon stores it; half carry the signature the device computed."""
    body, message = call.body, teacher_answer(call.body)
    return TraceRecord(
        endpoint="chat.completions",
        model=MODEL,
        route="remote",
        route_reason="proxy",
        request=body["messages"],
        tools=body.get("tools"),
        params={k: v for k, v in body.items() if k not in ("messages", "tools", "model")},
        response=message.get("content"),
        tool_calls=message.get("tool_calls"),
        finish_reason="tool_calls" if message.get("tool_calls") else "stop",
        remote_model=MODEL,
        signature=signature_of(body) if with_signature else None,
    )


def collect(root: Path, calls: Sequence[AgentCall]) -> tuple[str, dict[str, set[str]]]:
    """Trace the calls on a device, push them, import them: (data URL, trace ids by subtask)."""
    store = TraceStore(root / "device.db")
    ids: dict[str, set[str]] = {}
    try:
        for i, call in enumerate(calls):
            trace = store.insert(proxy_trace(call, with_signature=i % 2 == 0))
            ids.setdefault(call.subtask, set()).add(trace.id)
        push(store, SyncSettings(device_id="laptop-1"), str(root / "outbox"))
    finally:
        store.close()
    collector = Collector(TraceStorage(str(root / "collected")), Catalogue(root / "catalogue.db"))
    try:
        assert collector.import_dir(root / "outbox").traces == len(calls)
    finally:
        collector.catalogue.close()
    return str(root / "collected"), ids


@pytest.fixture(scope="module")
def encoder(int8_encoder: Encoder) -> Encoder:
    """The session's int8 encoder (conftest.py), built once for every test that embeds."""
    return int8_encoder


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, set[str]]]:
    return collect(tmp_path_factory.mktemp("agent"), generate_calls(N, N_PLANNING, seed=1))


@pytest.fixture(scope="module")
def report(agent: tuple[str, dict[str, set[str]]], encoder: Encoder) -> DiscoveryReport:
    return discover(read_traces(agent[0]), encoder=encoder, data=agent[0])


def by_subtask(report: DiscoveryReport, ids: dict[str, set[str]]) -> dict[str, TaskProposal]:
    return {s: p for p in report.proposals for s in SUBTASKS if set(p.trace_ids) == ids[s]}


@pytest.fixture(scope="module")
def accepted(
    agent: tuple[str, dict[str, set[str]]], report: DiscoveryReport, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Each agent step accepted as a task named after it (its traces tagged on the collector)."""
    tasks_dir = tmp_path_factory.mktemp("tasks")
    for subtask, proposal in by_subtask(report, agent[1]).items():
        accept(proposal, tasks_dir, name=subtask.replace("_", "-"), data=agent[0])
    return tasks_dir


def task_of(tasks_dir: Path, subtask: str) -> Task:
    return load_task_file(tasks_dir / f"{subtask.replace('_', '-')}.toml")


# -- discovery -------------------------------------------------------------------------------------
def test_one_tool_step_and_planning_requests_make_one_proposal(tmp_path: Path, encoder: Encoder) -> None:
    """The issue's case: 300 calls of one tool step + 60 planning requests (content alone gave 43
    clusters and 5 proposals covering 125)."""
    calls = [c for c in generate_calls(300, 60, seed=2) if c.subtask in ("pick_tool", PLANNING)]
    data, ids = collect(tmp_path, calls)
    report = discover(read_traces(data), encoder=encoder, data=data)
    assert (report.traces, report.planning, report.templates) == (360, 60, 1)
    (proposal,) = report.proposals
    assert set(proposal.trace_ids) == ids["pick_tool"] and report.covered == 300
    assert (proposal.form, proposal.kind) == ("chat", "tool_call")
    assert proposal.signature == signature_of(next(c.body for c in calls if c.subtask == "pick_tool"))
    assert [t["function"]["name"] for t in proposal.tools] == [t["function"]["name"] for t in TOOLS]
    # The calibrated threshold keeps (nearly) every call of the step and no planning request.
    assert proposal.centroid is not None and proposal.match_threshold is not None
    members = encoder.embed([request_content(c.body["messages"]) for c in calls if c.subtask != PLANNING])
    planning = encoder.embed([request_content(c.body["messages"]) for c in calls if c.subtask == PLANNING])
    assert float(np.mean(cosines(members, proposal.centroid) >= proposal.match_threshold)) >= 0.95
    assert float(np.mean(cosines(planning, proposal.centroid) >= proposal.match_threshold)) <= 0.05


def test_each_agent_step_is_one_chat_proposal_and_planning_none(
    report: DiscoveryReport, agent: tuple[str, dict[str, set[str]]]
) -> None:
    ids = agent[1]
    assert report.planning == N_PLANNING and report.covered == 3 * N
    found = by_subtask(report, ids)
    assert sorted(found) == sorted(SUBTASKS) and len(report.proposals) == 3
    planning = ids[PLANNING]
    for subtask, p in found.items():
        assert (p.form, p.kind, p.size) == ("chat", KIND[subtask], N)
        assert not planning & set(p.trace_ids)
        assert p.signature is not None and p.match_threshold is not None and len(p.centroid or []) == 384
    assert found["extract_contact"].output_schema == CONTACT_SCHEMA  # the agent's own schema
    assert sorted(found["classify_ticket"].labels) == sorted(LABELS)
    assert sorted(t["function"]["name"] for t in found["pick_tool"].tools) == sorted(
        t["function"]["name"] for t in TOOLS
    )


def test_accepting_writes_the_chat_task_and_tags_its_traces(
    agent: tuple[str, dict[str, set[str]]], report: DiscoveryReport, accepted: Path
) -> None:
    data, ids = agent
    found = by_subtask(report, ids)
    for subtask in SUBTASKS:
        task, proposal = task_of(accepted, subtask), found[subtask]
        assert (task.form, task.kind, task.signature) == ("chat", KIND[subtask], proposal.signature)
        assert task.match_threshold == proposal.match_threshold and task.centroid == proposal.centroid
        assert task.instructions == "" and task.sampling.temperature == 0
        assert task.tools == proposal.tools and task.output_schema == proposal.output_schema
        # train dataset finds the task's traces at once: the proxied traces carry no task, tags do.
        assert {t.id for t in read_traces(data, task.name)} == ids[subtask]
    assert all(len(names) == 1 for names in read_tags(data).values())


def test_cli_accept_tags_the_traces_too(
    agent: tuple[str, dict[str, set[str]]], encoder: Encoder, tmp_path: Path, _isolated_home: Path
) -> None:
    data = str(tmp_path / "copy")
    shutil.copytree(agent[0], data)
    args = ["--data", data, "--encoder", str(encoder.folder), "--accept", "0", "--name", "step", "--json"]
    result = CliRunner().invoke(discover_cli, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["proposals"][0]["form"] == "chat" and out["accepted"].endswith("step.toml")
    assert {t.id for t in read_traces(data, "step")} == set(out["proposals"][0]["trace_ids"])


def _chat_trace(
    i: int, messages: list[dict[str, Any]], answer: dict[str, Any], **fields: Any
) -> CollectedTrace:
    return CollectedTrace(
        id=f"tr_{i:04d}",
        created_at=f"2025-01-01T00:00:{i % 60:02d}Z",
        endpoint="chat.completions",
        route="remote",
        request=messages,
        input=request_content(messages),
        response=answer.get("content"),
        tool_calls=answer.get("tool_calls"),
        **fields,
    )


def test_a_step_whose_answers_split_becomes_two_tasks_without_a_signature(encoder: Encoder) -> None:
    """Same template, but the remote calls a tool on some requests and answers in words on
    others: one contract each, told apart by content (a shared signature would match both)."""
    calls = [c for c in generate_calls(40, 0, seed=3) if c.subtask == "pick_tool"]
    traces = []
    for i, call in enumerate(calls):
        answer = teacher_answer(call.body) if i % 2 else {"content": f"Sorry, I cannot do that now ({i})."}
        traces.append(_chat_trace(i, call.body["messages"], answer, tools=TOOLS))
    report = discover(traces, encoder=encoder)
    assert sorted((p.kind, p.size) for p in report.proposals) == [("text", 20), ("tool_call", 20)]
    assert all(p.form == "chat" and p.signature is None and p.centroid for p in report.proposals)


def test_calls_whose_lead_varies_pool_by_their_fixed_parts(encoder: Encoder) -> None:
    """A user message lead that changes per call splits the signature; the step's system prompt,
    tools and answers still make it one step (its calls mostly matched by centroid)."""
    traces = []
    for i, call in enumerate(c for c in generate_calls(30, 0, seed=4) if c.subtask == "pick_tool"):
        system, user = call.body["messages"]
        messages = [system, {**user, "content": f"Request {chr(97 + i % 26)}{i}: {user['content']}"}]
        traces.append(_chat_trace(i, messages, teacher_answer(call.body), tools=TOOLS))
    report = discover(traces, encoder=encoder)
    (proposal,) = report.proposals
    assert (proposal.form, proposal.kind, proposal.size) == ("chat", "tool_call", 30)
    assert proposal.signature in {t.template_signature() for t in traces}


def test_one_system_prompt_with_steps_told_apart_by_their_lead_stays_apart(encoder: Encoder) -> None:
    """A generic system prompt for every step, the step named by the user message's lead: the
    steps answer under different contracts (labels vs JSON), so their signatures are not merged."""
    generic = {"role": "system", "content": "You are a helpful assistant."}
    traces = []
    for i, call in enumerate(c for c in generate_calls(25, 0, seed=5) if c.subtask != "pick_tool"):
        messages = [generic, call.body["messages"][1]]
        traces.append(_chat_trace(i, messages, teacher_answer(call.body)))
    report = discover(traces, encoder=encoder)
    assert sorted((p.kind, p.size) for p in report.proposals) == [("json", 25), ("label", 25)]
    assert len({p.signature for p in report.proposals}) == 2 and all(p.signature for p in report.proposals)


# -- labels ----------------------------------------------------------------------------------------
def _collected(**fields: Any) -> CollectedTrace:
    return CollectedTrace(
        id="tr_1", created_at="2025-01-01T00:00:00Z", endpoint="chat.completions", route="remote", **fields
    )


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_a_remote_tool_call_is_a_label() -> None:
    """The remote's tool call is the label, in the form the daemon's tool-call grammar writes."""
    task = parse_task({"name": "step", "form": "chat", "kind": "tool_call", "tools": TOOLS}, "test")
    messages = [{"role": "user", "content": "Start a 5 minute timer"}]
    base = {"request": messages, "tools": TOOLS, "input": "Start a 5 minute timer"}
    label = label_trace(task, _collected(**base, tool_calls=[_call("set_timer", '{"minutes": 5}')]))
    assert label == Labeled(label='{"name": "set_timer", "arguments": {"minutes": 5}}', source="remote")
    two = [_call("set_timer", '{"minutes": 5}'), _call("set_timer", '{"minutes": 6}')]
    assert label_trace(task, _collected(**base, tool_calls=two)) == Unusable(reason="several tool calls")
    broken = _collected(**base, tool_calls=[_call("set_timer", "{minutes")])
    assert label_trace(task, broken) == Unusable(reason="invalid output")
    unknown = _collected(**base, tool_calls=[_call("launch_rocket", "{}")])
    assert label_trace(task, unknown) == Unusable(reason="invalid output")
    # A task-shaped tool_call task escalated through chat: the remote's call is its label too.
    builtin = TaskRegistry(Path("/nonexistent")).get("tool_call")
    escalated = _collected(**base, task="tool_call", tool_calls=[_call("set_timer", '{"minutes": 5}')])
    assert isinstance(label_trace(builtin, escalated), Labeled)


# -- dataset and tokens ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> ServingTokenizer:
    return ServingTokenizer(model_path)


def test_chat_datasets_label_the_remote_answers(
    agent: tuple[str, dict[str, set[str]]],
    accepted: Path,
    tokenizer: ServingTokenizer,
    bundled: ModelManifest,
    model_path: Path,
    tmp_path: Path,
) -> None:
    data = agent[0]
    fmt = bundled.prompt_format or PromptFormat()
    for subtask in SUBTASKS:
        task = task_of(accepted, subtask)
        out = tmp_path / subtask
        card = build_dataset(
            task,
            read_traces(data, task.name),
            tokenizer,
            out,
            base_model=bundled.name,
            prompt_format=fmt,
            min_examples=10,
        )
        assert card.traces == N and card.by_source == {"remote": card.examples}, card
        assert set(card.dropped) <= {"duplicate"}, card.dropped  # no "no answer": tool calls are labels
        for example in load_split(out, "train") + load_split(out, "test"):
            request = ChatInput.parse(example.input)
            found = ground_truth({"messages": request.messages, "tools": request.tools})
            assert found is not None and found[0] == subtask
            if subtask == "pick_tool":
                (call,) = found[1]["tool_calls"]
                assert example.label == json.dumps(call)  # {"name", "arguments"}, grammar order
            elif subtask == "extract_contact":
                assert json.loads(example.label) == json.loads(found[1]["content"])
                assert list(json.loads(example.label)) == ["name", "email", "phone"]  # schema order
            else:
                assert example.label == found[1]["content"]
    # Tokens: the prompt the daemon serves the task with (chat_task_prompt), through the engine.
    task = task_of(accepted, "pick_tool")
    engine = Engine(EngineConfig(model_path=model_path, n_ctx=1024))
    engine.load()
    try:
        for example in load_split(tmp_path / "pick_tool", "train")[:8]:
            request = ChatInput.parse(example.input)
            messages = [ChatMessage.model_validate(m) for m in request.messages]
            prefix, body, stop = chat_task_prompt(task, messages, request.tools, fmt)
            assert stop == ["\n"] and TOOLS[0]["function"]["name"] in prefix
            req = engine.prepare(GenerationRequest(prefix=prefix, body=body))
            assert example.prompt_ids == req.prefix_tokens + req.body_tokens
            assert tokenizer.detokenize(example.answer_ids) == example.label + "\n"
    finally:
        engine.shutdown()


# -- publish and pull ------------------------------------------------------------------------------
def test_publish_carries_the_chat_task_and_pull_installs_it_without_overwriting(
    accepted: Path, shared_store: ModelStore, bundled: ModelManifest, tmp_path: Path
) -> None:
    task = task_of(accepted, "pick_tool")
    text = shipped_task_file(task)
    assert parse_task(tomllib.loads(text), "shipped") == task.model_copy(update={"source": "shipped"})
    base_path = shared_store.path_of(bundled)
    publish_dir = tmp_path / "published"
    for version, name in enumerate(("pick-tool", "classify-ticket")):
        shipped = shipped_task_file(task_of(accepted, name.replace("-", "_")))
        publish_adapter(
            make_lora(tmp_path / f"{name}.gguf", base_path, seed=version),
            publish_dir,
            name=f"{name}-v1",
            tasks=[name],
            base_sha256=bundled.sha256,
            task_files={name: shipped},
        )
    device = ModelStore(tmp_path / "device-models")
    device.add(base_path, name=bundled.name, expected_sha256=bundled.sha256)
    tasks_dir = tmp_path / "device-tasks"
    tasks_dir.mkdir()
    mine = 'name = "classify-ticket"\ndescription = "my own"\nkind = "text"\n'
    (tasks_dir / "classify-ticket.toml").write_text(mine)
    result = pull(str(publish_dir), SyncSettings(), device, bundled.name, tasks_dir=tasks_dir)
    assert sorted(result.installed) == ["classify-ticket-v1", "pick-tool-v1"]
    assert result.tasks_installed == ["pick-tool"]
    assert (tasks_dir / "classify-ticket.toml").read_text() == mine  # the user's file stays
    registry = TaskRegistry(tasks_dir)
    served = registry.get("pick-tool")
    assert (served.form, served.signature, served.adapter) == ("chat", task.signature, None)


# -- LoRA and eval ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_and_eval_run_on_a_chat_task(
    agent: tuple[str, dict[str, set[str]]],
    accepted: Path,
    shared_store: ModelStore,
    bundled: ModelManifest,
    tmp_path: Path,
    train_base_cache: Path,
) -> None:
    settings = TrainSettings(
        data=agent[0],
        workdir=tmp_path / "train",
        publish_dir=tmp_path / "published",
        base_cache=train_base_cache,
        min_examples=10,
    )
    box = TrainingBox(settings, shared_store, TaskRegistry(accepted))
    card = box.dataset("pick-tool")
    assert card.by_source == {"remote": card.examples}
    report = box.lora("pick-tool", LoraConfig(max_steps=2, batch_size=4, eval_every=1, seed=1))
    assert report.parity["passed"] and report.train.steps == 2
    evaluation = box.evaluate("pick-tool")
    adapter = evaluation.get(f"pick-tool-{report.run}")
    base, remote = evaluation.get(bundled.name), evaluation.get("remote")
    assert adapter is not None and base is not None and remote is not None
    assert adapter.metrics.n == base.metrics.n == card.by_split["test"]
    assert remote.metrics.exact_match == 1.0  # the labels are the remote's answers
