"""The store's adapters as a cache within a memory budget: an adapter loads on the first request
that names it as its model, and loading one past ``adapter_memory_mb`` unloads the least recently
used one that no request holds.

A request holds its adapter through an ``AdapterLease`` from the moment its model id resolves
until its job is dropped (answered, streamed to the end, failed or routed remote), so an adapter
is never unloaded under a queued or running generation. Adapters a task names, and those loaded
at start or through the admin API, are the daemon's own choice and are never evicted; they count
against the budget all the same. When nothing can be evicted the load goes ahead over budget, and
the next load evicts again: a request for a listed model is never refused for want of room.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.models.manifest import ModelManifest
from slm_agent.models.store import ModelStore
from slm_agent.runtime.engine import Engine

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], Any]


class AdapterLease:
    """One request's hold on a loaded adapter, released when the request drops it."""

    def __init__(self, name: str, release: Callable[[str], None]) -> None:
        self.name = name
        weakref.finalize(self, release, name)


@dataclass
class AdapterCounters:
    loads: int = 0  # loads on first use, reloads after an eviction included
    evictions: int = 0


class AdapterCache:
    def __init__(
        self,
        engine: Engine,
        store: ModelStore,
        base: ModelManifest,
        tasks: TaskRegistry,
        budget_mb: float,
        publish: Publish | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.base = base
        self.tasks = tasks
        self.budget_bytes = int(budget_mb * 2**20)
        self.counters = AdapterCounters()
        self._publish = publish
        self._lock = threading.Lock()  # guards the tables below; never held across engine calls
        self._recent: OrderedDict[str, None] = OrderedDict()  # loaded here on first use, LRU first
        self._leases: Counter[str] = Counter()
        self._evicting: str | None = None
        self._loading = threading.Lock()  # one load or eviction at a time; two first requests load once

    def acquire(self, name: str) -> AdapterLease | None:
        """Hold adapter ``name`` loaded for one request, loading it (and evicting others) first if
        need be; None when the store has no adapter of this base by that name. Blocks while the
        engine loads: call it off the event loop."""
        lease = self._lease_if_loaded(name)
        if lease is not None:
            return lease
        manifest = self._manifest(name)
        if manifest is None:
            return None
        with self._loading:
            lease = self._lease_if_loaded(name)  # a concurrent first request loaded it meanwhile
            if lease is not None:
                return lease
            path = self.store.check_adapter(manifest, self.base)
            self._make_room(manifest.size)
            started = time.perf_counter()
            self.engine.load_adapter(name, path)
            load_ms = (time.perf_counter() - started) * 1000
            with self._lock:
                self._recent[name] = None
                self._recent.move_to_end(name)  # an entry the admin API unloaded is stale
                lease = self._lease(name)
            self.counters.loads += 1
        log.info("loaded adapter %s on first use in %.0f ms", name, load_ms)
        self._emit("adapter_load", {"adapter": name, "reason": "first_use", "load_ms": round(load_ms, 1)})
        return lease

    def keep(self, name: str) -> None:
        """Never evict ``name`` (the admin API loaded it on purpose)."""
        with self._lock:
            self._recent.pop(name, None)

    def held_bytes(self) -> int:
        """Bytes of every loaded adapter, the ones this cache does not manage included."""
        return sum(_size(a.path) for a in list(self.engine.adapters.values()))

    def _lease_if_loaded(self, name: str) -> AdapterLease | None:
        with self._lock:
            if name not in self.engine.adapters or name == self._evicting:
                return None
            if name in self._recent:
                self._recent.move_to_end(name)
            return self._lease(name)

    def _lease(self, name: str) -> AdapterLease:
        self._leases[name] += 1
        return AdapterLease(name, self._release)

    def _release(self, name: str) -> None:
        with self._lock:
            self._leases[name] -= 1
            if self._leases[name] <= 0:
                del self._leases[name]

    def _manifest(self, name: str) -> ModelManifest | None:
        if not self.store.has(name):
            return None
        manifest = self.store.get(name)
        if manifest.kind != "lora-adapter" or manifest.base != self.base.name:
            return None
        return manifest

    def _make_room(self, needed: int) -> None:
        """Unload idle adapters loaded here, least recently used first, until ``needed`` more bytes
        fit the budget or none is left to unload (called holding ``_loading``)."""
        pinned = {t.adapter for t in self.tasks.list() if t.adapter}
        while self.held_bytes() + needed > self.budget_bytes:
            with self._lock:
                for gone in [n for n in self._recent if n not in self.engine.adapters]:
                    del self._recent[gone]  # unloaded through the admin API
                idle = (n for n in self._recent if n not in self._leases and n not in pinned)
                victim = next(idle, None)
                if victim is None:
                    break
                del self._recent[victim]
                self._evicting = victim  # from here, a request for it waits for the reload
            try:
                self.engine.unload_adapter(victim)
            finally:
                with self._lock:
                    self._evicting = None
            self.counters.evictions += 1
            log.info("unloaded adapter %s: least recently used, past adapter_memory_mb", victim)
            self._emit("adapter_unload", {"adapter": victim, "reason": "evicted"})
        if self.held_bytes() + needed > self.budget_bytes:
            log.warning(
                "adapters over adapter_memory_mb (%.1f MiB): the rest are in use or named by tasks",
                (self.held_bytes() + needed) / 2**20,
            )

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self._publish is not None:
            self._publish(kind, data)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
