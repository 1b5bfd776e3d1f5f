"""Scoring answers against references: one table of cases per task kind."""

from __future__ import annotations

import json
from typing import Any

import pytest

from slm_agent.contracts.scoring import ExampleScore, score_example
from slm_agent.contracts.tasks import Task
from slm_agent.errors import BadRequestError, SchemaError
from slm_agent.train.evaluation.metrics import TaskMetrics, aggregate

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": ["integer", "null"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name"],
}
JSON_TASK = Task(name="person", kind="json", output_schema=PERSON_SCHEMA)
ANY_OBJECT_TASK = Task(name="anything", kind="json", output_schema={"type": "object"})
LABEL_TASK = Task(name="sentiment", kind="label", labels=["positive", "negative", "neutral"])
TEXT_TASK = Task(name="summary", kind="text")


def tool(name: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [
    tool(
        "get_weather",
        {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "radius_km": {"type": "number"},
            "days": {"type": "integer"},
        },
        ["city"],
    ),
    tool(
        "search",
        {
            "query": {"type": "string"},
            "filters": {"type": "array", "items": {"type": "string"}},
            "options": {"type": "object"},
            "exact": {"type": "boolean"},
        },
        ["query"],
    ),
]
TOOL_TASK = Task(name="tools", kind="tool_call")
TOOL_TASK_WITH_DEFAULTS = Task(name="tools-default", kind="tool_call", tools=TOOLS)


def call(name: str, **arguments: Any) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def check(score: ExampleScore, valid: bool, exact: bool, f1: float) -> None:
    assert (score.valid, score.exact) == (valid, exact), score.detail
    assert score.f1 == pytest.approx(f1, abs=1e-3), score.detail


# -- json ----------------------------------------------------------------------------------------

ADA = {"name": "Ada", "age": 36, "address": {"city": "London", "zip": "N1"}}


@pytest.mark.parametrize(
    ("prediction", "reference", "valid", "exact", "f1"),
    [
        pytest.param(ADA, ADA, True, True, 1.0, id="identical-nested"),
        pytest.param(
            {"address": {"zip": "N1", "city": "London"}, "age": 36, "name": "Ada"},
            ADA,
            True,
            True,
            1.0,
            id="key-order-ignored",
        ),
        pytest.param(
            {"name": "Ada", "age": 36.0}, {"name": "Ada", "age": 36}, True, True, 1.0, id="36.0-is-36"
        ),
        pytest.param(
            {"name": "  ADA   lovelace "},
            {"name": "Ada Lovelace"},
            True,
            False,
            1.0,
            id="f1-normalises-strings",
        ),
        pytest.param(
            {**ADA, "address": {"city": "Paris", "zip": "N1"}},
            ADA,
            True,
            False,
            6 / 8,
            id="nested-field-differs",
        ),
        pytest.param(
            {"name": "Ada", "age": None}, {"name": "Ada", "age": None}, True, True, 1.0, id="null-both"
        ),
        pytest.param(
            {"name": "Ada", "age": None}, {"name": "Ada", "age": 36}, True, False, 0.5, id="null-vs-value"
        ),
        pytest.param(
            {"name": "Ada", "address": {"city": "London", "zip": None}},
            {"name": "Ada", "address": {"city": "London", "zip": None}},
            True,
            True,
            1.0,
            id="nested-null-both",
        ),
        pytest.param({"name": "Ada", "age": 36}, {"name": "Ada"}, True, False, 2 / 3, id="extra-field"),
        pytest.param({"name": "Ada"}, {"name": "Ada", "age": 36}, True, False, 2 / 3, id="missing-field"),
        pytest.param(
            {"name": "Ada", "tags": ["a", "b"]},
            {"name": "Ada", "tags": ["b", "a"]},
            True,
            False,
            1 / 3,
            id="list-order-matters",
        ),
        pytest.param(
            {"name": "Ada", "tags": []}, {"name": "Ada", "tags": []}, True, True, 1.0, id="empty-list"
        ),
        pytest.param(
            {"name": "Ada", "tags": []}, {"name": "Ada", "tags": ["x"]}, True, False, 0.5, id="empty-vs-one"
        ),
        pytest.param({"name": 5}, {"name": "Ada"}, False, False, 0.0, id="schema-wrong-type"),
        pytest.param(
            {"age": 36}, {"name": "Ada", "age": 36}, False, False, 2 / 3, id="schema-missing-required"
        ),
    ],
)
def test_json(prediction: Any, reference: Any, valid: bool, exact: bool, f1: float) -> None:
    check(score_example(JSON_TASK, json.dumps(prediction), json.dumps(reference)), valid, exact, f1)


@pytest.mark.parametrize(
    ("prediction", "reference", "exact", "f1"),
    [
        pytest.param({}, {}, True, 1.0, id="both-empty"),
        pytest.param({"flag": True}, {"flag": 1}, False, 0.0, id="true-is-not-1"),
        pytest.param({"n": "1"}, {"n": 1}, False, 0.0, id="string-is-not-number"),
        pytest.param({"a.b": 1}, {"a": {"b": 1}}, False, 0.0, id="dotted-key-is-not-a-path"),
    ],
)
def test_json_without_constraints(prediction: Any, reference: Any, exact: bool, f1: float) -> None:
    check(score_example(ANY_OBJECT_TASK, json.dumps(prediction), json.dumps(reference)), True, exact, f1)


@pytest.mark.parametrize(
    "prediction",
    ["Sure! Here is the JSON you asked for.", "", '{"name": "Ada"', '```json\n{"name": "Ada"}\n```'],
    ids=["prose", "empty", "truncated", "fenced"],
)
def test_json_garbage_is_invalid(prediction: str) -> None:
    score = score_example(JSON_TASK, prediction, '{"name":"Ada"}')
    check(score, False, False, 0.0)
    assert score.detail is not None and score.detail.startswith("not JSON")


def test_json_detail_names_the_fields_that_differ() -> None:
    wrong = {**ADA, "address": {"city": "Paris", "zip": "N1"}}
    assert (
        score_example(JSON_TASK, json.dumps(wrong), json.dumps(ADA)).detail == "fields differ: address.city"
    )
    invalid = score_example(JSON_TASK, '{"name": 5}', '{"name": "Ada"}').detail
    assert invalid is not None and invalid.startswith("does not match the schema: name:")


def test_json_bad_reference_or_schema_is_an_error() -> None:
    with pytest.raises(BadRequestError, match="reference answer is not JSON"):
        score_example(JSON_TASK, '{"name": "Ada"}', "Ada")
    broken = Task(name="broken", kind="json", output_schema={"type": "no-such-type"})
    with pytest.raises(SchemaError, match="invalid JSON schema"):
        score_example(broken, "{}", "{}")


# -- label ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "valid", "exact"),
    [
        ("positive", "positive", True, True),
        ("  positive\n", "positive", True, True),
        ("negative", "positive", True, False),
        ("Positive", "positive", False, False),
        ("great", "positive", False, False),
        ("", "positive", False, False),
    ],
)
def test_label(prediction: str, reference: str, valid: bool, exact: bool) -> None:
    check(score_example(LABEL_TASK, prediction, reference), valid, exact, float(exact))


