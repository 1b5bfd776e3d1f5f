"""Task discovery over real collected Parquet, embedded with the real int8 encoder."""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.records import FeedbackRecord, TraceRecord
from slm_agent.contracts.tasks import TASK_NAME_RE, Example, load_task_file, parse_task
from slm_agent.errors import BadRequestError, ConflictError
from slm_agent.models.encoder import Encoder
from slm_agent.runtime.engine.grammars import schema_grammar
from slm_agent.train.data.collected import CollectedTrace, read_traces
from slm_agent.train.data.contract import infer_contract, infer_schema
from slm_agent.train.discovery.discover import (
    DiscoveryReport,
    TaskProposal,
    accept,
    discover,
    proposal_to_task_toml,
)
from slm_agent.train.discovery.discover_cli import discover as discover_cli

NAMES = ["Alice Martin", "Bob Chen", "Dana Ruiz", "Eve Novak", "Farid Haddad", "Grace Kim", "Hugo Silva"]
CITIES = ["Paris", "Berlin", "Lima", "Oslo", "Madrid", "Tokyo", "Lisbon", "Austin", "Nairobi", "Toronto"]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Hooli", None]
CONTACT = [
    "Hi, I'm {name} from {company} in {city}. Reach me at {email}.",
    "Please contact {name} at {email}; she works for {company} in {city}.",
    "New lead: {name}, {company}, based in {city}, email {email}.",
    "{name} from {city} wrote to us from {email} about a quote for {company}.",
]
ITEMS = ["pasta", "hotel room", "headphones", "movie", "delivery", "customer service", "laptop", "coffee"]
MOODS = {
    "positive": ["absolutely wonderful", "fantastic", "really great"],
    "negative": ["terrible", "a huge disappointment", "awful"],
    "neutral": ["okay, nothing special", "average", "fine I guess"],
}
REVIEW = [
    "Review: the {item} was {mood}.",
    "Honestly the {item} was {mood}.",
    "My opinion of the {item}: {mood}.",
]
WEATHER = [
    ("What's the weather like in {city} {when}?", "get_weather"),
    ("Will it rain in {city} {when}?", "get_forecast"),
    ("How warm will it be in {city} {when}?", "get_forecast"),
    ("Is it snowing in {city} right now?", "get_weather"),
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_forecast", "description": None, "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "when": {"type": "string"}}}}},
]  # fmt: skip
PER_FAMILY = 20


def _stamp(i: int) -> str:
    return f"2025-03-0{1 + i % 3}T10:{i // 60:02d}:{i % 60:02d}.000Z"


def synthetic_traces() -> tuple[list[TraceRecord], list[FeedbackRecord]]:
    """Three request families, templated: contact extraction (json, tagged with the task `extract`),
    review sentiment through chat (labels), weather questions (tool calls)."""
    rng = random.Random(7)
    traces: list[TraceRecord] = []
    feedback: list[FeedbackRecord] = []
    for i in range(PER_FAMILY):
        name, city, company = rng.choice(NAMES), rng.choice(CITIES), rng.choice(COMPANIES)
        email = f"{name.split()[0].lower()}@{(company or 'mail').split()[0].lower()}.example"
        text = rng.choice(CONTACT).format(name=name, city=city, company=company or "a startup", email=email)
        answer = {"name": name, "email": email, "city": city, "company": company}
        traces.append(
            TraceRecord(
                created_at=_stamp(3 * i),
                endpoint="tasks",
                task="extract",
                request=text,
                output=answer,
                response=json.dumps(answer),
            )
        )
        label = ["positive", "negative", "neutral"][i % 3]
        text = rng.choice(REVIEW).format(item=rng.choice(ITEMS), mood=rng.choice(MOODS[label]))
        said = "positive" if i == 1 else label  # one wrong answer, corrected by feedback below
        trace = TraceRecord(
            created_at=_stamp(3 * i + 1),
            endpoint="chat",
            request={
                "messages": [{"role": "system", "content": "Sentiment."}, {"role": "user", "content": text}]
            },
            response=said,
        )
        traces.append(trace)
        if said != label:
            feedback.append(FeedbackRecord(trace_id=trace.id, rating="bad", correction=label))
        template, tool = rng.choice(WEATHER)
        city, when = rng.choice(CITIES), rng.choice(["today", "tomorrow", "this weekend"])
        args = {"city": city} if tool == "get_weather" else {"city": city, "when": when}
        traces.append(
            TraceRecord(
                created_at=_stamp(3 * i + 2),
                endpoint="chat",
                request={"messages": [{"role": "user", "content": template.format(city=city, when=when)}]},
                tools=TOOLS,
                output={"name": tool, "arguments": args},
            )
        )
    # Noise that must not break anything: no input at all, and a failed request.
    traces.append(TraceRecord(endpoint="completions", request=None, created_at=_stamp(200)))
    traces.append(
        TraceRecord(endpoint="tasks", request="???", status=500, error="boom", created_at=_stamp(201))
    )
    return traces, feedback


