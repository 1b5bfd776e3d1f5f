"""Task matching on chat requests: signature, embedding threshold, explicit, degraded encoder,
registry refresh and retro-tagging, with the real int8 encoder and a real SQLite trace store."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from agent_sim import PLANNING, SUBTASKS, AgentCall, generate_calls
from match_tasks import KINDS, UNRELATED_CHAT, signature_of, task_fields, write_task

from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.models.encoder import MANIFEST, MODEL_FILE, Encoder
from slm_agent.runtime.matching import Match, TaskMatcher, load_encoder
from slm_agent.runtime.store.traces import TraceStore


@pytest.fixture(scope="session")
def encoder_dir(int8_encoder: Encoder) -> Path:
    """The int8 MiniLM `slm-agent quantize encoder` builds, made once a session (conftest)."""
    return int8_encoder.folder


@pytest.fixture(scope="session")
def encoder(encoder_dir: Path) -> Encoder:
    """Loaded as the daemon loads it: checked, and capped at the tokens matching embeds."""
    loaded, problem = load_encoder(encoder_dir)
    assert loaded is not None, problem
    return loaded


@pytest.fixture(scope="module")
def calls() -> list[AgentCall]:
    return generate_calls(60, 30, seed=3)


class Events:
    """What the matcher tells the daemon's event bus."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, data: dict[str, Any]) -> None:
        self.seen.append((kind, data))


class Clock:
    """The matcher's monotonic clock, moved by hand to cross the once-a-second refresh."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _by_subtask(calls: list[AgentCall]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        out.setdefault(call.subtask, []).append(call.body)
    return out


def _chat(text: str, system: str | None = None) -> list[dict[str, Any]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def _match(matcher: TaskMatcher, body: dict[str, Any], explicit: str | None = None) -> Match:
    return matcher.match(body["messages"], body.get("tools"), body.get("response_format"), explicit)


def test_signature_matches_every_call_of_a_step_and_nothing_else(
    tmp_path: Path, calls: list[AgentCall]
) -> None:
    groups = _by_subtask(calls)
    for subtask in SUBTASKS:
        write_task(tmp_path, subtask, task_fields(None, groups[subtask], with_centroid=False))
    matcher = TaskMatcher(TaskRegistry(tmp_path), None)

    for call in calls:
        match = _match(matcher, call.body)
        assert match.signature == signature_of(call.body)
        if call.subtask == PLANNING:
            assert (match.task, match.method, match.score) == (None, None, None)
        else:
            assert (match.task, match.method, match.score) == (call.subtask, "signature", 1.0)
    # The built-in tasks carry no signature or centroid: reached by name only, never matched.
    assert _match(matcher, {"messages": _chat("Extract the name: Bob", "Extract fields.")}).task is None


def test_embedding_threshold_matches_paraphrases_and_nothing_unrelated(
    tmp_path: Path, encoder: Encoder, calls: list[AgentCall]
) -> None:
    """Tasks known by content only (no signature): centroid and threshold from half of each
    step's calls, calibrated against the other steps and planning; judged on the other half."""
    half = len(calls) // 2
    fit, held_out = _by_subtask(calls[:half]), calls[half:]
    for subtask in SUBTASKS:
        others = [b for s, bodies in fit.items() if s != subtask for b in bodies]
        fields = task_fields(encoder, fit[subtask], others, kind=KINDS[subtask], with_signature=False)
        write_task(tmp_path, subtask, fields)
    matcher = TaskMatcher(TaskRegistry(tmp_path), encoder)

    matched = 0
    for call in held_out:
        match = _match(matcher, call.body)
        if call.subtask == PLANNING:
            assert match.task is None, f"planning call matched {match.task}: {call.body['messages'][-1]}"
            continue
        assert match.task in (call.subtask, None), f"{call.subtask} call matched {match.task}"
        if match.task is not None:
            assert match.method == "embedding" and match.score is not None and 0 < match.score <= 1
            matched += 1
    subtask_calls = sum(c.subtask != PLANNING for c in held_out)
    assert matched >= 0.9 * subtask_calls, f"only {matched}/{subtask_calls} held-out calls matched"
    # A paraphrase outside the generator's templates still matches; unrelated chat never does.
    paraphrase = {"messages": _chat("Ticket: my card got billed two times for Atlas, please fix")}
    assert _match(matcher, paraphrase).task == "classify_ticket"
    for text in UNRELATED_CHAT:
        assert _match(matcher, {"messages": _chat(text)}).task is None, text
    # A tool-calling step matches by content only a request that offers tools.
    timer = next(b for b in fit["pick_tool"] if "timer" in b["messages"][-1]["content"])
    assert _match(matcher, timer).task == "pick_tool"
    assert _match(matcher, {**timer, "tools": None}).task is None


