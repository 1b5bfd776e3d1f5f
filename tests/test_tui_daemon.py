"""The monitor against the real daemon subprocess: stats, traces, live events, feedback, shutdown.

Every wait here is bounded, and none goes through ``app.workers.wait_for_complete()``: with the
live event pump running it waits forever, and it swallows the cancellation a timeout sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import pytest

from slm_agent.contracts.records import Feedback
from slm_agent.models import BUNDLED_NAME
from slm_agent.runtime.store.queries import TraceFilter
from slm_agent.tui.app import create_app
from slm_agent.tui.sources import DaemonSource, LiveEvent

pytest.importorskip("slm_agent.runtime.daemon", reason="the daemon (runtime/daemon.py) has not landed yet")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _complete(daemon: Any) -> None:
    with daemon.client() as client:
        r = client.post("/v1/completions", json={"model": BUNDLED_NAME, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text


async def _first_trace_event(source: DaemonSource) -> LiveEvent:
    async with contextlib.aclosing(source.events()) as events:
        async for event in events:
            if event.kind == "trace":
                return event
    raise AssertionError("the event stream ended")


async def _until(condition: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.anyio
async def test_monitor_reads_and_writes_through_real_daemon(make_daemon: Any) -> None:
    daemon = make_daemon()
    source = DaemonSource(daemon.url)
    # From the first event on, not from "now": a completion that lands before the stream is
    # connected is replayed rather than missed.
    source.last_event_id = 0
    try:
        waiter = asyncio.create_task(_first_trace_event(source))
        try:
            await asyncio.to_thread(_complete, daemon)
            event = await asyncio.wait_for(waiter, 30)
        finally:
            waiter.cancel()
            await asyncio.wait([waiter])
        page = await source.traces(TraceFilter(limit=10))
        assert page.items and page.items[0].id == event.data["id"]
        stats = await source.stats("5m")
        assert stats.requests >= 1
        await source.send_feedback(page.items[0].id, Feedback(rating="good"))
        detail = await source.trace(page.items[0].id)
        assert [f.rating for f in detail.feedback] == ["good"]
        assert (await source.health()) is not None
    finally:
        await source.close()


@pytest.mark.anyio
async def test_monitor_app_follows_live_traces(make_daemon: Any) -> None:
    daemon = make_daemon()
    await asyncio.to_thread(_complete, daemon)
    source = DaemonSource(daemon.url)
    source.last_event_id = 0  # replay from the start, so the pump's first event proves it connected
    app = create_app(source, live=True)
    async with app.run_test(size=(140, 42)) as pilot:
        await pilot.press("t")
        await asyncio.wait_for(app.wait_for_loads(), 30)
        await pilot.pause()
        table = app.screen.query_one("DataTable")
        assert table.row_count == 1  # type: ignore[attr-defined]
        await _until(lambda: bool(source.last_event_id), what="the live event stream")
        await asyncio.to_thread(_complete, daemon)
        await _until(lambda: table.row_count == 2, what="the live trace in the table")  # type: ignore[attr-defined]
        await pilot.press("m")
        await asyncio.wait_for(app.wait_for_loads(), 30)
        await pilot.pause()
    assert source.client.is_closed  # the app closes its source on exit


def test_sigterm_ends_open_event_streams_promptly(make_daemon: Any) -> None:
    """uvicorn waits for open responses before it stops; an event stream must end on the signal."""
    daemon = make_daemon()
    with (
        httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(10, read=30)) as client,
        client.stream("GET", "/v1/events") as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("retry:")  # the stream is open and subscribed
        start = time.monotonic()
        code = daemon.stop(timeout=20)
        elapsed = time.monotonic() - start
        rest = list(lines)  # ends cleanly: a dropped connection would raise mid-chunk
        assert rest[0] == ": connected"
    assert code in (0, -15), daemon.log()  # uvicorn re-raises SIGTERM once shut down cleanly
    assert elapsed < 5, daemon.log()
    assert "graceful shutdown exceeded" not in daemon.log()
    assert "Application shutdown complete" in daemon.log()
