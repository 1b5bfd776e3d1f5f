"""Constrained decoding under llguidance masks, on the real bundled model: every answer parses and
validates, greedy answers agree with the GBNF path, fast-forward emits the tokenizer's own tokens,
and pathological schemas are refused or bounded instead of wedging the engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from slm_agent.contracts.tasks import EXAMPLE_END, builtin_tasks
from slm_agent.errors import SchemaError
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest, GenerationResult, grammars
from slm_agent.runtime.engine.constraints import (
    JSON_OPTIONS,
    MAX_STRING_CHARS,
    Constraint,
    json_grammar,
    tighten,
)
from slm_agent.runtime.serving.tool_calls import read_calls

TASKS = {t.name: t for t in builtin_tasks()}
GBNF_SPACING = {"whitespace_pattern": " ?", "item_separator": ",", "key_separator": ":"}


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    engine = Engine(EngineConfig(model_path=model_path, n_ctx=2048, n_threads=2, prefix_cache_size=4))
    engine.load()
    yield engine
    engine.shutdown()


def _tool(
    name: str, properties: dict[str, Any], required: list[str], description: str = ""
) -> dict[str, Any]:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


WEATHER = _tool(
    "get_weather",
    {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    ["city"],
    "Weather forecast for a city",
)
EVENT = _tool(
    "create_event",
    {
        "title": {"type": "string"},
        "start": {"type": "object", "properties": {"date": {"type": "string"}, "hour": {"type": "integer"}}},
        "attendees": {"type": "array", "items": {"type": "string"}},
        "duration_h": {"type": "number"},
    },
    ["title", "start"],
    "Create a calendar event",
)
EMAIL = _tool(
    "send_email",
    {"to": {"type": "string"}, "subject": {"type": "string"}, "urgent": {"type": "boolean"}},
    ["to", "subject"],
    "Send an email",
)
TOOLS = [WEATHER, EVENT, EMAIL]
REQUESTS = [
    "What's the weather in Lisbon for the next 3 days?",
    "Put a meeting called Budget review on 2025-03-04 at 10 with Ana and Bo, 1.5 hours",
    "Email bob@example.com that the build is broken, it's urgent",
]


def _call(engine: Engine, text: str, tools: list[dict[str, Any]], **kw: Any) -> GenerationResult:
    task = TASKS["tool_call"]
    req = GenerationRequest(
        prefix=task.prefix(),
        body=task.body(text, tools),
        grammar=grammars.tool_call_grammar(tools),
        max_tokens=kw.pop("max_tokens", 64),
        stop=["\n"],
        **kw,
    )
    return engine.generate(engine.prepare(req))


def _both_paths(engine: Engine, run: Any) -> tuple[GenerationResult, GenerationResult]:
    engine.config.constraints = "gbnf"
    try:
        old = run()
    finally:
        engine.config.constraints = "llguidance"
    return run(), old


@pytest.mark.parametrize("text", REQUESTS)
def test_tool_calls_parse_and_validate_against_the_chosen_tool(engine: Engine, text: str) -> None:
    result = _call(engine, text, TOOLS)
    assert result.constraint_engine == "llguidance" and result.finish_reason == "stop"
    call = json.loads(result.text)
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["name"])
    jsonschema.validate(call["arguments"], tighten(schema))
    # json.dumps spacing: the form training labels are written in.
    assert result.text == json.dumps(call)
    assert result.forced_tokens > 0 and len(result.mask_ms) + result.forced_tokens == result.completion_tokens


def test_several_calls_parse_on_both_paths(engine: Engine) -> None:
    task = TASKS["tool_call"]

    def run() -> GenerationResult:
        req = GenerationRequest(
            prefix=task.prefix(),
            body=task.body("What's the weather in Paris, and in Rome?", TOOLS),
            grammar=grammars.task_grammar(task, TOOLS, parallel=True),
            max_tokens=96,
            stop=[EXAMPLE_END],
        )
        return engine.generate(engine.prepare(req))

    new, old = _both_paths(engine, run)
    assert (new.constraint_engine, old.constraint_engine) == ("llguidance", "gbnf")
    for result in (new, old):
        assert result.finish_reason == "stop", result.text
        calls = read_calls(result.text)
        for name, arguments, _ in calls:
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
            jsonschema.validate(json.loads(arguments), tighten(schema))
    assert len(read_calls(new.text)) == 2  # measured: a call for each city


@pytest.mark.slow
def test_greedy_answers_agree_with_the_gbnf_path(engine: Engine) -> None:
    schema = TASKS["extract"].output_schema
    assert schema
    task = TASKS["extract"]
    gbnf = grammars.schema_grammar(schema)
    # The GBNF grammar lets the model put one optional space between tokens, where llguidance's
    # default fixes json.dumps's spacing: compare under the same whitespace rule.
    same_spacing = json_grammar(tighten(schema), {**JSON_OPTIONS, **GBNF_SPACING})
    alike = Constraint("extract-gbnf-spacing", same_spacing, gbnf.gbnf)
    for text in ("Ana Silva from Lisbon works at Acme, ana@acme.io", "Bo Chen, bo@x.org, Oslo"):

        def run(text: str = text) -> GenerationResult:
            req = GenerationRequest(prefix=task.prefix(), body=task.body(text), grammar=alike, max_tokens=80)
            return engine.generate(engine.prepare(req))

        new, old = _both_paths(engine, run)
        assert (new.constraint_engine, old.constraint_engine) == ("llguidance", "gbnf")
        jsonschema.validate(json.loads(new.text), schema)
        assert new.text == old.text.rstrip(" ")  # GBNF also lets a space trail the object


def test_response_formats_and_types_validate(engine: Engine) -> None:
    schemas: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"n": {"type": "number"}, "ok": {"type": "boolean"}},
            "required": ["n", "ok"],
        },
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
            "required": ["tags"],
        },
        {
            "type": "object",
            "properties": {"x": {"oneOf": [{"type": "integer"}, {"type": "null"}]}},
            "required": ["x"],
        },
    ]
    for schema in schemas:
        req = GenerationRequest(
            prefix="Answer in JSON.\nOutput:", body="", grammar=grammars.schema_grammar(schema), max_tokens=40
        )
        result = engine.generate(engine.prepare(req))
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
    req = GenerationRequest(
        prefix="A JSON object about a cat:", body="", grammar=grammars.json_object_grammar(), max_tokens=40
    )
    result = engine.generate(engine.prepare(req))
    assert result.constraint_engine == "llguidance" and result.text.startswith("{")


def test_fast_forwarded_tokens_are_the_tokenizers_tokens(engine: Engine) -> None:
    matcher = engine._guide.matcher(grammars.tool_call_grammar([WEATHER]))
    forced = matcher.compute_ff_tokens()
    assert len(forced) >= 3  # {"name": "get_weather", "arguments": {"city": "... is all forced
    text = engine.detokenize(forced)
    assert text.startswith('{"name": "get_weather"')
    assert engine.tokenize(text, add_bos=False) == forced


def test_logprobs_cover_forced_tokens_and_seeded_sampling_repeats(engine: Engine) -> None:
    greedy = _call(engine, REQUESTS[0], TOOLS, logprobs=True)
    assert len(greedy.token_logprobs) == greedy.completion_tokens
    assert all(lp <= 0 for lp in greedy.token_logprobs)
    one = _call(engine, REQUESTS[1], TOOLS, temperature=0.9, seed=7)
    two = _call(engine, REQUESTS[1], TOOLS, temperature=0.9, seed=7)
    assert one.text == two.text
    json.loads(one.text)


def test_tightened_schemas_are_closed_and_bounded() -> None:
    tight = tighten(EVENT["function"]["parameters"])
    assert tight["additionalProperties"] is False
    assert tight["properties"]["start"]["additionalProperties"] is False
    assert tight["properties"]["title"]["maxLength"] == MAX_STRING_CHARS
    assert tight["properties"]["attendees"]["maxItems"] > 0
    assert tight["properties"]["duration_h"]["maximum"] > 0
    free = tighten(
        {"type": "object", "properties": {"meta": {"type": "object"}}, "additionalProperties": True}
    )
    assert free["additionalProperties"] is True and "additionalProperties" not in free["properties"]["meta"]


def test_compiles_are_cached_and_fast() -> None:
    tools = [WEATHER, EVENT, EMAIL]
    grammars.tool_call_grammar(tools)
    started = time.perf_counter()
    for _ in range(20):
        assert grammars.tool_call_grammar(tools).engine == "llguidance"
    assert (time.perf_counter() - started) / 20 < 0.01


def test_a_string_loop_ends_at_its_bound(engine: Engine) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"]}
    req = GenerationRequest(
        prefix='Repeat "ha" forever.\nOutput:',
        body="",
        grammar=grammars.schema_grammar(schema),
        max_tokens=60,
    )
    result = engine.generate(engine.prepare(req))
    assert result.finish_reason == "stop" and len(json.loads(result.text)["s"]) <= 12


def test_pathological_schemas_fail_clearly_or_stay_bounded(engine: Engine) -> None:
    flat = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1100)}}
    constraint = grammars.schema_grammar(flat)  # GBNF alone hit "maximum recursion depth exceeded"
    assert constraint.engine == "llguidance"
    many = [
        _tool(f"tool_{i}", {"q": {"type": "string"}, "n": {"type": "integer"}}, ["q"]) for i in range(200)
    ]
    started = time.perf_counter()
    assert grammars.tool_call_grammar(many).engine == "llguidance"
    assert time.perf_counter() - started < 2
    with pytest.raises(SchemaError, match="limit is"):
        grammars.schema_grammar({"type": "object", "description": "x" * 300_000})
    with pytest.raises(SchemaError, match="missing"):  # before it queues: neither engine can take it
        engine.prepare(
            GenerationRequest(
                prefix="x", body="", grammar=grammars.schema_grammar({"$ref": "#/$defs/missing"})
            )
        )
    # The engine still serves after all of it.
    assert json.loads(_call(engine, REQUESTS[0], [WEATHER]).text)["name"] == "get_weather"


def test_a_recursive_schema_decodes_within_its_budget(engine: Engine) -> None:
    recursive = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    req = GenerationRequest(
        prefix="A tree:", body="", grammar=grammars.schema_grammar(recursive), max_tokens=30
    )
    result = engine.generate(engine.prepare(req))
    assert result.completion_tokens <= 30 and max(result.mask_ms) < 50


def test_the_gbnf_setting_keeps_the_old_path(engine: Engine) -> None:
    label = TASKS["classify"]

    def classify() -> GenerationResult:
        req = GenerationRequest(
            prefix=label.prefix(),
            body=label.body("I was billed twice"),
            grammar=grammars.label_grammar(label.labels),
            max_tokens=8,
        )
        return engine.generate(engine.prepare(req))

    new, old = _both_paths(engine, classify)
    assert (new.constraint_engine, old.constraint_engine) == ("llguidance", "gbnf")
    assert new.text == old.text and new.text.strip() in label.labels
    free = engine.generate(engine.prepare(GenerationRequest(prefix="Hi", body="", max_tokens=2)))
    assert free.constraint_engine is None and free.forced_tokens == 0
