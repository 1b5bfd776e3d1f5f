"""Monitor benchmark with 100,000 traces: TUI start, filter latency, CPU cost of the 1/s stats refresh.

python bench/bench_tui.py [--n 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from textual.widgets import DataTable

from slm_agent.runtime.store import queries as mon
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.tui.app import create_app
from slm_agent.tui.demo import seed
from slm_agent.tui.sources import DbSource

END = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


async def start_and_filter(path: Path) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    app = create_app(DbSource(path, clock=lambda: END), live=False)
    async with app.run_test(size=(140, 42)) as pilot:
        while getattr(app.screen, "stats", None) is None:
            await asyncio.sleep(0.005)
        start = time.perf_counter() - t0
        await pilot.press("t")
        await app.workers.wait_for_complete()
        screen = app.screen
        timings = []
        for changes in ({"task": "pick_tool"}, {"q": "invoice #99999"}):
            t1 = time.perf_counter()
            screen.apply(**changes)  # type: ignore[attr-defined]
            await app.workers.wait_for_complete()
            await pilot.pause()
            timings.append(time.perf_counter() - t1)
            assert screen.query_one(DataTable).row_count > 0
            screen.filter = mon.TraceFilter()  # type: ignore[attr-defined]
    return start, timings[0], timings[1]


def stats_cpu(path: Path, window: str, calls: int = 20) -> float:
    conn = mon.ReadOnlyDb(path).conn
    mon.query_stats(conn, window, end=END)
    t0 = time.process_time()
    for _ in range(calls):
        mon.query_stats(conn, window, end=END)
    return (time.process_time() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "traces.db")
        seed(store, args.n, end=END, span=timedelta(days=7))  # a week of traffic, ~10 requests/min
        store.close()
        path = Path(tmp) / "traces.db"
        start, filt_task, filt_text = asyncio.run(start_and_filter(path))
        cpu = {w: stats_cpu(path, w) for w in ("5m", "1h", "24h")}
    from slm_agent.tui.screens.dashboard import REFRESH_S

    rows = [
        ("TUI start to dashboard data (s)", start, 1.5),
        ("filter by task applies (s)", filt_task, 0.2),
        ("text search applies (s)", filt_text, 0.2),
        *(
            (f"stats {w} CPU per refresh ÷ {REFRESH_S[w]:.0f} s (%)", cpu[w] / REFRESH_S[w] * 100, 1.0)
            for w in cpu
        ),
        ("stats 24h CPU at 1/s (%)", cpu["24h"] * 100, 1.0),
    ]
    print(f"{args.n:,} traces")
    print(f"{'figure':<46}{'value':>10}{'target':>10}{'ratio':>8}")
    for name, value, target in rows:
        print(f"{name:<46}{value:>10.3f}{target:>10.3f}{value / target:>8.2f}")


if __name__ == "__main__":
    main()
