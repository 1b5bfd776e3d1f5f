"""Daemon benchmarks (issue 3, P1-P6), each against its anchor in the same run.

    python bench/bench_daemon.py            # all
    python bench/bench_daemon.py p1 p4      # some

Prints one table: figure, anchor (same run), ratio, target. Run it on an idle machine: every
figure here is CPU-bound on the same cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from slm_agent.models import BUNDLED_NAME, ModelStore, ensure_bundled

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
ROWS: list[tuple[str, str, str, str, str]] = []


def row(
    name: str, value: float, anchor: float | None, ratio: float | None, target: str, fmt: str = "{:.2f}"
) -> None:
    ROWS.append(
        (
            name,
            fmt.format(value),
            fmt.format(anchor) if anchor is not None else "-",
            f"{ratio:.3f}" if ratio is not None else "-",
            target,
        )
    )
    print(f"  {name}: {fmt.format(value)}", file=sys.stderr)


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    """The run's figures as one markdown table, as README.md quotes them."""
    print("| figure | value | anchor (same run) | ratio | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, home: Path, store: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "SLM_AGENT_HOME": str(home),
            "SLM_AGENT_STORE_DIR": str(store),
            "SLM_AGENT_N_THREADS": str(THREADS),
            "SLM_AGENT_LOG_LEVEL": "warning",
            **env,
        }
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slm_agent.runtime.daemon", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def first_answer_s(self) -> float:
        body = {"model": BUNDLED_NAME, "prompt": "Hi", "max_tokens": 1}
        while True:
            try:
                if httpx.post(f"{self.url}/v1/completions", json=body, timeout=5).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited")
            time.sleep(0.02)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- P1: streaming decode over HTTP vs raw in-process ----------------------------------------------
PROMPT = "Once upon a time, in a small village by the sea, there lived"
N_TOKENS = 128


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def http_stream_rate(url: str) -> float:
    body = {"model": BUNDLED_NAME, "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "stream": True}
    stamps = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return decode_rate(stamps)


def raw_stream_rate(llm: object) -> float:
    stamps = []
    for chunk in llm.create_completion(PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True):  # type: ignore[attr-defined]
        if chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    return decode_rate(stamps)


def p1(model: Path, store: Path, home: Path) -> None:
    from llama_cpp import Llama

    daemon = Daemon(home / "p1", store)
    daemon.first_answer_s()
    llm = Llama(str(model), n_ctx=2048, n_threads=THREADS, verbose=False)
    ours, raw = [], []
    for _ in range(3):  # alternate so drift hits both sides alike
        raw.append(raw_stream_rate(llm))
        ours.append(http_stream_rate(daemon.url))
    llm.close()
    daemon.stop()
    o, r = statistics.median(ours), statistics.median(raw)
    row("P1 streaming decode tokens/s over HTTP (vs raw llama-cpp-python)", o, r, o / r, ">= 0.95x", "{:.1f}")


# -- P2: adapter switch ------------------------------------------------------------------------------
def make_adapters(model: Path, folder: Path, n: int) -> list[Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from lora import make_lora

    targets = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    return [
        make_lora(
            folder / f"bench-lora{i}.gguf", model, seed=i, rank=8, layers=tuple(range(18)), targets=targets
        )
        for i in range(n)
    ]


def p2(model: Path, adapters: list[Path]) -> None:
    """An idle context switched between two adapters (what a request for another adapter costs
    when every context is in use by then: max_contexts=1)."""
    from slm_agent.runtime.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model_path=model, n_ctx=1024, n_threads=THREADS, max_contexts=1))
    engine.load()
    engine.load_adapter("a", adapters[0])
    engine.load_adapter("b", adapters[1])
    times = []
    assert engine._pool is not None
    for i in range(400):
        name = "a" if i % 2 else "b"
        t = time.perf_counter()
        engine._pool.get((name, 1.0), engine.adapters[name].handle)
        times.append((time.perf_counter() - t) * 1000)
    engine.shutdown()
    row("P2 adapter switch p95 (ms)", pct(times, 0.95), None, None, "<= 1 ms", "{:.3f}")


# -- P3: memory --------------------------------------------------------------------------------------
def p3(store: Path, home: Path, adapters: list[Path]) -> None:
    models = ModelStore(store)
    names = []
    for path in adapters[:4]:
        name = path.stem
        if not models.has(name):
            models.add(path, name=name)
        names.append(name)
    base = Daemon(home / "p3a", store)
    base.first_answer_s()
    time.sleep(0.5)
    base_rss = base.rss_mb()
    base.stop()
    with_adapters = Daemon(home / "p3b", store, SLM_AGENT_ADAPTERS=json.dumps(names))
    with_adapters.first_answer_s()
    time.sleep(0.5)
    ad_rss = with_adapters.rss_mb()
    with_adapters.stop()
    row(
        "P3 RSS base + 4 rank-8 adapters (MB) vs base alone",
        ad_rss,
        base_rss,
        ad_rss / base_rss,
        "<= 1.15x",
        "{:.0f}",
    )
    row("P3 idle daemon RSS (MB)", base_rss, None, None, "<= 500 MB", "{:.0f}")


