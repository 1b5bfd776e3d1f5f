"""Hostile input against a real daemon (issue 16): a bounded set of bad requests, fixed and random.

    python bench/bench_hostile.py            # ~1-2 minutes
    BENCH_JUNK=100 python bench/bench_hostile.py

While the requests run, /healthz is polled every 10 ms: its slowest answer is the longest stall of
the event loop. The anchor is the same poll with the daemon idle, from the same run. Prints one
table: figure, anchor, ratio, target. Run it on an idle machine: the engine's threads and the
event loop share the same cores, and a busy machine stalls the loop by itself.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_daemon import ROWS, Daemon, print_table, row

from slm_agent.models import BUNDLED_NAME, ModelStore, ensure_bundled

JUNK = int(os.environ.get("BENCH_JUNK", "300"))
WORKERS = 4
SURROGATE = "a\\ud800b"  # a JSON escape: a lone surrogate once parsed
VALID_CHAT: dict[str, Any] = {
    "model": BUNDLED_NAME,
    "messages": [{"role": "user", "content": "Say hi"}],
    "max_tokens": 2,
}
ODD_VALUES: list[Any] = [
    None, True, False, -1, 0, 2**70, -(2**70), 1e308, "", "x" * 5000, [], {}, [[[]]], {"a": {"b": 1}},
    "sometimes", "required", "auto", "none", 0.5, -0.0,
]  # fmt: skip


def raw(path: str, text: str, method: str = "POST") -> dict[str, Any]:
    return {
        "method": method,
        "url": path,
        "content": text.encode(),
        "headers": {"content-type": "application/json"},
    }


def fixed_cases() -> list[dict[str, Any]]:
    """The cases the issue names, each once."""
    chat = json.dumps
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1100)}}

    def twenty_megabytes() -> Iterator[bytes]:
        for _ in range(320):
            yield b"x" * 65536

    return [
        raw("/v1/chat/completions", f'{{"model": "{BUNDLED_NAME}", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}'),
        raw("/v1/completions", f'{{"model": "{BUNDLED_NAME}", "prompt": "x", "stop": ["{SURROGATE}"]}}'),
        raw("/v1/tasks/classify", f'{{"input": "{SURROGATE}"}}'),
        raw("/v1/agent/runs", f'{{"goal": "{SURROGATE}"}}'),
        raw("/v1/completions", f'{{"model": "{BUNDLED_NAME}", "prompt": "x", "temperature": NaN}}'),
        raw("/v1/chat/completions", chat({**VALID_CHAT, "tool_choice": "sometimes"})),
        raw("/v1/chat/completions", chat({**VALID_CHAT, "tool_choice": "required"})),
        raw("/v1/chat/completions", chat({**VALID_CHAT, "top_logprobs": 1_000_000})),
        raw("/v1/chat/completions", chat({**VALID_CHAT, "max_tokens": 1_000_000_000})),
        raw("/v1/chat/completions", chat({**VALID_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": wide}}})),
        raw("/v1/agent/runs", chat({"goal": "x", "max_cost_usd": False})),
        raw("/v1/traces/tr_x/feedback", "{}"),
        raw("/v1/traces?before_seq=99999999999999999999", "", "GET"),
        raw("/v1/stats?end=0.5", "", "GET"),
        raw("/v1/completions", chat({"model": BUNDLED_NAME, "prompt": "word " * 180_000})),
        raw("/v1/chat/completions", "[" * 100_000 + "]" * 100_000),
        raw("/v1/chat/completions", '{"model": "' + "x" * 900_000 + '"}'),
        {"method": "POST", "url": "/v1/chat/completions", "content": twenty_megabytes(), "headers": {"content-type": "application/json"}},
        {"method": "POST", "url": "/v1/tasks/classify", "content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}},
        {"method": "GET", "url": "/v1/models", "headers": {"host": "attacker.example"}},
        {"method": "GET", "url": "/healthz", "headers": {"host": "attacker.example:8765"}},
    ]  # fmt: skip


def junk_cases(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Valid requests with one field swapped for an odd value, and bodies of random bytes."""
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/tasks/classify", "/v1/agent/runs", "/v1/stats"]
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
              "tools", "tool_choice", "response_format", "logprobs", "prompt", "input", "goal"]  # fmt: skip
    cases = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            cases.append({"method": "POST", "url": rng.choice(paths), "content": body,
                          "headers": {"content-type": "application/json"}})  # fmt: skip
            continue
        body_json: dict[str, Any] = {**VALID_CHAT, "prompt": "Hi"}
        body_json[rng.choice(fields)] = rng.choice(ODD_VALUES)
        if rng.random() < 0.3:
            body_json[rng.choice(fields)] = rng.choice(ODD_VALUES)
        cases.append(raw(rng.choice(paths), json.dumps(body_json)))
    return cases