def test_explicit_task_wins_over_signature_and_embedding(
    tmp_path: Path, encoder: Encoder, calls: list[AgentCall]
) -> None:
    groups = _by_subtask(calls)
    write_task(tmp_path, "pick_tool", task_fields(encoder, groups["pick_tool"]))
    write_task(tmp_path, "tickets", task_fields(encoder, groups["classify_ticket"], with_signature=False))
    matcher = TaskMatcher(TaskRegistry(tmp_path), encoder)
    body, ticket = groups["pick_tool"][0], groups["classify_ticket"][0]
    assert (_match(matcher, body).method, _match(matcher, ticket).method) == ("signature", "embedding")
    for request in (body, ticket):
        match = _match(matcher, request, explicit="extract")
        assert (match.task, match.method, match.score) == ("extract", "explicit", 1.0)
        assert match.signature == signature_of(request)


def _broken_copies(encoder_dir: Path, root: Path) -> dict[str, Path]:
    """Encoder folders broken the ways a device meets them: bytes flipped on disk, a file that is
    no model at all (with a manifest vouching for it), and no manifest."""
    folders = {how: root / how for how in ("flipped", "garbage", "no_manifest")}
    for folder in folders.values():
        shutil.copytree(encoder_dir, folder)
    model = folders["flipped"] / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    model.write_bytes(bytes(data))
    garbage = b"not an onnx model"
    (folders["garbage"] / MODEL_FILE).write_bytes(garbage)
    manifest = json.loads((folders["garbage"] / MANIFEST).read_text())
    manifest["sha256"] = hashlib.sha256(garbage).hexdigest()
    (folders["garbage"] / MANIFEST).write_text(json.dumps(manifest))
    (folders["no_manifest"] / MANIFEST).unlink()
    return folders


def test_broken_encoder_leaves_matching_by_signature_with_one_event(
    tmp_path: Path, encoder_dir: Path, calls: list[AgentCall]
) -> None:
    groups = _by_subtask(calls)
    tasks_dir = tmp_path / "tasks"
    write_task(tasks_dir, "pick_tool", task_fields(None, groups["pick_tool"], with_centroid=False))
    # A content-only task whose centroid can never be compared without an encoder.
    write_task(tasks_dir, "by_content", {"centroid": [1.0] + [0.0] * 383, "match_threshold": 0.1})
    expected = {"flipped": "corrupt", "garbage": "cannot load encoder", "no_manifest": "no encoder at"}
    for how, folder in _broken_copies(encoder_dir, tmp_path).items():
        encoder, problem = load_encoder(folder)
        assert encoder is None and problem is not None and expected[how] in problem, (how, problem)
        events = Events()
        matcher = TaskMatcher(
            TaskRegistry(tasks_dir),
            encoder,
            encoder_problem=problem,
            on_event=events.record,
        )
        assert events.seen == [
            ("matching", {"mode": "signature", "message": f"matching by signature only: {problem}"})
        ]
        assert _match(matcher, groups["pick_tool"][0]).method == "signature"
        for body in (groups["classify_ticket"][0], groups[PLANNING][0]):
            assert _match(matcher, body).task is None
        assert len(events.seen) == 1
    assert load_encoder(None)[1] == "no encoder configured; build it with `slm-agent quantize encoder`"


