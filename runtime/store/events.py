"""In-process event bus behind `GET /v1/events`: publish from any thread, subscribe from asyncio.

Event ids encode the trace sequence number: ``id = (trace_seq_high_water << 20) | n``, where ``n``
counts the events since that trace. So ids keep increasing across daemon restarts (the high-water
mark starts at the database's max(seq)), and a client whose Last-Event-ID fell out of the ring
buffer is resumed exactly: the traces it missed are those with ``seq > id >> 20``, replayed from
the database by seq. Non-trace events older than the buffer cannot be replayed; they are state
changes a client re-reads anyway (models, tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from slm_agent.contracts.records import TraceRecord
from slm_agent.runtime.store.queries import max_seq, query_traces_after
from slm_agent.runtime.store.traces import TraceStore

log = logging.getLogger(__name__)

# task_state: a task moved (shadow, live, demoted); shadow_pair: one local answer scored against the
# remote; matching: how calls are matched to tasks (signature only when there is no encoder).
EventKind = Literal[
    "trace",
    "route",
    "model_load",
    "adapter_load",
    "adapter_unload",
    "error",
    "task_state",
    "shadow_pair",
    "matching",
]
SEQ_SHIFT = 20
_COUNTER_MASK = (1 << SEQ_SHIFT) - 1
SSE_RETRY_MS = 2000  # how long a client waits before reconnecting, sent as the stream's ``retry:``
SSE_HEARTBEAT_S = 15.0  # an idle stream sends a comment this often, so clients can detect a dead one
# The fields of a trace an event carries: enough for a table row, never the prompt or output.
TRACE_EVENT_FIELDS = (
    "seq", "id", "created_at", "endpoint", "task", "route", "route_reason", "model", "adapter",
    "latency_ms", "prompt_tokens", "completion_tokens", "status", "error",
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    def to_sse(self) -> str:
        payload = json.dumps({"kind": self.kind, "time": self.time, "data": self.data}, ensure_ascii=False)
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n"


def trace_event_data(trace: TraceRecord | dict[str, Any]) -> dict[str, Any]:
    raw = trace.model_dump() if isinstance(trace, TraceRecord) else trace
    return {name: raw.get(name) for name in TRACE_EVENT_FIELDS}


ReplayFn = Callable[[int, int], list[dict[str, Any]]]


@dataclass(eq=False)  # identity hashing: subscribers live in a set
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event | None]  # None: wake up, the bus closed
    overflowed: bool = False
    closed: bool = False


class EventBus:
    """Thread-safe publisher, asyncio subscribers, bounded ring buffer for resume.

    ``store`` (optional) seeds the id high-water mark and replays traces a resuming client missed.
    ``close()`` ends every subscription, so streams built on them finish and a server can shut down.
    """

    def __init__(
        self, store: TraceStore | None = None, *, capacity: int = 4096, replay: ReplayFn | None = None
    ):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._ring: deque[Event] = deque()
        self._evicted_upto = 0  # largest id dropped from the ring
        self._subscribers: set[_Subscriber] = set()
        self._replay = replay
        hw = 0
        if store is not None:
            if replay is None:
                self._replay = _store_replay(store)
            hw = max_seq(store.reader.conn)
        self._hw = hw
        self._n = 0
        self.last_id = hw << SEQ_SHIFT
        self.closed = False

    # -- publishing (any thread) ---------------------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        with self._lock:
            seq = data.get("seq") if kind == "trace" else None
            if isinstance(seq, int) and seq > self._hw:
                self._hw, self._n = seq, 0
            else:
                self._n += 1
                if self._n > _COUNTER_MASK:  # a million non-trace events in a row: borrow the next seq slot
                    self._hw, self._n = self._hw + 1, 0
            event = Event(id=(self._hw << SEQ_SHIFT) | self._n, kind=kind, data=data)
            self.last_id = event.id
            self._ring.append(event)
            if len(self._ring) > self.capacity:
                self._evicted_upto = self._ring.popleft().id
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(_deliver, sub, event)
            except RuntimeError:  # its loop closed without unsubscribing
                with self._lock:
                    self._subscribers.discard(sub)
        return event

    def publish_trace(self, trace: TraceRecord) -> None:
        """TraceStore listener: called from worker threads after each committed insert."""
        try:
            self.publish("trace", trace_event_data(trace))
        except Exception:  # a monitoring failure must never fail the request that wrote the trace
            log.exception("publishing trace event failed")

    def close(self) -> None:
        """End every subscription now, and any made later at once; publishing still works.

        Safe from any thread and from a signal handler: it takes no lock (a handler interrupting a
        thread that holds it would deadlock), relying on the GIL for the flag and the set copy.
        ``subscribe`` checks the flag after attaching, so no subscriber is missed in between.
        """
        self.closed = True
        for sub in list(self._subscribers):
            with contextlib.suppress(RuntimeError):  # its loop closed already: nothing waits there
                sub.loop.call_soon_threadsafe(_close, sub)

    # -- subscribing (asyncio) -----------------------------------------------------------------------
    async def subscribe(
        self, last_event_id: int | None = None, *, heartbeat_s: float | None = None
    ) -> AsyncIterator[Event | None]:
        """Events after ``last_event_id`` (or from now when None), then live ones.

        With ``heartbeat_s`` it yields None after that many idle seconds, so a transport can send a
        keep-alive; without it, only events. It returns when the bus is closed.
        """
        loop = asyncio.get_running_loop()
        last = self.last_id if last_event_id is None else last_event_id
        while not self.closed:
            sub = _Subscriber(loop=loop, queue=asyncio.Queue(maxsize=self.capacity))
            # Attach before reading the backlog so nothing published in between is missed;
            # duplicates are dropped by id below.
            with self._lock:
                self._subscribers.add(sub)
                if self.closed:  # closed while attaching: close() may not have seen this one
                    self._subscribers.discard(sub)
                    return
                if last > self.last_id:  # a client of an earlier daemon: same trace seq, fresh counter
                    last = (last >> SEQ_SHIFT) << SEQ_SHIFT
                backlog = [e for e in self._ring if e.id > last]
                gap = last < self._evicted_upto
                first_buffered = backlog[0] if backlog else None
            try:
                if gap and self._replay is not None:
                    upto = self._hw if first_buffered is None else first_buffered.id >> SEQ_SHIFT
                    if first_buffered is not None and first_buffered.id & _COUNTER_MASK == 0:
                        upto -= 1  # that trace's own event is still buffered
                    async with contextlib.aclosing(self._replay_traces(last >> SEQ_SHIFT, upto)) as replay:
                        async for event in replay:
                            if sub.closed:
                                return
                            last = event.id
                            yield event
                for event in backlog:
                    if sub.closed:
                        return
                    if event.id > last:
                        last = event.id
                        yield event
                while not (sub.overflowed or sub.closed):
                    try:
                        if heartbeat_s is None:
                            queued = await sub.queue.get()
                        else:
                            queued = await asyncio.wait_for(sub.queue.get(), heartbeat_s)
                    except TimeoutError:
                        yield None
                        continue
                    if queued is None or sub.closed:
                        return
                    if queued.id > last:
                        last = queued.id
                        yield queued
            finally:
                with self._lock:
                    self._subscribers.discard(sub)
            if self.closed:
                return
            # The subscriber fell a whole buffer behind: resume from its last id like a reconnect.
            log.warning("event subscriber fell behind; resuming from id %d", last)

    async def _replay_traces(self, after_seq: int, upto_seq: int) -> AsyncGenerator[Event, None]:
        assert self._replay is not None
        while after_seq < upto_seq:
            rows = await asyncio.to_thread(self._replay, after_seq, 500)
            rows = [r for r in rows if r["seq"] <= upto_seq]
            if not rows:
                return
            for row in rows:
                after_seq = row["seq"]
                yield Event(id=after_seq << SEQ_SHIFT, kind="trace", data=trace_event_data(row))

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)


def _deliver(sub: _Subscriber, event: Event) -> None:
    try:
        sub.queue.put_nowait(event)
    except asyncio.QueueFull:
        sub.overflowed = True


def _close(sub: _Subscriber) -> None:
    sub.closed = True
    with contextlib.suppress(asyncio.QueueFull):  # full: get() is not waiting, and sees ``closed`` next
        sub.queue.put_nowait(None)  # wake a waiting get()


def _store_replay(store: TraceStore) -> ReplayFn:
    """Replay through the store's read-only connections, so a long replay never holds the writer's lock."""

    def replay(after_seq: int, limit: int) -> list[dict[str, Any]]:
        return [row.model_dump() for row in query_traces_after(store.reader.conn, after_seq, limit)]

    return replay