# -- P4: task prefix reuse ---------------------------------------------------------------------------
def task_ttfts(url: str, calls: list[tuple[str, str]]) -> list[tuple[str, float]]:
    out = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for task, text in calls:
            body = http.post(f"/v1/tasks/{task}", json={"input": text}).json()
            trace = http.get(f"/v1/traces/{body['id']}").json()
            out.append((task, float(trace["trace"]["ttft_ms"])))
    return out


def p4(store: Path, home: Path) -> None:
    inputs = [
        f"Hello, this is person {i} from Company {i} in City {i}, mail p{i}@c{i}.example" for i in range(6)
    ]
    alternating = [("extract", t) for t in inputs]
    alternating = [
        c for pair in zip(alternating, [("classify", "refund my order")] * 6, strict=True) for c in pair
    ]
    cold_daemon = Daemon(home / "p4a", store, SLM_AGENT_PREFIX_CACHE_SIZE="0")
    cold_daemon.first_answer_s()
    cold = [ms for task, ms in task_ttfts(cold_daemon.url, alternating) if task == "extract"]
    cold_daemon.stop()
    warm_daemon = Daemon(home / "p4b", store)
    warm_daemon.first_answer_s()
    state = [ms for task, ms in task_ttfts(warm_daemon.url, alternating) if task == "extract"][1:]
    kv = [ms for _, ms in task_ttfts(warm_daemon.url, alternating[::2])][1:]
    warm_daemon.stop()
    c = statistics.median(cold)
    row(
        "P4 task TTFT, prefix state restored (ms) vs cold",
        statistics.median(state),
        c,
        statistics.median(state) / c,
        "<= 0.3x",
    )
    row(
        "P4 task TTFT, prefix resident in KV (ms) vs cold",
        statistics.median(kv),
        c,
        statistics.median(kv) / c,
        "<= 0.3x",
    )


# -- P5: start to first answer ----------------------------------------------------------------------
def p5(store: Path, home: Path) -> None:
    times = []
    for i in range(3):
        daemon = Daemon(home / f"p5-{i}", store)
        times.append(daemon.first_answer_s())
        daemon.stop()
    row("P5 slm-agentd start to first answered request (s)", statistics.median(times), None, None, "<= 2 s")


# -- P6: routing + trace overhead ----------------------------------------------------------------
def p6(store: Path, home: Path) -> None:
    from slm_agent.contracts.api import ChatCompletionRequest
    from slm_agent.runtime.config import load_settings
    from slm_agent.runtime.http.services import build_services
    from slm_agent.runtime.serving import responses
    from slm_agent.runtime.serving.context import CallContext

    os.environ["SLM_AGENT_HOME"] = str(home / "p6")
    services = build_services(load_settings(store_dir=store, n_threads=THREADS, n_ctx=2048))
    services.engine.load()
    overhead = []
    request = ChatCompletionRequest.model_validate(
        {"model": "task:classify", "messages": [{"role": "user", "content": "I was charged twice"}]}
    )
    for _ in range(200):
        t0 = time.perf_counter()
        job = services.jobs.chat_job(request, CallContext(client="127.0.0.1", session_id="bench"))
        t1 = time.perf_counter()
        result = services.engine.generate(job.gen)
        t2 = time.perf_counter()
        answer = responses.chat_answer(job, result)
        responses.chat_completion(job, result, answer)
        services.recorder.local(job, result, answer)
        t3 = time.perf_counter()
        overhead.append(((t1 - t0) + (t3 - t2)) * 1000)
    services.engine.shutdown()
    row(
        "P6 routing + prompt + trace overhead per request, p95 (ms)",
        pct(overhead, 0.95),
        None,
        None,
        "<= 2 ms",
        "{:.3f}",
    )


def main() -> None:
    wanted = set(sys.argv[1:]) or {"p1", "p2", "p3", "p4", "p5", "p6"}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store_dir = home / "store"
        store = ModelStore(store_dir)
        model = store.path_of(ensure_bundled(store))
        adapters = make_adapters(model, home, 4) if wanted & {"p2", "p3"} else []
        if "p1" in wanted:
            p1(model, store_dir, home)
        if "p2" in wanted:
            p2(model, adapters)
        if "p3" in wanted:
            p3(store_dir, home, adapters)
        if "p4" in wanted:
            p4(store_dir, home)
        if "p5" in wanted:
            p5(store_dir, home)
        if "p6" in wanted:
            p6(store_dir, home)
    print_table(ROWS)


if __name__ == "__main__":
    main()
