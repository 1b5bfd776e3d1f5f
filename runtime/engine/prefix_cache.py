"""Saved prompt-prefix states per (adapter, prefix), so a task's fixed prefix is computed once.

The fastest path needs no state at all: the context's KV cache still holds the last prompt and
llama-cpp-python reuses the longest common prefix. A saved state covers the case where another
task or adapter ran in between: restoring it costs ~0.25x of a cold prefill.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

# llama_cpp is imported where it is called, as in llama.py: loading libllama costs ~0.1 s.


@dataclass(frozen=True)
class PrefixState:
    tokens: tuple[int, ...]
    data: bytes  # llama_state_get_data: KV cache of exactly these tokens

    @property
    def size(self) -> int:
        return len(self.data)


def save(llm: Any) -> PrefixState:
    """Snapshot the context. Unlike ``Llama.save_state`` this skips the logits matrix (hundreds of MB)."""
    import llama_cpp

    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_get_size(ctx)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_get_data(ctx, buf, size)
    return PrefixState(tokens=tuple(int(t) for t in llm._input_ids), data=bytes(buf)[:written])


def restore(llm: Any, state: PrefixState) -> None:
    import llama_cpp

    buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
    if llama_cpp.llama_state_set_data(llm._ctx.ctx, buf, len(state.data)) != len(state.data):
        raise RuntimeError("llama_state_set_data failed to restore a prefix state")
    n = len(state.tokens)
    llm.input_ids[:n] = np.asarray(state.tokens, dtype=np.intc)
    llm.n_tokens = n
    # The restored logits are not those of a live decode: make generate() re-evaluate a token.
    llm._requires_eval = True


class PrefixCache:
    """LRU of prefix states keyed by (adapter key, prefix tokens)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._states: OrderedDict[tuple[str, tuple[int, ...]], PrefixState] = OrderedDict()

    def get(self, adapter_key: str, tokens: tuple[int, ...]) -> PrefixState | None:
        key = (adapter_key, tokens)
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, adapter_key: str, state: PrefixState) -> None:
        if self.capacity <= 0:
            return
        self._states[(adapter_key, state.tokens)] = state
        self._states.move_to_end((adapter_key, state.tokens))
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def drop_adapter(self, adapter_key_prefix: str) -> None:
        for key in [k for k in self._states if k[0].startswith(adapter_key_prefix)]:
            del self._states[key]

    def __len__(self) -> int:
        return len(self._states)

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self._states.values())
