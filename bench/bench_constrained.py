"""Constrained decoding under llguidance masks vs llama.cpp's GBNF grammars (issue 15).

Real-world tool schemas (bench/tool_schemas.json: weather, search, calendar, email, files, SQL,
HTTP, git, payments, ...) with a request each. Every request offers its tool among a few others
(a ~250-token prompt, the task prefix warm in the cache) and is answered three ways on the same
engine, in alternating order: under llguidance, under GBNF (the path before), and free (no
grammar, same length). Printed: decode tokens/s constrained vs free, per-step mask time, share of
tokens fast-forwarded, tool-call latency side by side, compile time, and answer validity.

    python bench/bench_constrained.py
    python bench/bench_constrained.py --quick      # 8 requests (default 20; --all: every schema)
    BENCH_THREADS=1 python bench/bench_constrained.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
from bench_daemon import print_table

from slm_agent.contracts.tasks import builtin_tasks
from slm_agent.models import ModelStore, ensure_bundled
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest, GenerationResult, grammars
from slm_agent.runtime.engine.constraints import tighten

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
SCHEMAS = Path(__file__).resolve().parent / "tool_schemas.json"
OTHER_TOOLS = 2  # offered beside the right one: a ~250-token prompt
MAX_TOKENS = 64
TARGET_SPEED = 0.9
TARGET_COMPILE_P95_MS = 10.0
ROWS: list[tuple[str, str, str, str, str]] = []


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(figure: str, value: str, anchor: str = "", ratio: str = "", target: str = "") -> None:
    ROWS.append((figure, value, anchor, ratio, target))


def decode_tps(result: GenerationResult) -> float | None:
    """Tokens/s after the first token: fast-forwarded tokens count, they are output too."""
    return result.tokens_per_s


def bench_compile(cases: list[dict[str, Any]], engine: Engine, rng: random.Random) -> None:
    """Cold compiles (schema to grammar to matcher) of typical tool lists, 1 to 8 tools: with the
    tools' metaschema check cached (an agent resends its tools) and with nothing cached."""
    tools = [c["tool"] for c in cases]
    for checked in (True, False):
        times = []
        for _ in range(60):
            offered = rng.sample(tools, rng.randint(1, min(8, len(tools))))
            grammars._compiled.clear()
            engine._guide._templates.clear()
            if checked:
                for tool in offered:
                    grammars.check_schema(grammars.tool_function(tool)["parameters"])
            else:
                grammars._checked.clear()
            started = time.perf_counter()
            engine._guide.matcher(grammars.tool_call_grammar(offered))
            times.append((time.perf_counter() - started) * 1000)
        label = "tools checked before" if checked else "nothing cached (jsonschema check ~3 ms a tool)"
        target = f"p95 <= {TARGET_COMPILE_P95_MS:.0f}" if checked else ""
        row(
            f"compile ms, 1-8 tools, p50 / p95: {label}",
            f"{pct(times, 0.5):.1f} / {pct(times, 0.95):.1f}",
            "",
            "",
            target,
        )
    started = time.perf_counter()
    engine._guide.matcher(grammars.tool_call_grammar(tools))  # every tool of the file at once
    row(f"compile ms, all {len(tools)} tools in one list", f"{(time.perf_counter() - started) * 1000:.0f}")
    started = time.perf_counter()
    for _ in range(100):
        engine._guide.matcher(grammars.tool_call_grammar(tools[:5]))
    row("compile ms, cached (5 tools)", f"{(time.perf_counter() - started) * 10:.2f}")


def run(
    engine: Engine, mode: str, case: dict[str, Any], tools: list[dict[str, Any]], n: int
) -> GenerationResult:
    task = next(t for t in builtin_tasks() if t.name == "tool_call")
    engine.config.constraints = "gbnf" if mode == "gbnf" else "llguidance"
    req = GenerationRequest(
        prefix=task.prefix(),
        body=task.body(case["request"], tools),
        grammar=None if mode == "free" else grammars.tool_call_grammar(tools),
        max_tokens=n,
        stop=["\n"],
    )
    started = time.perf_counter()
    result = engine.generate(engine.prepare(req))
    result.total_ms = (time.perf_counter() - started) * 1000  # prepare (matcher copy) included
    return result


