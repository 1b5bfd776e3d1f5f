"""Saved prompt-prefix states per (adapter set, prefix), so a task's fixed prefix is computed once.

The fastest path needs no state at all: the prefix is still resident in its context's KV cache
and is forked into the new sequence (context.py). A saved state covers a prefix evicted from
there: restoring it costs ~0.25x of a cold prefill.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixState:
    tokens: tuple[int, ...]
    data: bytes  # llama_state_seq_get_data: one sequence's KV cells, exactly these tokens

    @property
    def size(self) -> int:
        return len(self.data)


class PrefixCache:
    """LRU of prefix states keyed by (adapter key, prefix tokens). Shared by every context, whose
    steps may run side by side: one lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._states: OrderedDict[tuple[str, tuple[int, ...]], PrefixState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, adapter_key: str, tokens: tuple[int, ...]) -> PrefixState | None:
        key = (adapter_key, tokens)
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            return state

    def put(self, adapter_key: str, state: PrefixState) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._states[(adapter_key, state.tokens)] = state
            self._states.move_to_end((adapter_key, state.tokens))
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)

    def drop_adapter(self, adapter_key_prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._states if k[0].startswith(adapter_key_prefix)]:
                del self._states[key]

    def __len__(self) -> int:
        return len(self._states)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._states.values())
