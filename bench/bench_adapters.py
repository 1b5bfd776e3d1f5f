"""First-use adapter loads (issue 13): what a request to a store adapter nothing has loaded yet
costs, against the same request once the adapter is loaded.

    python bench/bench_adapters.py

Four adapters of a realistic size (rank 8, every layer, every projection: ~7.6 MB each) in a
fresh store; one daemon with room for all of them, one with room for two, cycling through the
four so that every request loads one and evicts another. Prints one table: figure, anchor (same
run), ratio, target. Run it on an idle machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from bench_daemon import ROWS, Daemon, make_adapters, print_table, row

from slm_agent.models import ModelStore, ensure_bundled

BODY = {"messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 4, "temperature": 0}
N_ADAPTERS = 4
CYCLES = 3


def request_ms(url: str, model: str) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "model": model}, timeout=120)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def load_ms(url: str) -> list[float]:
    """The daemon's own load times, from its adapter_load events (replayed from its start)."""
    times: list[float] = []
    with httpx.stream("GET", f"{url}/v1/events", headers={"Last-Event-ID": "0"}, timeout=10) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["kind"] == "adapter_load":
                    times.append(event["data"]["load_ms"])
                    if len(times) == N_ADAPTERS:
                        break
    return times


def first_use(store: Path, home: Path, names: list[str]) -> None:
    daemon = Daemon(home / "all", store)
    daemon.first_answer_s()
    first = [request_ms(daemon.url, name) for name in names]
    warm = [request_ms(daemon.url, name) for name in names]
    loads = load_ms(daemon.url)
    daemon.stop()
    f, w = statistics.median(first), statistics.median(warm)
    row("first request to a store adapter (ms, p50) vs the next", f, w, f / w, "-", "{:.1f}")
    row("first-use adapter load in the daemon (ms, p50)", statistics.median(loads), None, None, "-", "{:.1f}")


def evicting(store: Path, home: Path, names: list[str], adapter_mb: float) -> None:
    roomy = Daemon(home / "roomy", store)
    tight = Daemon(home / "tight", store, SLM_AGENT_ADAPTER_MEMORY_MB=str(2.5 * adapter_mb))
    roomy.first_answer_s()
    tight.first_answer_s()
    loaded, evicted = [], []
    for name in names:  # every adapter loaded once on both
        request_ms(roomy.url, name)
        request_ms(tight.url, name)
    for _ in range(CYCLES):  # alternate so drift hits both sides alike
        for name in names:
            loaded.append(request_ms(roomy.url, name))
            evicted.append(request_ms(tight.url, name))
    roomy.stop()
    tight.stop()
    e, k = statistics.median(evicted), statistics.median(loaded)
    row("request cycling 4 adapters, room for 2 (ms, p50) vs room for all", e, k, e / k, "-", "{:.1f}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = ModelStore(home / "store")
        model = store.path_of(ensure_bundled(store))
        names = []
        for path in make_adapters(model, home, N_ADAPTERS):
            names.append(store.add(path, name=path.stem).name)
        adapter_mb = store.get(names[0]).size / 2**20
        first_use(home / "store", home, names)
        evicting(home / "store", home, names, adapter_mb)
    print_table(ROWS)


if __name__ == "__main__":
    main()