@pytest.fixture(scope="module")
def encoder(int8_encoder: Encoder) -> Encoder:
    """The session's int8 encoder (conftest.py), built once for every test that embeds."""
    return int8_encoder


@pytest.fixture(scope="module")
def data_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("collected") / "traces")
    traces, feedback = synthetic_traces()
    TraceStorage(url).write_batch("b_1", "dev_1", "st_1", traces, feedback)
    return url


@pytest.fixture(scope="module")
def report(data_url: str, encoder: Encoder) -> DiscoveryReport:
    return discover(read_traces(data_url), encoder=encoder, data=data_url)


def by_kind(report: DiscoveryReport) -> dict[str, TaskProposal]:
    return {p.kind: p for p in report.proposals}


def test_discovers_the_three_families(report: DiscoveryReport) -> None:
    assert report.traces == 3 * PER_FAMILY + 2
    assert report.with_input == 3 * PER_FAMILY + 1  # the completion without a request is skipped
    assert sorted(p.kind for p in report.proposals) == ["json", "label", "tool_call"]
    assert [p.cluster for p in report.proposals] == [0, 1, 2]
    for p in report.proposals:
        assert p.size == PER_FAMILY
        assert p.share == pytest.approx(PER_FAMILY / report.with_input, abs=1e-3)
        assert len(p.example_inputs) == 5 and len(p.examples) == 3
        assert len(set(p.trace_ids)) == PER_FAMILY
    assert len({p.name for p in report.proposals}) == 3
    assert report.covered == 3 * PER_FAMILY


def test_json_proposal_keeps_the_existing_task_and_infers_the_schema(report: DiscoveryReport) -> None:
    p = by_kind(report)["json"]
    assert p.name == "extract" and p.existing_task == "extract"
    schema = p.output_schema
    assert schema is not None
    assert list(schema["properties"]) == ["name", "email", "city", "company"]
    assert schema["required"] == ["name", "email", "city", "company"]
    assert schema["properties"]["company"]["type"] == ["string", "null"]
    assert schema["properties"]["name"]["type"] == "string"
    assert "null" in p.instructions
    schema_grammar(schema)  # the engine can constrain decoding with it
    for example in p.examples:
        assert set(json.loads(example.output)) == {"name", "email", "city", "company"}


def test_label_proposal_uses_corrections(report: DiscoveryReport) -> None:
    p = by_kind(report)["label"]
    assert set(p.labels) == {"positive", "negative", "neutral"}
    assert p.existing_task is None
    assert p.corrected == 1 and p.answered == PER_FAMILY
    assert {e.output for e in p.examples} == {"positive", "negative", "neutral"}  # one per label
    assert TASK_NAME_RE.match(p.name) and p.name not in {"extract", "classify"}


def test_tool_call_proposal_collects_the_tools(report: DiscoveryReport) -> None:
    p = by_kind(report)["tool_call"]
    assert sorted(t["function"]["name"] for t in p.tools) == ["get_forecast", "get_weather"]
    assert p.input_label == "Request"
    assert all(json.loads(e.output)["name"] in {"get_weather", "get_forecast"} for e in p.examples)
    assert all(e.tools for e in p.examples)


