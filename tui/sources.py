"""Where the monitor reads from: a running daemon over HTTP, or a trace database file, read-only.

Both implement ``Source``; screens never know which one they have. Actions that change the daemon
(feedback, adapters, routing) raise ``ReadOnlyError`` on a database source.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from slm_agent.contracts.records import Feedback
from slm_agent.errors import SlmAgentError
from slm_agent.runtime.report import ConversionReport, Price, build_report, parse_since
from slm_agent.runtime.store import queries as mon
from slm_agent.runtime.store.events import SSE_HEARTBEAT_S
from slm_agent.runtime.store.queries import RunDetail, RunSummary, Stats, TraceDetail, TraceFilter, TracePage

log = logging.getLogger(__name__)

Routing = Literal["local", "remote", "auto"]
Clock = Callable[[], datetime]
SSE_RETRY_S = 2.0  # until the daemon says otherwise (its ``retry:`` field)
# The daemon sends a heartbeat comment when idle; three missed ones mean the connection is dead.
SSE_TIMEOUT = httpx.Timeout(10, read=3 * SSE_HEARTBEAT_S)


class ReadOnlyError(SlmAgentError):
    status_code = 409

    def __init__(self, action: str) -> None:
        super().__init__(
            f"{action} needs a running daemon: this monitor reads a database file (--db). "
            "Start it with --url http://127.0.0.1:8765 instead."
        )


class SourceError(SlmAgentError):
    """The daemon answered with an error or could not be reached."""


class TaskInfo(BaseModel):
    name: str
    adapter: str | None = None
    routing: str | None = None
    description: str | None = None


class ModelInfo(BaseModel):
    id: str
    kind: str = "base"
    loaded: bool = False


class Health(BaseModel):
    status: str = "unknown"
    model: str | None = None
    adapters: list[str] = []
    queue_depth: int | None = None


class LiveEvent(BaseModel):
    id: int
    kind: str
    data: dict[str, Any]


class Source(ABC):
    """What the monitor reads and does; one instance per app."""

    read_only: bool
    label: str

    @abstractmethod
    async def stats(self, window: str) -> Stats: ...

    @abstractmethod
    async def traces(self, f: TraceFilter) -> TracePage: ...

    @abstractmethod
    async def trace(self, trace_id: str) -> TraceDetail: ...

    @abstractmethod
    async def runs(self, limit: int = 100) -> list[RunSummary]: ...

    @abstractmethod
    async def run(self, run_id: str) -> RunDetail: ...

    @abstractmethod
    async def report(self, since: str | None = None) -> ConversionReport:
        """The conversion report since an ISO date or a duration (7d); None: since the first trace."""

    @abstractmethod
    async def tasks(self) -> list[TaskInfo]: ...

    @abstractmethod
    async def models(self) -> list[ModelInfo]: ...

    @abstractmethod
    async def health(self) -> Health | None: ...

    @abstractmethod
    def events(self) -> AsyncIterator[LiveEvent]:
        """Live events, forever; reconnects (or polls) on its own."""

    async def send_feedback(self, trace_id: str, feedback: Feedback) -> None:
        raise ReadOnlyError("Feedback")

    async def load_adapter(self, name: str) -> None:
        raise ReadOnlyError("Loading an adapter")

    async def unload_adapter(self, name: str) -> None:
        raise ReadOnlyError("Unloading an adapter")

    async def set_routing(self, task: str, routing: Routing) -> None:
        raise ReadOnlyError("Changing a routing policy")

    async def close(self) -> None:
        return None


class DbSource(Source):
    """A trace database opened read-only (``mode=ro``); aggregates are the daemon's own SQL."""

    read_only = True

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Clock | None = None,
        price_per_mtok: float = mon.DEFAULT_PRICE_PER_MTOK,
        poll_s: float = 1.0,
        label: str | None = None,
    ) -> None:
        self.db = mon.ReadOnlyDb(path)
        self.label = label or f"db {self.db.path}"
        self.clock = clock or (lambda: datetime.now(UTC))
        self.price_per_mtok = price_per_mtok
        self.poll_s = poll_s
        self.closed = False

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(lambda: fn(self.db.conn, *args))

    async def stats(self, window: str) -> Stats:
        return await asyncio.to_thread(
            lambda: mon.query_stats(
                self.db.conn, window, end=self.clock(), price_per_mtok=self.price_per_mtok
            )
        )

    async def traces(self, f: TraceFilter) -> TracePage:
        return await self._run(mon.query_traces, f)  # type: ignore[no-any-return]

    async def trace(self, trace_id: str) -> TraceDetail:
        return await self._run(mon.query_trace, trace_id)  # type: ignore[no-any-return]

    async def runs(self, limit: int = 100) -> list[RunSummary]:
        return await self._run(mon.query_runs, limit)  # type: ignore[no-any-return]

    async def run(self, run_id: str) -> RunDetail:
        return await self._run(mon.query_run, run_id)  # type: ignore[no-any-return]

    async def report(self, since: str | None = None) -> ConversionReport:
        now = self.clock()
        # --remote-price left at its default is the daemon's default price, and says so.
        given = self.price_per_mtok != mon.DEFAULT_PRICE_PER_MTOK
        price = Price(
            input_per_mtok=self.price_per_mtok,
            output_per_mtok=self.price_per_mtok,
            source="settings" if given else "default",
        )
        return await asyncio.to_thread(
            lambda: build_report(
                self.db.conn,
                since=parse_since(since, now) if since else None,
                until=now,
                fallback_price=price,
            )
        )

    async def tasks(self) -> list[TaskInfo]:
        """Without a daemon, the tasks are those seen in traces, with their latest adapter."""

        def query(conn: Any) -> list[TaskInfo]:
            rows = conn.execute(
                "SELECT task, (SELECT adapter FROM traces t2 WHERE t2.task = t.task ORDER BY seq DESC LIMIT 1) "
                "FROM traces t WHERE task IS NOT NULL GROUP BY task ORDER BY task"
            ).fetchall()
            return [TaskInfo(name=r[0], adapter=r[1]) for r in rows]

        return await self._run(query)  # type: ignore[no-any-return]

    async def models(self) -> list[ModelInfo]:
        def query(conn: Any) -> list[ModelInfo]:
            rows = conn.execute(
                "SELECT DISTINCT base_model, 'base' FROM traces WHERE base_model IS NOT NULL "
                "UNION SELECT DISTINCT adapter, 'adapter' FROM traces WHERE adapter IS NOT NULL"
            ).fetchall()
            return [ModelInfo(id=r[0], kind=r[1]) for r in sorted(rows, key=lambda r: (r[1] != "base", r[0]))]

        return await self._run(query)  # type: ignore[no-any-return]

    async def health(self) -> Health | None:
        return None

    async def events(self) -> AsyncIterator[LiveEvent]:  # type: ignore[override]
        """Poll max(seq): another process (the daemon) writes the file. Ends when the source is closed."""
        last = await self._run(mon.max_seq)
        while True:
            await asyncio.sleep(self.poll_s)
            if self.closed:
                return
            page = await self.traces(TraceFilter(limit=200))
            for item in reversed([i for i in page.items if i.seq > last]):
                last = item.seq
                yield LiveEvent(id=item.seq << 20, kind="trace", data=item.model_dump())

    async def close(self) -> None:
        self.closed = True
        self.db.close()


