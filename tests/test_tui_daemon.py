"""The monitor against the real daemon subprocess: stats, traces, live events, feedback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from slm_agent.models import BUNDLED_NAME
from slm_agent.runtime.monitor_api import TraceFilter
from slm_agent.runtime.traces import Feedback
from slm_agent.tui.app import create_app
from slm_agent.tui.sources import DaemonSource

pytest.importorskip("slm_agent.runtime.daemon", reason="the daemon (runtime/daemon.py) has not landed yet")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _complete(daemon: Any) -> None:
    with daemon.client() as client:
        r = client.post("/v1/completions", json={"model": BUNDLED_NAME, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_monitor_reads_and_writes_through_real_daemon(make_daemon: Any) -> None:
    daemon = make_daemon()
    source = DaemonSource(daemon.url)
    events = source.events()
    pending = asyncio.ensure_future(events.__anext__())  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(_complete, daemon)
    event = await asyncio.wait_for(pending, 30)
    assert event.kind == "trace"
    page = await source.traces(TraceFilter(limit=10))
    assert page.items and page.items[0].id == event.data["id"]
    stats = await source.stats("5m")
    assert stats.requests >= 1
    await source.send_feedback(page.items[0].id, Feedback(rating="good"))
    detail = await source.trace(page.items[0].id)
    assert [f.rating for f in detail.feedback] == ["good"]
    assert (await source.health()) is not None
    await events.aclose()  # type: ignore[attr-defined]

    app = create_app(DaemonSource(daemon.url), live=True)
    async with app.run_test(size=(140, 42)) as pilot:
        await pilot.press("t")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen.query_one("DataTable").row_count >= 1  # type: ignore[attr-defined]
        await pilot.press("m")
        await pilot.pause(0.5)
    await source.close()