def bench_calls(cases: list[dict[str, Any]], engine: Engine, rng: random.Random) -> None:
    tools = [c["tool"] for c in cases]
    lat: dict[str, list[float]] = {"llguidance": [], "gbnf": []}
    tps: dict[str, list[float]] = {"llguidance": [], "gbnf": [], "free": []}
    speed_ratios: list[float] = []
    masks: list[float] = []
    forced = completion = valid = prompt = truncated = 0
    for i, case in enumerate(cases):
        offered = [case["tool"], *rng.sample([t for t in tools if t is not case["tool"]], OTHER_TOOLS)]
        rng.shuffle(offered)
        run(engine, "llguidance", case, offered, 4)  # warm: the prefix and this body's KV
        order = ["llguidance", "gbnf"] if i % 2 else ["gbnf", "llguidance"]
        results = {mode: run(engine, mode, case, offered, MAX_TOKENS) for mode in order}
        new = results["llguidance"]
        free = run(engine, "free", case, offered, new.completion_tokens)
        prompt += new.prompt_tokens
        for mode, result in results.items():
            lat[mode].append(result.total_ms)
            if (t := decode_tps(result)) is not None:
                tps[mode].append(t)
        if (t := decode_tps(free)) is not None:
            tps["free"].append(t)
            if (c := decode_tps(new)) is not None:
                speed_ratios.append(c / t)
        masks += new.mask_ms
        forced += new.forced_tokens
        completion += new.completion_tokens
        truncated += new.finish_reason == "length"
        try:
            call = json.loads(new.text)
            fn = next(
                grammars.tool_function(t)
                for t in offered
                if grammars.tool_function(t)["name"] == call["name"]
            )
            jsonschema.validate(call["arguments"], tighten(fn["parameters"]))
            valid += 1
        except (ValueError, StopIteration, jsonschema.ValidationError):
            pass
    n = len(cases)
    row("requests (prompt tokens, mean)", f"{n} ({prompt // n})")
    row(
        "decode tok/s constrained / free, median ratio",
        f"{statistics.median(speed_ratios):.2f}x",
        f"GBNF {statistics.median(tps['gbnf']) / statistics.median(tps['free']):.2f}x",
        "",
        f">= {TARGET_SPEED}x",
    )
    row(
        "decode tok/s, median: llguidance | GBNF | free",
        f"{statistics.median(tps['llguidance']):.1f}",
        f"{statistics.median(tps['gbnf']):.1f} | {statistics.median(tps['free']):.1f}",
        f"{statistics.median(tps['llguidance']) / statistics.median(tps['gbnf']):.1f}x GBNF",
    )
    row("mask ms per sampled step, p50 / p99", f"{pct(masks, 0.5):.3f} / {pct(masks, 0.99):.3f}")
    row("tokens fast-forwarded", f"{forced / completion:.0%}", f"{forced} of {completion}")
    for q in (0.5, 0.95):
        new_ms, old_ms = pct(lat["llguidance"], q), pct(lat["gbnf"], q)
        row(
            f"tool-call latency p{int(q * 100)} ms",
            f"{new_ms:.0f}",
            f"GBNF {old_ms:.0f}",
            f"{new_ms / old_ms:.2f}x",
        )
    row("answers that parse and validate", f"{valid}/{n}", f"{truncated} cut at {MAX_TOKENS} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 requests instead of 20")
    parser.add_argument(
        "--all", action="store_true", help="a request for every schema (GBNF takes ~30 s each)"
    )
    args = parser.parse_args()
    cases = json.loads(SCHEMAS.read_text())
    rng = random.Random(15)
    if not args.all:
        cases = rng.sample(cases, 8 if args.quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        manifest = ensure_bundled(store)
        engine = Engine(EngineConfig(model_path=store.path_of(manifest), n_ctx=2048, n_threads=THREADS))
        engine.load()
        try:
            engine._guide.tokenizer()
            bench_compile(json.loads(SCHEMAS.read_text()), engine, rng)
            bench_calls(cases, engine, rng)
        finally:
            engine.shutdown()
    print(f"threads={THREADS}")
    print_table(ROWS)


if __name__ == "__main__":
    main()
