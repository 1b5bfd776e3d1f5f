"""Continuous batching (issue 14), each figure against its anchor in the same run.

    python bench/bench_batching.py                  # all
    python bench/bench_batching.py live busy        # some: throughput prefixes live busy unbounded

Anchors: llama.cpp's own batched decode driven from Python with no engine around it (one
``llama_batch`` of N sequences a step, argmax of each row: the llama_batch limit), the engine
serving one request alone, and the same engine idle. Run it on an idle machine: every figure is
CPU-bound on the same cores.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from bench_daemon import ROWS, THREADS, make_adapters, pct, print_table, row

from slm_agent.models import ModelStore, ensure_bundled
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest, GenerationResult, context

N_TOKENS = 96
WINDOW_S = 8.0
PROMPTS = [f"Story {i}: Once upon a time, in a small village by the sea, there lived" for i in range(8)]


def raw_batched_rate(model: Path, n_seq: int) -> float:
    """Tokens/s of llama.cpp decoding ``n_seq`` sequences in lockstep, N_TOKENS each."""

    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    lm = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 4096, 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, THREADS, THREADS
    params.swa_full, params.kv_unified = True, True
    ctx = llama_cpp.llama_init_from_model(lm, params)
    vocab = llama_cpp.llama_model_get_vocab(lm)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    buf = (llama_cpp.llama_token * 256)()

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    n = 0
    lengths = []
    for s in range(n_seq):
        count = llama_cpp.llama_tokenize(vocab, PROMPTS[s].encode(), len(PROMPTS[s]), buf, 256, True, True)
        for j in range(count):
            put(n, buf[j], j, s, j == count - 1)
            n += 1
        lengths.append(count)
    batch.n_tokens = n
    started = time.perf_counter()
    llama_cpp.llama_decode(ctx, batch)
    rows = list(range(n_seq))
    last = np.cumsum(lengths) - 1
    tokens = [
        int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, int(i)), shape=(n_vocab,))))
        for i in last
    ]
    for step in range(N_TOKENS - 1):
        for s in rows:
            put(s, tokens[s], lengths[s] + step, s, True)
        batch.n_tokens = n_seq
        llama_cpp.llama_decode(ctx, batch)
        tokens = [
            int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, s), shape=(n_vocab,))))
            for s in rows
        ]
    elapsed = time.perf_counter() - started
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(lm)
    return n_seq * N_TOKENS / elapsed


def engine_rate(engine: Engine, reqs: list[GenerationRequest]) -> float:
    """Aggregate tokens/s of ``reqs`` submitted at once, from submission to the last token."""
    started = time.perf_counter()
    futures: list[Future[GenerationResult]] = [engine.submit(engine.prepare(r)) for r in reqs]
    results = [f.result() for f in futures]
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)


def stories(n: int, adapters: list[str | None] | None = None) -> list[GenerationRequest]:
    names = adapters or [None] * n
    return [
        GenerationRequest(
            prefix=PROMPTS[i % len(PROMPTS)],
            body="",
            max_tokens=N_TOKENS,
            temperature=0.0,
            adapter=names[i],
        )
        for i in range(n)
    ]


def throughput(model: Path, engine: Engine) -> None:
    raw1, raw8 = raw_batched_rate(model, 1), raw_batched_rate(model, 8)
    one = max(engine_rate(engine, stories(1)) for _ in range(2))
    eight = max(engine_rate(engine, stories(8, ["a"] * 8)) for _ in range(2))
    eight_base = engine_rate(engine, stories(8))
    mixed = max(engine_rate(engine, stories(8, ["a", "b"] * 4)) for _ in range(2))
    row(
        "P1 single-stream decode, batching on (tok/s) vs raw llama_batch 1 seq",
        one,
        raw1,
        one / raw1,
        ">= 0.95x",
    )
    row(
        "P6 8 streams, base (tok/s) vs raw llama_batch 8 seqs",
        eight_base,
        raw8,
        eight_base / raw8,
        ">= 0.95x",
    )
    row("P6 8 streams, base (tok/s) vs engine single stream", eight_base, one, eight_base / one, ">= 2.0x")
    row("P6 8 streams, one adapter (tok/s) vs raw 8 seqs (base)", eight, raw8, eight / raw8, "-")
    row("mixed 4+4 streams on two adapters (tok/s) vs 8 on one", mixed, eight, mixed / eight, ">= 0.8x")


def prefixes(engine: Engine) -> None:
    """4 tasks x 2 adapters interleaved: the first call of each pays its ~550-token prefix."""
    tasks = [
        f"Task {t}: " + " ".join(f"rule {t}.{i}: answer in one short word." for i in range(60))
        for t in range(4)
    ]
    cold: list[float] = []
    warm: list[float] = []
    for round_ in range(4):
        for t, task in enumerate(tasks):
            for adapter in ("a", "b"):
                req = GenerationRequest(
                    prefix=task, body=f"\nQ: case {round_}-{t}\nA:", max_tokens=1, adapter=adapter
                )
                result = engine.generate(engine.prepare(req))
                (cold if round_ == 0 else warm).append(result.ttft_ms or 0)
    row(
        "P4 task TTFT warm prefix (ms) vs cold, 4 tasks x 2 adapters",
        pct(warm, 0.5),
        pct(cold, 0.5),
        pct(warm, 0.5) / pct(cold, 0.5),
        "<= 0.1x",
        "{:.0f}",
    )


def live_beside_background(engine: Engine) -> None:
    prompt = "Answer the question in one word. " * 10

    def ttfts() -> list[float]:
        out = []
        for i in range(12):
            req = GenerationRequest(prefix="", body=f"{prompt}\nQ: question {i}?\nA:", max_tokens=1)
            out.append(engine.generate(engine.prepare(req)).ttft_ms or 0)
        return out

    idle = ttfts()
    shadow = [
        GenerationRequest(
            prefix=PROMPTS[i], body="", max_tokens=400, temperature=0.7, seed=i, background=True
        )
        for i in range(8)
    ]
    futures = [engine.submit(engine.prepare(r)) for r in shadow]
    deadline = time.monotonic() + 60
    while engine.running < 8:  # admitted: each reserves its prompt + max_tokens of KV cells
        assert time.monotonic() < deadline, f"only {engine.running} of 8 background sequences started"
        time.sleep(0.01)
    busy = ttfts()
    for r in shadow:
        r.cancel.set()
    for f in futures:
        f.result()
    row(
        "live TTFT p95 beside 8 background sequences (ms) vs idle",
        pct(busy, 0.95),
        pct(idle, 0.95),
        pct(busy, 0.95) / pct(idle, 0.95),
        "<= 1.5x",
        "{:.0f}",
    )


def no_max_tokens(engine: Engine) -> None:
    """8 requests that set no max_tokens, as most agents send them (the engine allows the rest of
    n_ctx): decoded for a fixed window with cells reserved for their first 256 tokens, against
    reserving all of max_tokens (what a worst-case reservation, or llama-server's fixed slots of
    n_ctx/np, amounts to)."""

    def window(reserve: int) -> tuple[float, int]:
        context.GENERATION_RESERVE = reserve
        reqs = [GenerationRequest(prefix=PROMPTS[i], body="", max_tokens=10**6) for i in range(8)]
        started = time.perf_counter()
        futures = [engine.submit(engine.prepare(r)) for r in reqs]  # prepare clamps to n_ctx
        time.sleep(1.0)
        admitted = engine.running
        time.sleep(WINDOW_S - 1.0)
        for r in reqs:
            r.cancel.set()
        tokens = sum(f.result().completion_tokens for f in futures)
        return tokens / (time.perf_counter() - started), admitted

    default = context.GENERATION_RESERVE
    try:
        worst, worst_admitted = window(10**6)
        ours, admitted = window(default)
    finally:
        context.GENERATION_RESERVE = default
    row(
        f"8 streams without max_tokens (tok/s over {WINDOW_S:.0f} s): {admitted} decoding at once, reserving "
        f"{default} tokens, vs {worst_admitted} reserving all",
        ours,
        worst,
        ours / worst,
        "-",
    )


def busy_core(engine: Engine) -> None:
    def rate() -> float:
        return max(engine_rate(engine, stories(1)) for _ in range(2))

    idle = rate()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = rate()
    finally:
        spin.kill()
    row("decode with one core busy (tok/s) vs idle", busy, idle, busy / idle, ">= 0.4x")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        model = store.path_of(ensure_bundled(store))
        adapters = make_adapters(model, Path(tmp), 2)
        engine = Engine(
            EngineConfig(model_path=model, n_ctx=2048, n_threads=THREADS, max_contexts=2, kv_budget_mb=256)
        )
        engine.load()
        engine.load_adapter("a", adapters[0])
        engine.load_adapter("b", adapters[1])
        engine.generate(engine.prepare(stories(1)[0]))  # warm
        wanted = set(sys.argv[1:]) or {"throughput", "prefixes", "live", "busy", "unbounded"}
        if "throughput" in wanted:
            throughput(model, engine)
        if "prefixes" in wanted:
            prefixes(engine)
        if "live" in wanted:
            live_beside_background(engine)
        if "busy" in wanted:
            busy_core(engine)
        if "unbounded" in wanted:
            no_max_tokens(engine)
        engine.shutdown()
    print_table(ROWS)


if __name__ == "__main__":
    main()
