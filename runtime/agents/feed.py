"""A run's spans as they change, for every client that streams the run (late ones get it from the
start)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class RunFeed:
    """A run's spans as they change, replayed from the start to every subscriber."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.done = False
        self._changed = asyncio.Event()

    def push(self, kind: str, data: dict[str, Any], *, last: bool = False) -> None:
        self.events.append((kind, data))
        self.done = self.done or last
        self._changed.set()

    async def follow(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        sent = 0
        while True:
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.done:
                return
            self._changed.clear()
            await self._changed.wait()
