"""The engine without HTTP: adapters, prefix reuse, grammars, queue, cancellation, deadlines."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import engine_with

from slm_agent.contracts.tasks import builtin_tasks
from slm_agent.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    NotFoundError,
    QueueFullError,
    SchemaError,
)
from slm_agent.runtime.engine import Engine, GenerationRequest, grammars

PROMPT = "The three most important rivers of Europe are"


@pytest.fixture(scope="module")
def adapters(two_loras: dict[str, Path]) -> dict[str, Path]:
    return two_loras


@pytest.fixture(scope="module")
def engine(model_path: Path, adapters: dict[str, Path]) -> Iterator[Engine]:
    yield from engine_with(model_path, adapters, n_ctx=1024, queue_size=2, prefix_cache_size=4)


def greedy(
    engine: Engine, adapter: str | None = None, prefix: str = PROMPT, body: str = "", **kw: object
) -> str:
    req = GenerationRequest(prefix=prefix, body=body, adapter=adapter, max_tokens=24, temperature=0.0, **kw)  # type: ignore[arg-type]
    return engine.generate(engine.prepare(req)).text


def test_adapters_change_output_and_the_base_stays_exact(engine: Engine) -> None:
    """Two contexts (max_contexts=2) for three adapter sets: an idle one switches adapters."""
    base = greedy(engine)
    one = greedy(engine, "lora1")
    two = greedy(engine, "lora2")
    assert len({base, one, two}) == 3, (base, one, two)
    switches = engine.stats.adapter_switches
    assert greedy(engine) == base
    assert greedy(engine, "lora1") == one
    assert greedy(engine) == base
    assert engine.contexts == 2 and engine.stats.adapter_switches > switches


def test_per_request_scale_zero_equals_base(engine: Engine) -> None:
    base = greedy(engine)
    req = GenerationRequest(prefix=PROMPT, body="", adapter="lora1", adapter_scale=0.0, max_tokens=24)
    assert engine.generate(engine.prepare(req)).text == base


def test_kv_cache_is_never_reused_across_adapters(engine: Engine) -> None:
    """The same prompt under another adapter must not reuse the cached prefix."""
    greedy(engine, "lora1")
    req = engine.prepare(GenerationRequest(prefix=PROMPT, body="", adapter="lora2", max_tokens=4))
    result = engine.generate(req)
    assert result.cached_tokens == 0


def test_task_prefix_is_reused_from_kv_and_from_saved_state(engine: Engine) -> None:
    task = {t.name: t for t in builtin_tasks()}["extract"]
    grammar = grammars.schema_grammar(task.output_schema or {})

    def run(text: str) -> tuple[int, float, str]:
        req = GenerationRequest(
            prefix=task.prefix(), body=task.body(text), max_tokens=64, grammar=grammar, stop=["\n"]
        )
        result = engine.generate(engine.prepare(req))
        return result.cached_tokens, result.ttft_ms or 0, result.text

    def other(i: int) -> None:  # another long prefix, kept resident in its turn
        greedy(engine, prefix=f"Unrelated instructions number {i}. " * 12)

    run("Maria Rossi works at Fiat in Turin.")
    other(0)
    stats = engine.stats
    kv_before, state_before = stats.prefix_hits_kv, stats.prefix_hits_state
    cached, _, text = run("Write to tom@example.org, Tom Lee from Oslo.")
    assert cached >= len(engine.tokenize(task.prefix(), add_bos=True)) - 1
    assert engine.stats.prefix_hits_kv == kv_before + 1
    for i in range(1, 6):  # prefix_cache_size=4 resident prefixes: the task's is evicted, saved
        other(i)
    cached, _, _ = run("Jan from Delft.")
    assert cached > 0 and engine.stats.prefix_hits_state == state_before + 1
    parsed = json.loads(text)
    assert set(parsed) == {"name", "email", "city", "company"}


def test_grammars_constrain_output(engine: Engine) -> None:
    tasks = {t.name: t for t in builtin_tasks()}
    label = tasks["classify"]
    req = GenerationRequest(
        prefix=label.prefix(),
        body=label.body("I was billed twice"),
        grammar=grammars.label_grammar(label.labels),
        max_tokens=8,
    )
    assert engine.generate(engine.prepare(req)).text.strip() in label.labels
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "parameters": {
                    "type": "object",
                    "properties": {"order_id": {"type": "integer"}},
                    "required": ["order_id"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "cancel_order",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "order_id": {"type": "integer"},
                        "reason": {"type": "string", "maxLength": 40},
                    },
                    "required": ["order_id", "reason"],
                },
            },
        },
    ]
    call_task = tasks["tool_call"]
    req = GenerationRequest(
        prefix=call_task.prefix(),
        body=call_task.body("Cancel order 1234, I ordered by mistake", tools),
        grammar=grammars.tool_call_grammar(tools),
        max_tokens=80,
        stop=["\n"],
    )
    call = json.loads(engine.generate(engine.prepare(req)).text)
    assert call["name"] in {"lookup_order", "cancel_order"}
    assert isinstance(call["arguments"]["order_id"], int)


def test_invalid_schema_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="invalid JSON schema"):
        grammars.schema_grammar({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(SchemaError, match="not among the request's tools"):
        grammars.tool_call_schema([{"type": "function", "function": {"name": "a"}}], only="b")


def test_prompt_over_context_is_refused_before_queueing(engine: Engine) -> None:
    with pytest.raises(ContextOverflowError, match="context window is 1024"):
        engine.prepare(GenerationRequest(prefix="word " * 2000, body=""))
    with pytest.raises(NotFoundError, match="adapter 'nope' is not loaded"):
        engine.prepare(GenerationRequest(prefix="hi", body="", adapter="nope"))


def test_streaming_callback_and_cancellation(engine: Engine) -> None:
    pieces: list[str] = []
    req = GenerationRequest(prefix="Count: one, two,", body="", max_tokens=200, temperature=0.0)

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 5:
            req.cancel.set()

    req.on_text = on_text
    result = engine.generate(engine.prepare(req))
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 20
    assert "".join(pieces) == result.text


def test_deadline(engine: Engine) -> None:
    req = GenerationRequest(
        prefix="Tell a long story:", body="", max_tokens=400, deadline=time.monotonic() + 0.3
    )
    with pytest.raises(DeadlineExceededError, match="deadline"):
        engine.generate(engine.prepare(req))
    # Still serving afterwards.
    assert greedy(engine)


def test_full_queue_answers_queue_full(engine: Engine) -> None:
    started, gate = threading.Event(), threading.Event()
    blocker = GenerationRequest(prefix="Once upon a time", body="", max_tokens=400)

    def hold(_text: str) -> None:
        started.set()
        gate.wait(10)

    blocker.on_text = hold
    first = engine.submit(engine.prepare(blocker))
    assert started.wait(30), "the worker never started the blocking request"
    queued = [
        engine.submit(engine.prepare(GenerationRequest(prefix="hi", body="", max_tokens=2))) for _ in range(2)
    ]
    try:
        with pytest.raises(QueueFullError, match="queue is full") as info:
            engine.submit(engine.prepare(GenerationRequest(prefix="hi", body="", max_tokens=2)))
        assert info.value.retry_after_s >= 1
    finally:
        blocker.cancel.set()
        gate.set()
    assert first.result(30).finish_reason == "cancelled"
    assert all(f.result(30).completion_tokens >= 1 for f in queued)


def test_logprobs(engine: Engine) -> None:
    req = GenerationRequest(prefix="1, 2, 3, 4,", body="", max_tokens=4, logprobs=True)
    result = engine.generate(engine.prepare(req))
    assert len(result.token_logprobs) == result.completion_tokens
    assert all(lp <= 0 for lp in result.token_logprobs)
    assert max(result.token_logprobs) > -1.0  # counting on is easy for any model
