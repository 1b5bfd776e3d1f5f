"""Responses API overhead (issue 13): the same question through ``POST /v1/responses`` and
``POST /v1/chat/completions`` of one daemon, alternated so drift hits both alike.

    python bench/bench_responses.py

Both answer locally with the bundled model, same prompt, 8 tokens at temperature 0: the
difference is the Responses layer (input items to messages, the stored response, its events).
Run it on an idle machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
from bench_daemon import ROWS, Daemon, pct, print_table, row

from slm_agent.models import BUNDLED_NAME, ModelStore, ensure_bundled

QUESTION = "Name three rivers of Europe."
N = 30


def timed(url: str, path: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    httpx.post(f"{url}{path}", json=body, timeout=120).raise_for_status()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        ensure_bundled(store)
        daemon = Daemon(Path(tmp) / "home", store.root)
        daemon.first_answer_s()
        chat = {
            "model": BUNDLED_NAME,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8,
            "temperature": 0,
        }
        responses = {"model": BUNDLED_NAME, "input": QUESTION, "max_output_tokens": 8, "temperature": 0}
        ours, anchor = [], []
        for _ in range(N):
            anchor.append(timed(daemon.url, "/v1/chat/completions", chat))
            ours.append(timed(daemon.url, "/v1/responses", responses))
        daemon.stop()
    p50, a50 = pct(ours, 0.5), pct(anchor, 0.5)
    row(
        "Responses API latency p50 (ms) vs chat completions, same daemon",
        p50,
        a50,
        p50 / a50,
        "<= 1.05x",
        "{:.1f}",
    )
    print_table(ROWS)


if __name__ == "__main__":
    main()
