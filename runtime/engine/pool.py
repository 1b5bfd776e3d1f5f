"""The engine's contexts on the one loaded model: their size from the KV budget, one per adapter
set in use, at most ``max_contexts``, and how a round of decode steps goes over them.

llama.cpp applies LoRA adapters per context, so batches of different adapter sets cannot merge.
A round steps the contexts that serve live requests first (only those while a live prompt is
being read), and contexts with batches alike step side by side, the threads shared out: two
batches of 4 on a core each keep both cores as busy as one batch of 8 on two (0.55x of it in
turn, ~1.0x side by side here; ``llama_decode`` releases the GIL). The caller holds the engine's
lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from slm_agent.errors import InsufficientMemoryError
from slm_agent.models.gguf_info import read_info
from slm_agent.models.memory import UNKNOWN_KV_BYTES_PER_CELL, kv_bytes_per_token
from slm_agent.runtime.engine.context import AdapterContext, AdapterKey, ContextShape
from slm_agent.runtime.engine.prefix_cache import PrefixCache
from slm_agent.runtime.engine.sequence import Sequence
from slm_agent.runtime.engine.types import EngineConfig, EngineStats


def plan_contexts(cfg: EngineConfig) -> ContextShape:
    """Size each context's KV cache from the budget; refuse a budget that cannot hold one
    full-length request per context, with the numbers."""
    per_cell = kv_bytes_per_token(read_info(cfg.model_path)) or UNKNOWN_KV_BYTES_PER_CELL
    per_context = cfg.kv_budget_mb * 2**20 // max(1, cfg.max_contexts)
    cells = cfg.kv_cells(per_cell)
    if cells < cfg.n_ctx:
        raise InsufficientMemoryError(
            f"kv_budget_mb={cfg.kv_budget_mb} gives each of max_contexts={cfg.max_contexts} contexts "
            f"{per_context / 2**20:.0f} MB, {per_context // per_cell} KV cells at {per_cell / 1024:.1f} KB "
            f"a cell; one request of n_ctx={cfg.n_ctx} needs {cfg.n_ctx} cells "
            f"({cfg.n_ctx * per_cell * cfg.max_contexts / 2**20:.0f} MB for all contexts). Raise "
            "kv_budget_mb, or lower n_ctx or max_contexts"
        )
    return ContextShape(
        n_cells=cells,
        max_sequences=cfg.max_sequences,
        max_prefixes=cfg.prefix_cache_size,
        n_threads=cfg.n_threads,
        n_batch=cfg.n_batch,
    )


class ContextPool:
    def __init__(
        self, model: Any, shape: ContextShape, states: PrefixCache, stats: EngineStats, max_contexts: int
    ) -> None:
        self._model = model  # llama_model_p, shared by every context
        self._shape = shape
        self._states = states
        self._stats = stats
        self._max = max_contexts
        self._contexts: OrderedDict[AdapterKey, AdapterContext] = OrderedDict()
        self._steppers = ThreadPoolExecutor(max(1, max_contexts), thread_name_prefix="engine-step")

    def __len__(self) -> int:
        return len(self._contexts)

    def __iter__(self) -> Iterator[AdapterContext]:
        return iter(list(self._contexts.values()))

    @property
    def running(self) -> int:
        return sum(len(c.sequences) for c in self)

    def get(self, key: AdapterKey, handle: Any) -> AdapterContext | None:
        """The context of adapter set ``key`` (``handle``: its loaded adapter): its own, a new one
        while there is room, else an idle one switched over to it; None while all are busy."""
        ctx = self._contexts.get(key)
        if ctx is not None:
            self._contexts.move_to_end(key)
            return ctx
        if len(self._contexts) >= self._max:
            idle = next((k for k, c in self._contexts.items() if not c.sequences), False)
            if idle is False:
                return None
            ctx = self._contexts.pop(idle)  # type: ignore[arg-type]
            ctx.rebind(key, handle)
            self._stats.adapter_switches += 1
        else:
            ctx = AdapterContext(self._model, key, handle, self._shape, self._states, self._stats)
            self._stats.contexts_created += 1
        self._contexts[key] = ctx
        return ctx

    def drop(self, adapter: str, error: BaseException) -> list[Sequence]:
        """Close the contexts under ``adapter``; their sequences fail with ``error`` (returned,
        for the caller to settle)."""
        failed: list[Sequence] = []
        for key in [k for k in self._contexts if k is not None and k[0] == adapter]:
            ctx = self._contexts.pop(key)
            failed += ctx.fail_all(error)
            ctx.close()
        return failed

    def close(self, error: BaseException) -> list[Sequence]:
        """Close every context (the engine shuts down); their sequences fail with ``error``."""
        self._steppers.shutdown(wait=True)
        failed: list[Sequence] = []
        for ctx in self._contexts.values():
            failed += ctx.fail_all(error)
            ctx.close()
        self._contexts.clear()
        return failed

    # -- a round of steps ----------------------------------------------------------------------------
    def round(self, n_threads: int) -> list[list[AdapterContext]]:
        """This round's contexts in turn, grouped where they step side by side: live first; while
        a live prompt is being read, only live ones (a context of shadow work alone waits)."""
        busy = [c for c in self._contexts.values() if c.sequences]
        live = [c for c in busy if c.serves_live]
        turns = (
            live
            if any(c.reading_live_prompt for c in live)
            else live + [c for c in busy if not c.serves_live]
        )
        groups: list[list[AdapterContext]] = []
        for ctx in turns:
            last = groups[-1] if groups else []
            # A live stream on one core beside eight shadow sequences on the other would wait on
            # their slower step: only batches of a like size and of one priority pair up.
            if (
                last
                and len(last) < n_threads
                and last[0].serves_live == ctx.serves_live
                and _alike([*last, ctx])
            ):
                last.append(ctx)
            else:
                groups.append([ctx])
        return groups

    def step(
        self, group: list[AdapterContext], n_threads: int, background_limit: int | None
    ) -> list[Sequence]:
        """One decode step of each context in ``group``, side by side when there are several;
        the sequences that ended."""
        group = [c for c in group if c.ctx is not None]  # not freed by an adapter unload meanwhile
        share = max(1, n_threads // max(1, len(group)))
        for ctx in group:
            ctx.set_threads(share)
        if len(group) == 1:
            return group[0].step(background_limit)
        ended: list[Sequence] = []
        for finished in self._steppers.map(lambda ctx: ctx.step(background_limit), group):
            ended += finished
        return ended


def _alike(group: list[AdapterContext]) -> bool:
    sizes = [len(c.sequences) for c in group]
    return min(sizes) * 2 >= max(sizes)