# -- tool_call -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "valid", "exact", "f1"),
    [
        pytest.param(
            call("get_weather", city="Paris", unit="celsius"),
            call("get_weather", unit="celsius", city="Paris"),
            True,
            True,
            1.0,
            id="same-call",
        ),
        pytest.param(
            call("get_weather", city="New York"),
            call("get_weather", city="new york"),
            True,
            True,
            1.0,
            id="case-space",
        ),
        pytest.param(
            call("get_weather", city="new-york."),
            call("get_weather", city="New York"),
            True,
            True,
            1.0,
            id="punct",
        ),
        pytest.param(
            call("get_weather", city="Paris", radius_km=3),
            call("get_weather", city="Paris", radius_km=3.0),
            True,
            True,
            1.0,
            id="3-is-3.0",
        ),
        pytest.param(
            call("get_weather", city="Paris", radius_km=3.5),
            call("get_weather", city="Paris", radius_km=3),
            True,
            False,
            0.5,
            id="number-differs",
        ),
        pytest.param(
            call("search", query="Paris"),
            call("get_weather", city="Paris"),
            True,
            False,
            0.0,
            id="name-mismatch",
        ),
        pytest.param(
            call("get_forecast", city="Paris"),
            call("get_weather", city="Paris"),
            False,
            False,
            0.0,
            id="unknown-tool",
        ),
        pytest.param(
            call("get_weather", unit="celsius"),
            call("get_weather", city="Paris", unit="celsius"),
            False,
            False,
            2 / 3,
            id="missing-required",
        ),
        pytest.param(
            call("get_weather", city="Paris", country="FR"),
            call("get_weather", city="Paris"),
            False,
            False,
            2 / 3,
            id="unexpected-arg",
        ),
        pytest.param(
            call("get_weather", city="Paris", days="three"),
            call("get_weather", city="Paris", days=3),
            False,
            False,
            0.5,
            id="wrong-type",
        ),
        pytest.param(
            call("get_weather", city="Paris", unit="celsius"),
            call("get_weather", city="Paris"),
            True,
            False,
            2 / 3,
            id="extra-optional-arg",
        ),
        pytest.param(
            call("get_weather", city="Paris"),
            call("get_weather", city="Paris", unit="celsius"),
            True,
            False,
            2 / 3,
            id="missing-optional-arg",
        ),
        pytest.param(
            call("search", query="x", filters=["a", "b"]),
            call("search", query="x", filters=["b", "a"]),
            True,
            False,
            0.5,
            id="list-order-matters",
        ),
        pytest.param(
            call("search", query="x", filters=["Red Wine", "b"]),
            call("search", query="x", filters=["red wine", "b"]),
            True,
            True,
            1.0,
            id="list-elements-normalised",
        ),
        pytest.param(
            call("search", query="x", options={"sort": {"by": "Date"}}),
            call("search", query="x", options={"sort": {"by": "date"}}),
            True,
            True,
            1.0,
            id="nested-dict",
        ),
        pytest.param(
            call("search", query="x", options={"sort": "date", "limit": 5}),
            call("search", query="x", options={"sort": "date"}),
            True,
            False,
            0.5,
            id="nested-dict-extra-key",
        ),
        pytest.param(
            json.dumps({"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}),
            call("get_weather", city="Paris"),
            True,
            True,
            1.0,
            id="openai-shape-string-arguments",
        ),
    ],
)
def test_tool_call(prediction: str, reference: str, valid: bool, exact: bool, f1: float) -> None:
    check(score_example(TOOL_TASK, prediction, reference, tools=TOOLS), valid, exact, f1)


@pytest.mark.parametrize(
    ("prediction", "detail"),
    [
        ("I would call get_weather for Paris.", "not a tool call"),
        ('["get_weather"]', "not a tool call: expected a JSON object"),
        ('{"arguments": {"city": "Paris"}}', "not a tool call: no tool name"),
        ('{"name": "get_weather"}', "not a tool call: arguments of 'get_weather' must be a JSON object"),
        ('{"name": "get_weather", "arguments": "{city"}', "not a tool call"),
    ],
)
def test_tool_call_garbage_is_invalid(prediction: str, detail: str) -> None:
    score = score_example(TOOL_TASK, prediction, call("get_weather", city="Paris"), tools=TOOLS)
    check(score, False, False, 0.0)
    assert score.detail is not None and score.detail.startswith(detail)


def test_tool_call_details() -> None:
    reference = call("get_weather", city="Paris")
    details = {
        "missing": score_example(TOOL_TASK, call("get_weather"), reference, tools=TOOLS).detail,
        "unexpected": score_example(
            TOOL_TASK, call("get_weather", city="Paris", x=1), reference, tools=TOOLS
        ).detail,
        "name": score_example(TOOL_TASK, call("search", query="Paris"), reference, tools=TOOLS).detail,
        "args": score_example(TOOL_TASK, call("get_weather", city="Rome"), reference, tools=TOOLS).detail,
    }
    assert details == {
        "missing": "get_weather: missing required argument(s) city",
        "unexpected": "get_weather: unexpected argument(s) x",
        "name": "called 'search', expected 'get_weather'",
        "args": "arguments differ: city",
    }


def test_tool_call_without_tools_checks_only_the_answer() -> None:
    check(score_example(TOOL_TASK, call("anything", a=1), call("anything", a=1)), True, True, 1.0)
    check(score_example(TOOL_TASK, call("anything", flag=1), call("anything", flag=True)), True, False, 0.0)
    check(score_example(TOOL_TASK, call("anything", flag=True), call("anything", flag=True)), True, True, 1.0)


def test_tool_call_falls_back_to_the_tasks_tools() -> None:
    score = score_example(
        TOOL_TASK_WITH_DEFAULTS, call("get_forecast", city="Paris"), call("get_weather", city="Paris")
    )
    assert not score.valid and score.detail is not None and "unknown tool" in score.detail


def test_tool_call_bad_reference_is_an_error() -> None:
    with pytest.raises(BadRequestError, match="reference answer is not a tool call"):
        score_example(TOOL_TASK, call("get_weather", city="Paris"), '{"city": "Paris"}')


# -- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "valid", "exact", "f1"),
    [
        pytest.param("  hello   world\n", "hello world", True, True, 1.0, id="whitespace"),
        pytest.param("The cat sat.", "the cat sat", True, False, 1.0, id="f1-ignores-case-punct-articles"),
        pytest.param("cat sat on mat", "the cat sat", True, False, 2 / 3, id="partial-overlap"),
        pytest.param("dog", "the cat sat", True, False, 0.0, id="no-overlap"),
        pytest.param("cat cat cat", "cat", True, False, 0.5, id="repeated-tokens-count-once"),
        pytest.param("", "the cat sat", False, False, 0.0, id="empty"),
        pytest.param("   ", "the cat sat", False, False, 0.0, id="blank"),
    ],
)
def test_text(prediction: str, reference: str, valid: bool, exact: bool, f1: float) -> None:
    check(score_example(TEXT_TASK, prediction, reference), valid, exact, f1)