class DaemonSource(Source):
    """A running slm-agentd at ``url``; the token, when given, goes in every request."""

    read_only = False

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        price_per_mtok: float = mon.DEFAULT_PRICE_PER_MTOK,
        transport: httpx.AsyncBaseTransport | None = None,
        end: datetime | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.label = f"daemon {self.url}"
        self.price_per_mtok = price_per_mtok
        self.end = end  # fixed window end for reproducible views (tests, screenshots)
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10, transport=transport)
        self.last_event_id: int | None = None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SourceError(f"cannot reach the daemon at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise SourceError(f"{method} {path} failed ({response.status_code}): {message}")
        return response.json() if response.content else None

    async def stats(self, window: str) -> Stats:
        params: dict[str, Any] = {"window": window, "price_per_mtok": self.price_per_mtok}
        if self.end is not None:
            params["end"] = self.end.isoformat()
        return Stats.model_validate(await self._request("GET", "/v1/stats", params=params))

    async def traces(self, f: TraceFilter) -> TracePage:
        params = {k: v for k, v in f.model_dump().items() if v not in (None, False, "")}
        return TracePage.model_validate(await self._request("GET", "/v1/traces", params=params))

    async def trace(self, trace_id: str) -> TraceDetail:
        return TraceDetail.model_validate(await self._request("GET", f"/v1/traces/{trace_id}"))

    async def runs(self, limit: int = 100) -> list[RunSummary]:
        data = await self._request("GET", "/v1/runs", params={"limit": limit})
        return [RunSummary.model_validate(r) for r in data]

    async def run(self, run_id: str) -> RunDetail:
        return RunDetail.model_validate(await self._request("GET", f"/v1/runs/{run_id}"))

    async def report(self, since: str | None = None) -> ConversionReport:
        params = {"since": since} if since else {}
        if self.end is not None:
            params["until"] = self.end.isoformat()
        return ConversionReport.model_validate(await self._request("GET", "/v1/report", params=params))

    async def tasks(self) -> list[TaskInfo]:
        data = await self._request("GET", "/v1/admin/tasks")
        items = data.get("data", data) if isinstance(data, dict) else data
        return [TaskInfo.model_validate(t) for t in items]

    async def models(self) -> list[ModelInfo]:
        data = await self._request("GET", "/v1/models")
        return [ModelInfo.model_validate(m) for m in data.get("data", [])]

    async def health(self) -> Health | None:
        try:
            data = await self._request("GET", "/healthz")
        except SourceError:
            return Health(status="unreachable")
        if isinstance(data.get("adapters"), int):  # a count rather than names
            data["adapters"] = []
        return Health.model_validate(data)

    async def send_feedback(self, trace_id: str, feedback: Feedback) -> None:
        body = feedback.model_dump(include={"rating", "correction", "comment"})
        await self._request("POST", f"/v1/traces/{trace_id}/feedback", json=body)

    async def load_adapter(self, name: str) -> None:
        await self._request("POST", "/v1/admin/adapters", json={"name": name})

    async def unload_adapter(self, name: str) -> None:
        await self._request("DELETE", f"/v1/admin/adapters/{name}")

    async def set_routing(self, task: str, routing: Routing) -> None:
        await self._request("PATCH", f"/v1/admin/tasks/{task}", json={"routing": routing})

    async def events(self) -> AsyncIterator[LiveEvent]:  # type: ignore[override]
        """The SSE feed, reconnecting with Last-Event-ID so nothing is missed across drops.

        It runs until the consumer stops iterating (or is cancelled) or the source is closed; a
        stream the daemon ends (it is shutting down) is a drop like any other.
        """
        retry_s = SSE_RETRY_S
        while not self.client.is_closed:
            headers = {"Last-Event-ID": str(self.last_event_id)} if self.last_event_id is not None else {}
            try:
                async with self.client.stream(
                    "GET", "/v1/events", headers=headers, timeout=SSE_TIMEOUT
                ) as response:
                    response.raise_for_status()
                    async for event in parse_sse(response.aiter_lines()):
                        if event.get("retry", "").isdigit():
                            retry_s = int(event["retry"]) / 1000
                        if "id" not in event or "data" not in event:
                            continue
                        payload = json.loads(event["data"])
                        live = LiveEvent(id=int(event["id"]), kind=payload["kind"], data=payload["data"])
                        self.last_event_id = live.id
                        yield live
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                if self.client.is_closed:
                    return
                log.info("event stream dropped (%s); reconnecting in %.1fs", exc, retry_s)
            else:
                log.info("event stream ended; reconnecting in %.1fs", retry_s)
            await asyncio.sleep(retry_s)

    async def close(self) -> None:
        await self.client.aclose()


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, str]]:
    """Group SSE lines into events (field -> value); comments (heartbeats) are skipped."""
    event: dict[str, str] = {}
    async for line in lines:
        if not line:
            if event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        event[name] = event[name] + "\n" + value if name == "data" and name in event else value
    if event:
        yield event


def open_source(
    url: str | None = None, token: str | None = None, db: Path | None = None, **kwargs: Any
) -> Source:
    if db is not None:
        return DbSource(db, **kwargs)
    return DaemonSource(url or "http://127.0.0.1:8765", token, **kwargs)
