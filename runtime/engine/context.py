"""One llama.cpp context on the shared model, under one adapter set, decoding many sequences.

llama.cpp applies LoRA adapters per context, so each adapter set in use gets its own context
(the weights are shared; only the KV cache and compute buffers are per context). A context's KV
cache is therefore only ever computed under its own adapter set: no cell can be reused across
adapters, by construction (llama.cpp's server gets this wrong, its issue #26207).

Within a context the KV cache is unified: sequences are distinct sequence ids over one pool of
cells, and a task's prefix, once computed, stays resident under a sequence id of its own and is
forked into each new sequence with ``llama_memory_seq_cp`` (the cells are shared, not copied).
Resident prefixes are an LRU; one evicted is saved (``llama_state_seq_get_data``) into the
engine's prefix-state cache and restored from there when its task comes back.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slm_agent.errors import SlmAgentError, UnavailableError
from slm_agent.runtime.engine.prefix_cache import PrefixCache, PrefixState
from slm_agent.runtime.engine.sequence import Sequence, Step
from slm_agent.runtime.engine.types import EngineStats, GenerationRequest

# llama_cpp is imported where it is called, as in llama.py: loading libllama costs ~0.1 s.

log = logging.getLogger(__name__)

# A prefix shorter than this is cheaper to recompute than to keep (~18 KB a token here).
MIN_KEPT_PREFIX = 48
# While other sequences decode, a prompt is read this many tokens a step: a long prompt arriving
# mid-decode delays the others' next token by one such chunk (~0.1 s here), never by its whole
# prefill. Alone, a prompt is read in one step of up to n_batch tokens.
PREFILL_CHUNK = 32
# Background (shadow) prompts are always read in small chunks, all of them together no more than
# this a step: a live request arriving meanwhile starts after at most one such step (~50 ms here).
BACKGROUND_PREFILL_CHUNK = 16

# Cells set aside for what a sequence will generate: its first GENERATION_RESERVE tokens. Reserving
# all of max_tokens (n_ctx less the prompt, for an agent that sets none) would let one such request
# hold a whole context; a context that runs out anyway takes a sequence's cells back (recompute).
GENERATION_RESERVE = 256

AdapterKey = tuple[str, float] | None  # (adapter name, scale); None is the base model


@dataclass
class Resident:
    tokens: tuple[int, ...]
    seq_id: int
    background: bool  # a shadow job's prompt, kept to resume it; never saved as a live prefix


@dataclass(frozen=True)
class ContextShape:
    n_cells: int
    max_sequences: int
    max_prefixes: int
    n_threads: int
    n_batch: int


class AdapterContext:
    def __init__(
        self,
        model: Any,
        key: AdapterKey,
        handle: Any,
        shape: ContextShape,
        states: PrefixCache,
        stats: EngineStats,
    ) -> None:
        import llama_cpp

        self.key = key
        self.shape = shape
        self._states = states
        self._stats = stats
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = shape.n_cells
        params.n_batch = params.n_ubatch = shape.n_batch
        params.n_seq_max = shape.max_sequences + shape.max_prefixes
        params.n_threads = params.n_threads_batch = shape.n_threads
        params.swa_full = True  # sliding-window layers keep every cell, so prefixes can be forked
        params.kv_unified = True  # one pool of cells: a forked prefix is shared, not copied
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise UnavailableError(
                f"llama.cpp could not create a context of {shape.n_cells} KV cells; lower kv_budget_mb "
                "or max_contexts",
                retry_after_s=5,
            )
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._set_adapter(handle)
        self._batch = llama_cpp.llama_batch_init(shape.n_batch, 0, 1)
        self.sequences: list[Sequence] = []
        self._free_ids = list(range(shape.max_sequences))
        self._prefix_ids = list(range(shape.max_sequences, shape.max_sequences + shape.max_prefixes))
        self._residents: OrderedDict[tuple[int, ...], Resident] = OrderedDict()
        self._turn = 0  # the next background sequence to decode when only some may
        self._threads = shape.n_threads

    def set_threads(self, n: int) -> None:
        """Decode on ``n`` threads from the next step (a few microseconds; no-op when unchanged)."""
        import llama_cpp

        if n != self._threads:
            llama_cpp.llama_set_n_threads(self.ctx, n, n)
            self._threads = n

    def _set_adapter(self, handle: Any) -> None:
        import llama_cpp

        if handle is None:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            assert self.key is not None
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(self.key[1])
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, handles, 1, scales)
        if rc != 0:
            raise SlmAgentError(f"llama.cpp refused to set adapter {self.key!r} on a context (code {rc})")

    def rebind(self, key: AdapterKey, handle: Any) -> None:
        """Serve another adapter set from this idle context: its resident prefixes are saved and
        its KV cache cleared first, since every cell was computed under the old weights (~1 ms,
        against ~0.1 s to make a context)."""
        import llama_cpp

        assert not self.sequences
        while self._residents:
            self._evict_oldest()
        llama_cpp.llama_memory_clear(self._memory, True)
        self.key = key
        self._set_adapter(handle)

    @property
    def state_key(self) -> str:
        """This context's key in the prefix-state cache (one namespace per adapter set)."""
        return f"{self.key[0]}@{self.key[1]}" if self.key else ""

    # -- admission ---------------------------------------------------------------------------------
    def _reserved(self, parked: bool = True) -> int:
        held = sum(len(r.tokens) for r in self._residents.values())
        return held + sum(s.cells(GENERATION_RESERVE) for s in self.sequences if parked or not s.parked)

    def can_take(self, req: GenerationRequest) -> bool:
        """Whether ``req`` fits now, evicting resident prefixes if that makes room; a context with
        nothing running always takes one (it holds n_ctx cells)."""
        if not self._free_ids:
            return False
        need = len(req.prefix_tokens) + len(req.body_tokens) + min(req.max_tokens, GENERATION_RESERVE) + 1
        while self._reserved() + need > self.shape.n_cells and self._residents:
            self._evict_oldest()
        return not self.sequences or self._reserved() + need <= self.shape.n_cells

    def preempt_background(self) -> Sequence | None:
        """End the youngest background sequence now (cancelled), so a live request can have its
        place; the shadow worker queues a cancelled job again. None when there is none."""
        for seq in reversed(self.sequences):
            if seq.background and not seq.done:
                seq.finish = "cancelled"
                self._stats.preempted += 1
                self._release(seq)
                return seq
        return None

    def admit(self, make: Callable[[int], Sequence]) -> Sequence:
        seq = make(self._free_ids.pop(0))
        self._fork_prefix(seq)
        self.sequences.append(seq)
        return seq

    def _fork_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` from the longest resident prefix of its prompt, or a saved one."""
        import llama_cpp

        prompt = tuple(seq.prompt)
        best = max(
            (
                r
                for r in self._residents.values()
                if len(r.tokens) <= len(prompt) and prompt[: len(r.tokens)] == r.tokens
            ),
            key=lambda r: len(r.tokens),
            default=None,
        )
        long_prefix = len(seq.req.prefix_tokens) >= MIN_KEPT_PREFIX
        if best is not None and long_prefix:
            self._stats.prefix_hits_kv += 1
        elif long_prefix and (saved := self._states.get(self.state_key, tuple(seq.req.prefix_tokens))):
            best = self._restore(saved)
            if best is not None:
                self._stats.prefix_hits_state += 1
        elif long_prefix:
            self._stats.prefix_misses += 1
        if best is None:
            return
        self._residents.move_to_end(best.tokens)
        n = min(len(best.tokens), len(prompt) - 1)  # the last prompt token is evaluated for logits
        llama_cpp.llama_memory_seq_cp(self._memory, best.seq_id, seq.seq_id, 0, n)
        seq.n_past = seq.cached = n

    # -- resident prefixes --------------------------------------------------------------------------
    def _keep(self, tokens: tuple[int, ...], source: int, background: bool) -> None:
        """Keep the first ``len(tokens)`` cells of sequence ``source`` resident."""
        import llama_cpp

        if len(tokens) < MIN_KEPT_PREFIX or tokens in self._residents or not self.shape.max_prefixes:
            return
        if not self._prefix_ids:
            self._evict_oldest()
        seq_id = self._prefix_ids.pop(0)
        llama_cpp.llama_memory_seq_cp(self._memory, source, seq_id, 0, len(tokens))
        self._residents[tokens] = Resident(tokens, seq_id, background)

    def _evict_oldest(self) -> None:
        import llama_cpp

        _, resident = self._residents.popitem(last=False)
        if not resident.background and self._states.capacity:
            self._states.put(self.state_key, self._save(resident))
        llama_cpp.llama_memory_seq_rm(self._memory, resident.seq_id, -1, -1)
        self._prefix_ids.append(resident.seq_id)

    def _save(self, resident: Resident) -> PrefixState:
        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(self.ctx, resident.seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, resident.seq_id)
        return PrefixState(tokens=resident.tokens, data=bytes(buf)[:written])

    def _restore(self, state: PrefixState) -> Resident | None:
        import llama_cpp

        if not self.shape.max_prefixes:
            return None
        if not self._prefix_ids:
            self._evict_oldest()
        seq_id = self._prefix_ids.pop(0)
        buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(state.data), seq_id) != len(state.data):
            log.warning("could not restore a saved prefix of %d tokens; computing it", len(state.tokens))
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._prefix_ids.append(seq_id)
            return None
        resident = Resident(state.tokens, seq_id, background=False)
        self._residents[state.tokens] = resident
        return resident

    # -- decoding ---------------------------------------------------------------------------------
    @property
    def serves_live(self) -> bool:
        return any(not s.background for s in self.sequences)

    @property
    def reading_live_prompt(self) -> bool:
        """A live request's prompt is being read here: it comes before any shadow token."""
        return any(s.prefilling and not s.background and not s.done for s in self.sequences)

    def step(self, background_decoders: int | None = None) -> list[Sequence]:
        """One decode over every sequence that has work: each decoding one its next token(s),
        prefilling ones a chunk of their prompt (live before background); of the background
        sequences decoding, at most ``background_decoders`` (in turn) when given. Returns the
        sequences that finished or failed; their futures are not set yet."""

        ended = [s for s in self.sequences if self._cancelled_or_late(s)]
        self._unpark()
        plan: list[tuple[Sequence, Step]] = []
        for seq in self._decoders(ended, background_decoders):
            if (step := seq.next_step(0)) is not None:
                plan.append((seq, step))
        room = self.shape.n_batch - sum(len(s.tokens) for _, s in plan)
        background_budget = BACKGROUND_PREFILL_CHUNK
        if self.reading_live_prompt:
            # A live prompt is being read: shadow work's next token (or prompt chunk) waits a step.
            plan = [(seq, step) for seq, step in plan if not seq.background]
            room = self.shape.n_batch - sum(len(s.tokens) for _, s in plan)
            background_budget = 0
        # Chunked only to keep live streams flowing.
        budget = min(room, PREFILL_CHUNK if plan else self.shape.n_batch)
        for seq in sorted(
            (s for s in self.sequences if s.prefilling and not s.parked and s not in ended),
            key=lambda s: s.background,
        ):
            if budget <= 0:
                break
            kept = seq.req.prefix_tokens
            stop_at = (
                len(kept) if len(kept) >= MIN_KEPT_PREFIX and tuple(kept) not in self._residents else None
            )
            chunk = min(budget, background_budget) if seq.background else budget
            if chunk > 0 and (step := seq.next_step(chunk, stop_at)) is not None:
                plan.append((seq, step))
                budget -= len(step.tokens)
                if seq.background:
                    background_budget -= len(step.tokens)
        if plan:
            self._decode(plan, ended)
        for seq in self.sequences:
            if seq.done and seq not in ended:
                ended.append(seq)
        for seq in ended:
            self._release(seq)
        return ended

    def _decoders(self, ended: list[Sequence], background_limit: int | None) -> list[Sequence]:
        """The sequences past their prompt that decode this step: every live one, and the
        background ones up to ``background_limit``, taking turns."""
        ready = [s for s in self.sequences if not (s.done or s.parked or s.prefilling) and s not in ended]
        background = [s for s in ready if s.background]
        if background_limit is None or len(background) <= background_limit:
            return ready
        start = self._turn % len(background)
        self._turn += background_limit
        chosen = (background[start:] + background[:start])[:background_limit]
        return [s for s in ready if not s.background or s in chosen]

    def _cancelled_or_late(self, seq: Sequence) -> bool:
        if seq.finish is not None:
            return seq.done
        if seq.req.cancel.is_set():
            seq.finish = "cancelled"
            return True
        try:
            seq.check_deadline()
        except Exception as exc:
            seq.error = exc
            return True
        return False

    def _decode(self, plan: list[tuple[Sequence, Step]], ended: list[Sequence]) -> None:
        import llama_cpp

        batch = self._batch
        rows: list[int] = []
        n = 0
        for seq, step in plan:
            rows.append(n)
            for i, token in enumerate(step.tokens):
                batch.token[n] = token
                batch.pos[n] = step.pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.seq_id
                batch.logits[n] = step.logits[i]
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc == 1 and self._residents:  # no free cells: make room and try once more
            while self._residents:
                self._evict_oldest()
            rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc == 1 and self._take_back(ended):
            return  # this step's tokens are planned again, without the sequence that gave way
        if rc != 0:
            error = (
                UnavailableError("the KV cache is full; retry shortly", retry_after_s=1)
                if rc == 1
                else SlmAgentError(f"llama.cpp failed to decode a batch (code {rc})")
            )
            for seq, _ in plan:
                seq.error = error
                ended.append(seq)
            return
        self._stats.count_step(n, len(plan))
        for (seq, step), first in zip(plan, rows, strict=True):
            was_prefilling = seq.prefilling
            try:
                seq.evaluated(self.ctx, step, first)
            except Exception as exc:  # a grammar dead end, a deadline: this sequence only
                seq.error = exc
                ended.append(seq)
                continue
            kept = seq.req.prefix_tokens
            if was_prefilling and seq.n_past == len(kept):
                self._keep(tuple(kept), seq.seq_id, background=seq.background)

    def _take_back(self, ended: list[Sequence]) -> bool:
        """The cache is full: a sequence gives its cells back. Shadow work is cancelled (its
        worker queues it again); else the youngest live sequence is evicted, to read its prompt
        and output again once there is room. False when no other sequence can give way."""
        import llama_cpp

        active = [s for s in self.sequences if not (s.done or s.parked) and s not in ended]
        background = [s for s in active if s.background]
        if background:
            victim = background[-1]
            victim.finish = "cancelled"
            self._stats.preempted += 1
            ended.append(victim)
            return True
        if len(active) < 2:
            return False
        victim = active[-1]
        llama_cpp.llama_memory_seq_rm(self._memory, victim.seq_id, -1, -1)
        victim.evicted()
        self._stats.evicted += 1
        log.info("KV cache full: sequence %d gave back its cells, to be read again", victim.seq_id)
        return True

    def _unpark(self) -> None:
        """Let evicted sequences read their tokens again, oldest first, as room allows."""
        for seq in self.sequences:
            if (
                seq.parked
                and self._reserved(parked=False) + seq.cells(GENERATION_RESERVE) <= self.shape.n_cells
            ):
                seq.parked = False
                self._fork_prefix(seq)

    def _release(self, seq: Sequence) -> None:
        import llama_cpp

        if seq.prefilling and seq.background and seq.finish == "cancelled":
            # A shadow job a live request interrupted resumes from what it had read.
            self._keep(tuple(seq.prompt[: seq.n_past]), seq.seq_id, background=True)
        llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        self.sequences.remove(seq)
        self._free_ids.append(seq.seq_id)
        seq.close()

    def fail_all(self, error: BaseException) -> list[Sequence]:
        for seq in self.sequences:
            seq.error = error
        ended = list(self.sequences)
        for seq in ended:
            self._release(seq)
        return ended

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