class Poller:
    """/healthz every 10 ms on its own connection: the slowest answer is the longest loop stall."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                http.get("/healthz")
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.01)


def send_all(url: str, cases: list[dict[str, Any]]) -> tuple[dict[int, int], int]:
    """Status counts, and transport errors (connections the daemon dropped without an answer)."""
    statuses: dict[int, int] = {}
    dropped = 0
    lock = threading.Lock()
    todo = list(cases)

    def work() -> None:
        nonlocal dropped
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    case = todo.pop()
                try:
                    status = http.request(**case).status_code
                except httpx.TransportError:
                    with lock:
                        dropped += 1
                    continue
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, dropped


def main() -> None:
    rng = random.Random(16)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = ModelStore(home / "store")
        ensure_bundled(store)
        # A small context and cap keep any generation a junk request starts short.
        daemon = Daemon(home / "d", home / "store", SLM_AGENT_N_CTX="1024", SLM_AGENT_MAX_TOKENS_CAP="16")
        try:
            daemon.first_answer_s()
            time.sleep(2)  # let start-up work (encoder, first trace writes) settle before the anchor
            with Poller(daemon.url) as idle:
                time.sleep(5)
            idle_rss = daemon.rss_mb()
            cases = fixed_cases() + junk_cases(rng, JUNK)
            started = time.perf_counter()
            with Poller(daemon.url) as busy:
                statuses, dropped = send_all(daemon.url, cases)
            elapsed = time.perf_counter() - started
            alive = httpx.get(f"{daemon.url}/healthz", timeout=5).status_code
            time.sleep(2)  # steady state: what the run left behind, not what it held mid-request
            after_rss = daemon.rss_mb()
        finally:
            daemon.stop()
    errors_5xx = sum(n for status, n in statuses.items() if status >= 500)
    print(
        f"  statuses: {dict(sorted(statuses.items()))}, dropped: {dropped}, in {elapsed:.1f}s",
        file=sys.stderr,
    )
    row("hostile requests tried", len(cases), None, None, "-", "{:.0f}")
    row("5xx answers", errors_5xx, None, None, "0", "{:.0f}")
    row("connections dropped without an answer", dropped, None, None, "0", "{:.0f}")
    row("healthz after the run (status)", alive, None, None, "200", "{:.0f}")
    stall, idle_max = max(busy.latencies) * 1000, max(idle.latencies) * 1000
    row("longest event-loop stall ms (vs idle)", stall, idle_max, stall / idle_max, "<= 50 ms", "{:.1f}")
    p99, idle_p99 = (
        statistics.quantiles(x, n=100, method="inclusive")[98] * 1000
        for x in (busy.latencies, idle.latencies)
    )
    row("healthz p99 ms under hostile load (vs idle)", p99, idle_p99, p99 / idle_p99, "-", "{:.1f}")
    row("RSS MB after the run (vs idle)", after_rss, idle_rss, after_rss / idle_rss, "<= 1.15x", "{:.0f}")
    print_table(ROWS)


if __name__ == "__main__":
    main()
