"""`train dataset`: labels by priority, scrubbing, dedup, a stable split, llama.cpp token ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_task import SCHEMA, shipment_task, shipments

from slm_agent.cli import main
from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.prompts import task_prompt
from slm_agent.contracts.records import FeedbackRecord, TraceRecord
from slm_agent.contracts.tasks import Task
from slm_agent.errors import BadRequestError, NotFoundError
from slm_agent.models.manifest import PromptFormat
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest
from slm_agent.train.data.collected import read_traces, request_text
from slm_agent.train.data.dataset import build_dataset, load_card, load_split
from slm_agent.train.data.dedup import near_duplicate_groups, stable_split
from slm_agent.train.data.tokenizer import ServingTokenizer


def _collect(root: Path, rows: list[tuple[TraceRecord, list[FeedbackRecord]]], batch: str = "b1") -> str:
    storage = TraceStorage(str(root))
    storage.write_batch(batch, "laptop-1", "0" * 16, [t for t, _ in rows], [f for _, fs in rows for f in fs])
    return str(root)


def _trace(sentence: str, output: object, **kw: object) -> TraceRecord:
    return TraceRecord(
        endpoint="tasks", task="shipment", request=sentence, output=output, response=json.dumps(output), **kw
    )  # type: ignore[arg-type]


def _rows(n: int) -> list[tuple[TraceRecord, list[FeedbackRecord]]]:
    rows = []
    for i, (sentence, truth) in enumerate(shipments(n, seed=3)):
        wrong = {**truth, "origin": truth["destination"], "destination": truth["origin"]}
        kind = i % 4
        if kind == 0:  # corrected local answer
            t = _trace(sentence, wrong)
            rows.append((t, [FeedbackRecord(trace_id=t.id, rating="bad", correction=json.dumps(truth))]))
        elif kind == 1:  # escalated: the remote's answer teaches
            rows.append((_trace(sentence, truth, route="remote", route_reason="validation"), []))
        elif kind == 2:  # local answer a user rated good
            t = _trace(sentence, truth)
            rows.append((t, [FeedbackRecord(trace_id=t.id, rating="good")]))
        else:  # local, never rated: teaches nothing
            rows.append((_trace(sentence, truth), []))
    return rows


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> ServingTokenizer:
    return ServingTokenizer(model_path)


def test_labels_follow_priority_and_drop_what_teaches_nothing(tmp_path, tokenizer, bundled):
    rows = _rows(80)
    sentence, truth = shipments(1, seed=50)[0]
    # Corrected AND escalated: the correction wins over the remote's answer, which is kept as teacher.
    wrong = {**truth, "quantity": truth["quantity"] + 1}
    both = _trace(sentence, wrong, route="remote")
    rows.append((both, [FeedbackRecord(trace_id=both.id, correction=json.dumps(truth))]))
    bad = _trace("Order 1: 2 crates of salt from Nice to Kiel.", {"order": 1})
    rows.append((bad, [FeedbackRecord(trace_id=bad.id, rating="bad")]))
    rows.append((_trace("Order 2: broken", None, status=500, error="boom", route="remote"), []))
    rows.append((_trace("Order 3: invalid", {"order": "x"}, route="remote"), []))
    data = _collect(tmp_path / "c", rows)
    card = build_dataset(
        shipment_task(), read_traces(data), tokenizer, tmp_path / "ds", base_model=bundled.name
    )
    assert card.by_source == {"correction": 21, "remote": 20, "local_positive": 20}
    assert card.dropped == {
        "unlabeled local answer": 20,
        "negative feedback": 1,
        "error": 1,
        "invalid output": 1,
    }
    assert card.examples == 61 and sum(card.by_split.values()) == 61
    examples = [e for s in ("train", "val", "test") for e in load_split(tmp_path / "ds", s)]
    mine = next(e for e in examples if e.id == both.id)
    assert (
        mine.source == "correction" and json.loads(mine.label) == truth and json.loads(mine.teacher) == wrong
    )
    # Labels are written the way the grammar lets the model write them: schema order, json.dumps spacing.
    assert list(json.loads(mine.label)) == list(SCHEMA["properties"]) and mine.label.startswith('{"order": ')
    assert (tmp_path / "ds" / "card.md").read_text().startswith("# Dataset card: shipment")
    assert load_card(tmp_path / "ds").dataset_sha256 == card.dataset_sha256


def test_split_is_stable_and_duplicates_collapse(tmp_path, tokenizer, bundled):
    rows = _rows(60)
    # The same request again, and one differing in case/space only, and a near copy.
    first = rows[1][0]
    rows.append((_trace(first.request.upper() + "  ", first.output, route="remote"), []))  # type: ignore[union-attr]
    rows.append((_trace(first.request.replace(".", "!"), first.output, route="remote"), []))  # type: ignore[union-attr]
    data = _collect(tmp_path / "c", rows)
    card = build_dataset(
        shipment_task(),
        read_traces(data),
        tokenizer,
        tmp_path / "ds",
        base_model=bundled.name,
        min_examples=10,
    )
    assert card.dropped["duplicate"] == 2
    splits = {e.id: e.split for s in ("train", "val", "test") for e in load_split(tmp_path / "ds", s)}
    # More data later: every example keeps its split, so the test set is never trained on.
    more = _collect(tmp_path / "c", _rows(100)[60:], batch="b2")
    build_dataset(
        shipment_task(),
        read_traces(more),
        tokenizer,
        tmp_path / "ds",
        base_model=bundled.name,
        min_examples=10,
    )
    again = {e.id: e.split for s in ("train", "val", "test") for e in load_split(tmp_path / "ds", s)}
    assert all(again[k] == v for k, v in splits.items())
    assert {stable_split("Same text", 0.1, 0.2) for _ in range(3)} == {stable_split("same   TEXT", 0.1, 0.2)}
    assert near_duplicate_groups(["alpha beta gamma delta", "Alpha beta gamma delta!", "zeta eta"], 0.8) == [
        0,
        0,
        2,
    ]


def test_personal_data_is_scrubbed_consistently_in_input_and_label(tmp_path, tokenizer, bundled):
    task = Task(
        name="contact",
        kind="json",
        output_schema={"type": "object", "properties": {"email": {"type": "string"}}},
    )
    rows = []
    for i, (sentence, _) in enumerate(shipments(30)):
        t = TraceRecord(
            endpoint="tasks",
            task="contact",
            request=f"{sentence} Write to user{i}@corp.example.",
            output={"email": f"user{i}@corp.example"},
            route="remote",
        )
        rows.append((t, []))
    data = _collect(tmp_path / "c", rows)
    card = build_dataset(
        task, read_traces(data), tokenizer, tmp_path / "ds", base_model=bundled.name, min_examples=5
    )
    assert card.redactions == 60
    for e in load_split(tmp_path / "ds", "train"):
        assert "@corp.example" not in e.input + e.label
        placeholder = json.loads(e.label)["email"]
        assert placeholder.startswith("<") and placeholder in e.input


def test_token_ids_are_the_ones_the_daemon_feeds_llama_cpp(tmp_path, tokenizer, model_path, bundled):
    data = _collect(tmp_path / "c", _rows(40))
    task = shipment_task()
    build_dataset(
        task, read_traces(data), tokenizer, tmp_path / "ds", base_model=bundled.name, min_examples=5
    )
    engine = Engine(EngineConfig(model_path=model_path, n_ctx=512))
    engine.load()
    try:
        for example in load_split(tmp_path / "ds", "train")[:10]:
            prefix, body, _stop = task_prompt(task, example.input, None, PromptFormat())
            req = engine.prepare(GenerationRequest(prefix=prefix, body=body))
            assert example.prompt_ids == req.prefix_tokens + req.body_tokens
            assert tokenizer.detokenize(example.answer_ids) == example.label + "\n"
    finally:
        engine.shutdown()


def test_transformers_gguf_tokenizer_differs_which_is_why_llama_cpp_tokenizes(model_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    texts = [
        prefix + body
        for prefix, body in ((shipment_task().prefix(), shipment_task().body(s)) for s, _ in shipments(20))
    ]
    differ = [t for t in texts if hf(t, add_special_tokens=False)["input_ids"] != tokenizer.tokenize(t)]
    assert differ, "transformers now tokenizes like llama.cpp: the dataset could use either"


def test_empty_tiny_and_unlabeled_datasets_are_refused(tmp_path, tokenizer, bundled):
    task = shipment_task()
    with pytest.raises(NotFoundError, match="no collected traces"):
        read_traces(str(tmp_path / "nothing"))
    data = _collect(tmp_path / "c", [(_trace(s, t), []) for s, t in shipments(30)])
    with pytest.raises(
        BadRequestError, match=r"no labeled examples among 30 traces \(30 unlabeled local answer"
    ):
        build_dataset(task, read_traces(data), tokenizer, tmp_path / "ds", base_model=bundled.name)
    with pytest.raises(NotFoundError, match="no collected traces for task 'other'"):
        build_dataset(
            task.model_copy(update={"name": "other"}),
            read_traces(data),
            tokenizer,
            tmp_path / "ds",
            base_model=bundled.name,
        )
    tiny = _collect(tmp_path / "t", _rows(12))
    with pytest.raises(BadRequestError, match="at least 20"):
        build_dataset(task, read_traces(tiny), tokenizer, tmp_path / "ds", base_model=bundled.name)
    assert not (tmp_path / "ds").exists()


def test_cli_builds_a_dataset_and_explains_failures(tmp_path, shared_store, monkeypatch):
    from train_task import TASK_TOML

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shipment.toml").write_text(TASK_TOML)
    monkeypatch.setenv("SLM_AGENT_STORE_DIR", str(shared_store.root))
    data = _collect(tmp_path / "c", _rows(80))
    args = [
        "train",
        "dataset",
        "shipment",
        "--data",
        data,
        "--workdir",
        str(tmp_path / "w"),
        "--tasks-dir",
        str(tasks),
    ]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["examples"] == 60
    result = CliRunner().invoke(main, [*args[:2], "nope", *args[3:]])
    assert result.exit_code == 1 and "unknown task 'nope'" in result.output


def test_inputs_are_read_back_as_the_daemon_put_them_in_the_prompt():
    assert request_text({"b": 1, "a": "é"}, "tasks") == '{"b": 1, "a": "é"}'  # key order and unicode kept
    assert request_text({"messages": [1]}, "tasks") == '{"messages": [1]}'  # an input object, not a chat
    chat = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}],
        },
    ]
    assert request_text(chat, "chat.completions") == "ab"
    assert request_text({"messages": chat[:1]}, "chat.completions") == "first"
    assert request_text([], "chat.completions") is None