def test_accepted_proposals_load_as_tasks(report: DiscoveryReport, tmp_path: Path) -> None:
    for p in report.proposals:
        path = accept(p, tmp_path / "tasks")
        task = load_task_file(path)
        assert (task.name, task.kind) == (p.name, p.kind)
        assert task.labels == p.labels and task.output_schema == p.output_schema
        assert [e.output for e in task.examples] == [e.output for e in p.examples]
        assert task.sampling.temperature == 0
    label = by_kind(report)["label"]
    with pytest.raises(ConflictError, match="already exists"):
        accept(label, tmp_path / "tasks")
    renamed = accept(label, tmp_path / "tasks", name="review-sentiment")
    assert load_task_file(renamed).name == "review-sentiment"
    assert accept(label, tmp_path / "tasks", name="review-sentiment", replace=True) == renamed
    with pytest.raises(BadRequestError, match="invalid task name"):
        accept(label, tmp_path / "tasks", name="Not Valid")


def test_task_toml_escapes_every_string() -> None:
    nasty = 'quote " backslash \\ newline\nnext\ttab \x7f del \x01 ctrl é 東京 🙂 ]] [x] # not a comment'
    proposal = TaskProposal(
        cluster=0,
        size=3,
        share=1.0,
        name="nasty",
        kind="json",
        output_schema={
            "type": "object",
            "properties": {"a b": {"type": "string"}, nasty: {"type": "integer"}},
        },
        description=nasty,
        instructions=nasty,
        examples=[Example(input=nasty, output=json.dumps({"a b": nasty}))],
    )
    text = proposal_to_task_toml(proposal)
    task = parse_task(tomllib.loads(text), "test")
    assert task.instructions == nasty and task.description == nasty
    assert task.examples[0].input == nasty and json.loads(task.examples[0].output) == {"a b": nasty}
    assert task.output_schema == proposal.output_schema


def test_contract_inference() -> None:
    assert infer_contract([])[0] == "text"
    assert infer_contract(["yes", "no"] * 3) == ("label", None, ["yes", "no"])
    assert infer_contract([f"free answer {i}" for i in range(10)])[0] == "text"
    assert infer_contract(["yes", "no"])[0] == "text"  # two answers are no closed set
    schema = infer_schema([{"n": 1, "tags": ["a"], "x": 1.5}, {"n": 2, "tags": [], "x": 2, "note": None}])
    assert schema["properties"]["n"] == {"type": "integer"}
    assert schema["properties"]["x"] == {"type": "number"}
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert schema["properties"]["note"] == {"type": "null"}
    assert schema["required"] == ["n", "tags", "x"]
    nested = infer_schema([{"a": {"b": 1}}, {"a": None}])
    assert nested["properties"]["a"]["anyOf"][1] == {"type": "null"}
    schema_grammar(nested)


def test_few_traces(encoder: Encoder) -> None:
    assert discover([], encoder=encoder).proposals == []
    one = CollectedTrace(
        id="tr_1", created_at="2025-01-01T00:00:00Z", endpoint="tasks", input="hello", output="hi"
    )
    report = discover([one], encoder=encoder, min_size=1)
    assert [(p.size, p.kind, p.share) for p in report.proposals] == [(1, "text", 1.0)]
    assert discover([one], encoder=encoder).proposals == []


def test_cli_json_out_and_accept(
    data_url: str, encoder: Encoder, tmp_path: Path, _isolated_home: Path
) -> None:
    runner = CliRunner()
    args = ["--data", data_url, "--encoder", str(encoder.folder)]
    result = runner.invoke(discover_cli, [*args, "--json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    assert len(data["proposals"]) == 3 and data["accepted"] is None
    assert json.loads((tmp_path / "out" / "discover.json").read_text())["covered"] == 3 * PER_FAMILY
    markdown = (tmp_path / "out" / "discover.md").read_text()
    assert "| # | name | kind |" in markdown and "| extract (existing task) | json | 20 |" in markdown

    result = runner.invoke(discover_cli, [*args, "--accept", "1", "--name", "sentiment"])
    assert result.exit_code == 0, result.output
    task = load_task_file(_isolated_home / "config" / "tasks" / "sentiment.toml")
    assert task.kind == data["proposals"][1]["kind"]

    result = runner.invoke(discover_cli, [*args, "--accept", "7"])
    assert result.exit_code != 0 and "no proposal 7" in result.output