@pytest.mark.parametrize("task", [JSON_TASK, LABEL_TASK, TOOL_TASK, TEXT_TASK], ids=lambda t: t.kind)
def test_no_answer_scores_zero(task: Task) -> None:
    score = score_example(task, None, '{"name": "Ada", "arguments": {}}')
    check(score, False, False, 0.0)
    assert score.detail == "no answer: the model call failed"


# -- aggregate -----------------------------------------------------------------------------------


def test_aggregate_empty() -> None:
    assert aggregate([]) == TaskMetrics(
        n=0, valid_rate=0.0, exact_match=0.0, f1=0.0, primary=0.0, latency_ms_p50=None, latency_ms_p95=None
    )


def test_aggregate_rates_and_latency_percentiles() -> None:
    scores = [
        ExampleScore(valid=True, exact=True, f1=1.0),
        ExampleScore(valid=True, exact=False, f1=0.5),
        ExampleScore(valid=True, exact=False, f1=0.25),
        ExampleScore(valid=False, exact=False, f1=0.0),
    ]
    metrics = aggregate(scores, latencies_ms=[400.0, 100.0, 300.0, 200.0])
    assert metrics.n == 4
    assert metrics.valid_rate == 0.75
    assert metrics.exact_match == metrics.primary == 0.25
    assert metrics.f1 == pytest.approx(0.4375)
    # Linear interpolation between the order statistics, as numpy's default.
    assert metrics.latency_ms_p50 == pytest.approx(250.0)
    assert metrics.latency_ms_p95 == pytest.approx(385.0)


@pytest.mark.parametrize("latencies", [None, []])
def test_aggregate_without_latencies(latencies: list[float] | None) -> None:
    metrics = aggregate([ExampleScore(valid=True, exact=True, f1=1.0)], latencies)
    assert (metrics.latency_ms_p50, metrics.latency_ms_p95) == (None, None)
    assert (metrics.n, metrics.exact_match, metrics.primary) == (1, 1.0, 1.0)


def test_aggregate_one_latency() -> None:
    metrics = aggregate([ExampleScore(valid=True, exact=True, f1=1.0)], [42.0])
    assert (metrics.latency_ms_p50, metrics.latency_ms_p95) == (42.0, 42.0)