def test_refresh_picks_up_an_accepted_task_without_a_restart(tmp_path: Path, calls: list[AgentCall]) -> None:
    groups = _by_subtask(calls)
    clock = Clock()
    announced: list[tuple[str, str]] = []
    matcher = TaskMatcher(
        TaskRegistry(tmp_path), None, clock=clock, on_new_signature=lambda s, t: announced.append((s, t))
    )
    body = groups["extract_contact"][0]
    assert _match(matcher, body).task is None

    write_task(tmp_path, "extract_contact", task_fields(None, groups["extract_contact"], with_centroid=False))
    clock.now += 0.5
    assert _match(matcher, body).task is None, "the tasks dir is checked at most once a second"
    clock.now += 0.6
    assert _match(matcher, body).task == "extract_contact"
    assert announced == [(signature_of(body), "extract_contact")]

    # Re-accepted for another template: the old signature stops matching, the new one is announced.
    write_task(tmp_path, "extract_contact", task_fields(None, groups["classify_ticket"], with_centroid=False))
    clock.now += 1.1
    assert _match(matcher, body).task is None
    assert _match(matcher, groups["classify_ticket"][0]).task == "extract_contact"
    assert announced[-1] == (signature_of(groups["classify_ticket"][0]), "extract_contact")
    (tmp_path / "extract_contact.toml").unlink()
    clock.now += 1.1
    assert _match(matcher, groups["classify_ticket"][0]).task is None
    assert len(announced) == 2


def _trace(signature: str, task: str | None = None, method: str | None = None) -> TraceRecord:
    return TraceRecord(
        endpoint="/v1/chat/completions", route="remote", signature=signature, task=task, match_method=method
    )


def test_tag_signature_retro_tags_only_untagged_traces(tmp_path: Path, calls: list[AgentCall]) -> None:
    store = TraceStore(tmp_path / "traces.db")
    groups = _by_subtask(calls)
    signature = signature_of(groups["pick_tool"][0])
    untagged = [store.insert(_trace(signature)) for _ in range(3)]
    explicit = store.insert(_trace(signature, "tool_call", "explicit"))
    other = store.insert(_trace(signature_of(groups[PLANNING][0])))

    tasks_dir = tmp_path / "tasks"
    clock = Clock()
    tagged: list[int] = []
    TaskMatcher(
        TaskRegistry(tasks_dir),
        None,
        clock=clock,
        on_new_signature=lambda s, t: tagged.append(store.tag_signature(s, t)),
    )
    assert tagged == []
    write_task(tasks_dir, "pick_tool", task_fields(None, groups["pick_tool"], with_centroid=False))
    matcher = TaskMatcher(
        TaskRegistry(tasks_dir),
        None,
        clock=clock,
        on_new_signature=lambda s, t: tagged.append(store.tag_signature(s, t)),
    )
    assert tagged == [3]
    for trace in untagged:
        row = store.get(trace.id)
        assert (row.task, row.match_method, row.match_score) == ("pick_tool", "signature", 1.0)
    assert (store.get(explicit.id).task, store.get(explicit.id).match_method) == ("tool_call", "explicit")
    assert store.get(other.id).task is None
    assert store.tag_signature(signature, "pick_tool") == 0  # nothing left untagged
    assert _match(matcher, groups["pick_tool"][1]).task == "pick_tool"
    store.close()


def test_repeated_content_is_embedded_once(tmp_path: Path, encoder: Encoder, calls: list[AgentCall]) -> None:
    groups = _by_subtask(calls)
    write_task(
        tmp_path, "classify_ticket", task_fields(encoder, groups["classify_ticket"], with_signature=False)
    )
    counting = _CountingEncoder(encoder)
    matcher = TaskMatcher(TaskRegistry(tmp_path), counting)  # type: ignore[arg-type]
    body = groups["classify_ticket"][0]
    first, second = _match(matcher, body), _match(matcher, body)
    assert first == second and first.task == "classify_ticket"
    assert counting.calls == 1


class _CountingEncoder:
    """The real encoder, counting how often the matcher asks it for an embedding."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder, self.calls, self.dim = encoder, 0, encoder.dim

    def embed(self, texts: list[str]) -> Any:
        self.calls += 1
        return self.encoder.embed(texts)
