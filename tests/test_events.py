"""EventBus: ids, thread-safe publishing, resume from the ring buffer and from the database; SSE."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from slm_agent.contracts.records import TraceRecord
from slm_agent.runtime.http.deps import started_services
from slm_agent.runtime.http.routes import monitor
from slm_agent.runtime.store.events import SEQ_SHIFT, EventBus
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.tui.sources import DaemonSource


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    s = TraceStore(tmp_path / "traces.db")
    yield s
    s.close()


async def take(it, n: int, timeout: float = 5) -> list:  # type: ignore[no-untyped-def]
    return [await asyncio.wait_for(it.__anext__(), timeout) for _ in range(n)]


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def monitor_app(store: TraceStore, bus: EventBus) -> FastAPI:
    """The monitor routes behind an HTTP middleware, as in the daemon."""
    app = FastAPI()
    app.dependency_overrides[started_services] = lambda: SimpleNamespace(traces=store, events=bus)
    app.include_router(monitor.router)

    @app.middleware("http")
    async def passthrough(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        return await call_next(request)

    return app


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """uvicorn on a free loopback port in this loop; yields the base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=30)
    )
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.anyio
async def test_ids_increase_and_encode_trace_seq(store: TraceStore) -> None:
    bus = EventBus(store)
    store.add_listener(bus.publish_trace)
    a = bus.publish("model_load", {"model": "m"})
    t = store.insert(TraceRecord(endpoint="/x"))
    b = bus.publish("adapter_load", {"name": "a"})
    assert a.id < bus._ring[1].id < b.id
    assert bus._ring[1].id >> SEQ_SHIFT == t.seq
    # A new bus (daemon restart) continues above the old ids.
    assert EventBus(store).last_id >= t.seq << SEQ_SHIFT


@pytest.mark.anyio
async def test_live_delivery_from_worker_threads(store: TraceStore) -> None:
    bus = EventBus(store)
    store.add_listener(bus.publish_trace)
    # From the current id, not "from now": on a loaded machine the subscription may attach only
    # after the first inserts, and those must still arrive (from the ring buffer).
    it = bus.subscribe(bus.last_id)
    first = asyncio.ensure_future(it.__anext__())
    threads = [threading.Thread(target=lambda: [store.insert(TraceRecord(endpoint="/x")) for _ in range(25)])
               for _ in range(4)]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    events = [await asyncio.wait_for(first, 5), *await take(it, 99)]
    assert sorted(e.data["seq"] for e in events) == list(range(1, 101))
    assert [e.id for e in events] == sorted(e.id for e in events)
    await it.aclose()


@pytest.mark.anyio
async def test_resume_from_ring_buffer(store: TraceStore) -> None:
    bus = EventBus(store, capacity=100)
    store.add_listener(bus.publish_trace)
    for _ in range(10):
        store.insert(TraceRecord(endpoint="/x"))
    bus.publish("adapter_unload", {"name": "a"})
    seen = list(bus._ring)[3]
    got = await take(bus.subscribe(seen.id), 7)
    assert [e.data.get("seq") for e in got] == [5, 6, 7, 8, 9, 10, None]
    assert got[-1].kind == "adapter_unload"


@pytest.mark.anyio
async def test_resume_after_buffer_overflow_replays_from_db(store: TraceStore) -> None:
    bus = EventBus(store, capacity=5)
    store.add_listener(bus.publish_trace)
    for _ in range(3):
        store.insert(TraceRecord(endpoint="/x"))
    last_seen = bus.last_id  # client saw trace 3, then disconnected
    for _ in range(20):
        store.insert(TraceRecord(endpoint="/x"))
    bus.publish("error", {"message": "boom"})
    got = await take(bus.subscribe(last_seen), 21)
    assert [e.data.get("seq") for e in got] == [*range(4, 24), None]
    assert [e.id for e in got] == sorted(e.id for e in got)


@pytest.mark.anyio
async def test_sse_endpoint_resumes_with_last_event_id(store: TraceStore) -> None:
    bus = EventBus(store)
    store.add_listener(bus.publish_trace)
    async with serving(monitor_app(store, bus)) as url:
        for _ in range(3):
            store.insert(TraceRecord(endpoint="/x", task="t"))
        source = DaemonSource(url)
        source.last_event_id = 1 << SEQ_SHIFT  # saw trace 1 before a drop
        events = source.events()
        got = await take(events, 2)
        assert [e.data["seq"] for e in got] == [2, 3]
        await asyncio.to_thread(store.insert, TraceRecord(endpoint="/x"))
        assert (await take(events, 1))[0].data["seq"] == 4
        assert source.last_event_id == 4 << SEQ_SHIFT
        await events.aclose()  # type: ignore[attr-defined]
        await source.close()
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{url}/v1/traces", params={"limit": 2})
            assert [t["seq"] for t in r.json()["items"]] == [4, 3]


@pytest.mark.anyio
async def test_close_ends_subscriptions_from_any_thread(store: TraceStore) -> None:
    bus = EventBus(store)
    quiet, beating = bus.subscribe(None), bus.subscribe(None, heartbeat_s=0.05)
    waiting = [asyncio.ensure_future(quiet.__anext__()), asyncio.ensure_future(beating.__anext__())]
    await until(lambda: bus.subscriber_count == 2)
    await asyncio.to_thread(bus.close)
    await asyncio.wait(waiting, timeout=5)
    assert all(w.done() for w in waiting)
    assert isinstance(waiting[0].exception(), StopAsyncIteration)
    # The heartbeat one may have yielded a heartbeat first; then it ends too.
    if waiting[1].exception() is None:
        assert waiting[1].result() is None
        with pytest.raises(StopAsyncIteration):
            while True:
                assert await asyncio.wait_for(beating.__anext__(), 5) is None
    assert bus.subscriber_count == 0
    assert [e async for e in bus.subscribe(0)] == []  # closed: a new subscription ends at once
    bus.publish("error", {"message": "publishing still works"})


@pytest.mark.anyio
async def test_event_stream_ends_when_client_leaves_or_bus_closes(store: TraceStore) -> None:
    bus = EventBus(store)
    async with serving(monitor_app(store, bus)) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("GET", "/v1/events") as response:
            assert await response.aiter_lines().__anext__() == "retry: 2000"
            await until(lambda: bus.subscriber_count == 1)
        await until(lambda: bus.subscriber_count == 0)  # the client left: the server's generator ended

        async with client.stream("GET", "/v1/events") as response:
            lines = response.aiter_lines()
            assert await lines.__anext__() == "retry: 2000"
            await until(lambda: bus.subscriber_count == 1)
            bus.close()
            rest = [line async for line in lines]  # a clean end, not a dropped connection
            assert rest[0] == ": connected"
        start = time.monotonic()
    assert time.monotonic() - start < 5  # uvicorn had no open response to wait for
