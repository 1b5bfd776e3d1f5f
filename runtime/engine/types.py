"""What goes in and out of the engine: its settings, one request, one result, its counters."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_agent.runtime.engine.constraints import Constraint, ConstraintEngine


@dataclass
class EngineConfig:
    model_path: Path
    n_ctx: int = 4096
    n_threads: int = 2
    n_batch: int = 512
    queue_size: int = 16
    prefix_cache_size: int = 8  # resident prefixes per context, and saved prefix states
    max_sequences: int = 8  # decoded together in one context
    max_contexts: int = 2  # adapter sets served at once (the base model's included)
    kv_budget_mb: int = 256  # all contexts' KV caches together
    # "gbnf" samples every constraint under llama.cpp's GBNF grammars (the path before llguidance).
    constraints: ConstraintEngine = "llguidance"

    def kv_cells(self, bytes_per_cell: int) -> int:
        """KV cells each context gets: its share of the budget, never more than its sequences can
        use, in llama.cpp's steps of 256."""
        per_context = self.kv_budget_mb * 2**20 // max(1, self.max_contexts)
        return min(per_context // bytes_per_cell, self.n_ctx * self.max_sequences) // 256 * 256


@dataclass
class GenerationRequest:
    """One generation. ``prefix`` is the fixed part of the prompt (cached), ``body`` the rest."""

    prefix: str
    body: str
    adapter: str | None = None
    adapter_scale: float = 1.0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    grammar: Constraint | Any = None  # a Constraint from grammars.py (or a bare llama_cpp.LlamaGrammar)
    logprobs: bool = False
    deadline: float | None = None  # time.monotonic() deadline
    cancel: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None
    # Shadow work: runs only while no live request waits, and a live submission cancels it.
    background: bool = False
    # Filled by Engine.prepare():
    prefix_tokens: list[int] = field(default_factory=list)
    body_tokens: list[int] = field(default_factory=list)
    matcher: Any = None  # this request's llguidance.LLMatcher; None: GBNF or free decoding
    enqueued_at: float = 0.0


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_ms: float
    ttft_ms: float | None
    total_ms: float
    token_logprobs: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated token ids, forced ones included
    constraint_engine: ConstraintEngine | None = None  # what constrained the output, None for free text
    forced_tokens: int = 0  # appended by fast-forward, without a sampling step
    mask_ms: list[float] = field(default_factory=list)  # per sampling step under llguidance

    @property
    def tokens_per_s(self) -> float | None:
        if self.ttft_ms is None or self.completion_tokens < 2:
            return None
        decode_s = (self.total_ms - self.queue_ms - self.ttft_ms) / 1000
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else None


@dataclass
class EngineStats:
    requests: int = 0
    contexts_created: int = 0  # a context per adapter set in use, up to max_contexts
    adapter_switches: int = 0  # an idle context switched to another adapter set
    prefix_hits_kv: int = 0
    prefix_hits_state: int = 0
    prefix_misses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0
    preempted: int = 0  # background sequences cancelled to make room for live requests
    evicted: int = 0  # live sequences whose KV cells were taken back, read again later
    queue_ms: float = 0.0  # summed over started requests
    steps: int = 0  # decode steps, each over every sequence of one context that had work
    step_tokens: int = 0
    step_sequences: int = 0

    def count_step(self, tokens: int, sequences: int) -> None:
        """Contexts may step side by side: their counts add up under a lock."""
        with _COUNTING:
            self.steps += 1
            self.step_tokens += tokens
            self.step_sequences += sequences


_COUNTING = threading.Lock()


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    handle: Any  # llama_adapter_lora_p
