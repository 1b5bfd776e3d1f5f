"""The local engine: one GGUF base model, N LoRA adapters, continuous batching across requests.

Plain Python, no HTTP. Requests wait in a bounded queue (a full one is a ``QueueFullError``,
429) and join the running batch of their adapter set's context at the next token boundary; they
leave it the moment they finish. One worker thread drives every llama.cpp call: each loop admits
what fits, then runs a round of decode steps over the contexts that have work (pool.py), so
several adapter sets share the CPU fairly and none waits for another's request to finish.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from slm_agent.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    ModelStoreError,
    NotFoundError,
    QueueFullError,
    UnavailableError,
)
from slm_agent.models import llama_log
from slm_agent.runtime.engine.constraints import Constraint
from slm_agent.runtime.engine.context import AdapterContext, AdapterKey
from slm_agent.runtime.engine.guided import Guide
from slm_agent.runtime.engine.pool import ContextPool, plan_contexts
from slm_agent.runtime.engine.prefix_cache import PrefixCache
from slm_agent.runtime.engine.sequence import Sequence, Vocab
from slm_agent.runtime.engine.types import (
    EngineConfig,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    LoadedAdapter,
)

# llama_cpp is imported in the methods that call it: loading libllama costs ~0.1 s, which everyone
# importing this package only for its types (routing, serving, the CLI) would otherwise pay.

log = logging.getLogger(__name__)

_Item = tuple[GenerationRequest, "Future[GenerationResult]"]

# Within NEAR_LIVE_S of a live request, at most this many background sequences decode a step: a
# live request arriving then waits out a step of ~60 ms here instead of ~110 ms for eight.
BACKGROUND_DECODERS_NEAR_LIVE = 4
NEAR_LIVE_S = 2.0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stats = EngineStats()
        self.adapters: dict[str, LoadedAdapter] = {}
        self._model: Any = None  # llama_cpp._internals.LlamaModel
        self._vocab: Vocab | None = None
        # Held by the worker around each decode step, and by adapter changes.
        self._lock = threading.RLock()
        self._wake = threading.Condition()
        self._pending: deque[_Item] = deque()
        self._pool: ContextPool | None = None  # made by load(), on the model
        self._worker: threading.Thread | None = None
        self._active = False
        self._prefixes = PrefixCache(config.prefix_cache_size)
        self._ewma_request_s = 1.0
        self._tokenized: dict[str, list[int]] = {}
        self._pieces: dict[int, bytes] = {}
        self._last_finished = float("-inf")  # of a live request: background work is not serving
        self._submit_listeners: list[Callable[[GenerationRequest], None]] = []
        self._guide = Guide()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        llama_log.install()
        llama_cpp.llama_backend_init()
        started = time.perf_counter()
        shape = plan_contexts(self.config)
        self._model = LlamaModel(
            path_model=str(self.config.model_path),
            params=llama_cpp.llama_model_default_params(),
            verbose=False,
        )
        vocab = self._model.vocab
        self._vocab = Vocab(
            handle=vocab,
            n_vocab=llama_cpp.llama_vocab_n_tokens(vocab),
            piece=self._piece,
            is_eog=lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)),
        )
        self._pool = ContextPool(
            self._model.model, shape, self._prefixes, self.stats, self.config.max_contexts
        )
        # The base model's context is made now: the first request should not pay for it, and a
        # context that cannot be made is a load failure, not a request's.
        self._pool.get(None, None)
        if self.config.constraints == "llguidance":
            self._guide.start(vocab)
        self._active = True
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        log.info(
            "loaded %s in %.2fs: up to %d contexts of %d KV cells, %d sequences each",
            self.config.model_path.name,
            time.perf_counter() - started,
            self.config.max_contexts,
            shape.n_cells,
            shape.max_sequences,
        )

    @property
    def ready(self) -> bool:
        return self._active

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    @property
    def running(self) -> int:
        return self._pool.running if self._pool is not None else 0

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + self.running

    @property
    def idle(self) -> bool:
        """Nothing queued or running, live or background."""
        return self.queue_depth == 0

    @property
    def contexts(self) -> int:
        return len(self._pool) if self._pool is not None else 0

    def on_submit(self, listener: Callable[[GenerationRequest], None]) -> Callable[[], None]:
        """Call ``listener(req)`` on the submitting thread whenever a live request is queued (the
        shadow worker cancels its background job then); returns the call that unregisters it."""
        self._submit_listeners.append(listener)
        return lambda: self._submit_listeners.remove(listener)

    def serving(self, within_s: float = 2.0) -> bool:
        """True while requests run or wait, or one finished in the last ``within_s`` seconds."""
        return self.queue_depth > 0 or time.monotonic() - self._last_finished < within_s

    def shutdown(self, timeout: float = 60) -> None:
        """Stop taking requests, finish the queued and running ones, then free the model."""
        if not self._active:
            return
        self._active = False
        with self._wake:
            self._wake.notify()
        if self._worker:
            self._worker.join(timeout)
        self._guide.stop()
        with self._lock:
            if self._pool is not None:
                self._settle(self._pool.close(UnavailableError("the engine shut down", retry_after_s=2)))
            for name in list(self.adapters):
                self._free_adapter(name)
            if self._model is not None:
                self._model.close()
                self._model = None

    # -- adapters --------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Path) -> None:
        import llama_cpp

        if self._model is None:
            raise UnavailableError("the model is not loaded yet", retry_after_s=1)
        with self._lock:
            if name in self.adapters:
                return
            handle = llama_cpp.llama_adapter_lora_init(self._model.model, str(path).encode())
            if not handle:
                # A 400 naming the adapter: the message reaches API callers, the path stays here.
                raise ModelStoreError(
                    f"llama.cpp could not load adapter {name!r}: its file is not a LoRA adapter it can read"
                )
            self.adapters[name] = LoadedAdapter(name=name, path=Path(path), handle=handle)
        log.info("loaded adapter %s", name)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter; requests running under it fail (503, retryable), queued ones fail
        when their turn comes."""
        with self._lock:
            if name not in self.adapters:
                raise NotFoundError(f"adapter {name!r} is not loaded")
            self._free_adapter(name)
        log.info("unloaded adapter %s", name)

    def _free_adapter(self, name: str) -> None:
        import llama_cpp

        if self._pool is not None:
            self._settle(
                self._pool.drop(name, UnavailableError(f"adapter {name!r} was unloaded", retry_after_s=1))
            )
        self._prefixes.drop_adapter(f"{name}@")
        llama_cpp.llama_adapter_lora_free(self.adapters.pop(name).handle)

    # -- requests --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        if self._model is None:
            raise UnavailableError("the model is loading", retry_after_s=1)
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        import ctypes

        import llama_cpp

        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, 256, 0, False)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def _prefix_tokens(self, prefix: str) -> list[int]:
        """Task prefixes repeat on every call; tokenizing one costs ~0.25 ms, a lookup nothing."""
        tokens = self._tokenized.get(prefix)
        if tokens is None:
            tokens = self.tokenize(prefix, add_bos=True)
            if len(self._tokenized) >= 256:
                self._tokenized.pop(next(iter(self._tokenized)))
            self._tokenized[prefix] = tokens
        return list(tokens)

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        """Tokenize and check the request on the caller's thread, so a bad one never waits in line."""
        if req.adapter is not None and req.adapter not in self.adapters:
            raise NotFoundError(f"adapter {req.adapter!r} is not loaded")
        req.prefix_tokens = self._prefix_tokens(req.prefix)
        req.body_tokens = self.tokenize(req.body, add_bos=False) if req.body else []
        n_prompt = len(req.prefix_tokens) + len(req.body_tokens)
        if n_prompt >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {n_prompt} tokens but the context window is {self.n_ctx}; "
                "shorten the input or start the daemon with a larger n_ctx",
                param="messages",
            )
        req.max_tokens = max(1, min(req.max_tokens, self.n_ctx - n_prompt))
        req.matcher = None
        if isinstance(req.grammar, Constraint):
            # Compiled here, on the caller's thread: a schema neither engine can take is a 4xx
            # before the request queues, and the engine thread never compiles.
            if self.config.constraints == "llguidance":
                req.matcher = self._guide.matcher(req.grammar)
            if req.matcher is None:
                req.grammar.gbnf()
        return req

    def submit(self, req: GenerationRequest) -> Future[GenerationResult]:
        if not self._active:
            raise UnavailableError("the engine is not serving (loading or shutting down)", retry_after_s=2)
        if not req.prefix_tokens:
            self.prepare(req)
        future: Future[GenerationResult] = Future()
        req.enqueued_at = time.perf_counter()
        with self._wake:
            # Background work never takes a live request's place in the queue: each kind has
            # queue_size places.
            waiting = sum(item[0].background == req.background for item in self._pending)
            if waiting >= self.config.queue_size:
                slots = max(1, self.config.max_sequences)
                retry = max(1, math.ceil(self._ewma_request_s * len(self._pending) / slots))
                raise QueueFullError(
                    f"the engine queue is full ({self.config.queue_size} waiting); retry in {retry}s",
                    retry_after_s=retry,
                )
            self._pending.append((req, future))
            self._wake.notify()
        if not req.background:
            for listener in self._submit_listeners:
                try:
                    listener(req)
                except Exception:  # a listener's failure must never fail a live request
                    log.exception("engine submit listener failed")
        return future

    def generate(self, req: GenerationRequest) -> GenerationResult:
        """Submit and wait (for callers that are already off the event loop)."""
        return self.submit(req).result()

    # -- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self.running:
                    if not self._active:
                        return
                    self._wake.wait()
            with self._lock:
                self._admit()
                assert self._pool is not None
                groups = self._pool.round(self.config.n_threads)
            # Right after live traffic, another live request is likely: background sequences then
            # decode a few at a time, so the step one must wait out stays short.
            limit = BACKGROUND_DECODERS_NEAR_LIVE if self._near_live(groups) else None
            for group in groups:
                with self._lock:
                    assert self._pool is not None
                    self._settle(self._pool.step(group, self.config.n_threads, limit))
            if not groups:
                # Everything pending waits for a busy context to be freed: let time pass.
                time.sleep(0.001)

    def _near_live(self, groups: list[list[AdapterContext]]) -> bool:
        """A live request runs, or one finished within NEAR_LIVE_S."""
        recent = time.monotonic() - self._last_finished < NEAR_LIVE_S
        return recent or any(c.serves_live for group in groups for c in group)

    def _admit(self) -> None:
        """Move pending requests into their contexts' batches, live before background, each
        where its context has a free sequence and room in its KV cache."""
        with self._wake:
            waiting = sorted(self._pending, key=lambda item: item[0].background)
        for item in waiting:
            req, future = item
            taken = self._start(req, future)
            if taken:
                with self._wake:
                    self._pending.remove(item)

    def _start(self, req: GenerationRequest, future: Future[GenerationResult]) -> bool:
        """Start ``req`` in its context; True when it left the queue (started, failed or
        cancelled), False while it must wait for room."""
        if future.cancelled():
            return True
        queue_ms = (time.perf_counter() - req.enqueued_at) * 1000
        if req.cancel.is_set():
            future.set_result(_cancelled(req, queue_ms))
            return True
        if req.deadline is not None and time.monotonic() > req.deadline:
            future.set_exception(
                DeadlineExceededError(f"the request waited {queue_ms:.0f} ms in the queue past its deadline")
            )
            return True
        if req.adapter is not None and req.adapter not in self.adapters:
            future.set_exception(UnavailableError(f"adapter {req.adapter!r} was unloaded", retry_after_s=1))
            return True
        key: AdapterKey = (req.adapter, req.adapter_scale) if req.adapter and req.adapter_scale else None
        handle = self.adapters[req.adapter].handle if key is not None else None
        assert self._pool is not None
        ctx = self._pool.get(key, handle)
        if ctx is None and not req.background:
            # Live work goes first: a context that only shadow work holds is emptied for it.
            for other in self._pool:
                if all(s.background for s in other.sequences):
                    while (gone := other.preempt_background()) is not None:
                        self._settle([gone])
                    ctx = self._pool.get(key, handle)
                    break
        if ctx is None:
            return False
        while not ctx.can_take(req):
            # Shadow work in the way is cancelled (the shadow worker queues it again).
            if req.background or (gone := ctx.preempt_background()) is None:
                return False
            self._settle([gone])
        if not future.set_running_or_notify_cancel():
            return True
        assert self._vocab is not None
        vocab = self._vocab
        try:
            ctx.admit(lambda seq_id: Sequence(req, future, seq_id, vocab))
        except Exception as exc:  # a grammar llama.cpp cannot parse
            future.set_exception(exc)
            return True
        self.stats.requests += 1
        self.stats.queue_ms += queue_ms
        return True

    def _settle(self, ended: list[Sequence]) -> None:
        """Hand finished and failed sequences their results."""
        for seq in ended:
            if seq.error is not None:
                seq.future.set_exception(seq.error)
            else:
                result = seq.result()
                seq.future.set_result(result)
                # Service time only: counting the wait too would grow the estimate with the queue
                # it is multiplied by, and Retry-After would overshoot the real drain time.
                service_s = max(result.total_ms - result.queue_ms, 0.0) / 1000
                self._ewma_request_s = 0.8 * self._ewma_request_s + 0.2 * service_s
                self.stats.prompt_tokens += result.prompt_tokens
                self.stats.completion_tokens += result.completion_tokens
                if result.finish_reason == "cancelled":
                    self.stats.cancelled += 1
            if not seq.background:
                self._last_finished = time.monotonic()

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefixes


def _cancelled(req: GenerationRequest, queue_ms: float) -> GenerationResult:
    return GenerationResult(
        text="",
        finish_reason="cancelled",
        prompt_tokens=len(req.prefix_tokens) + len(req.body_tokens),
        completion_tokens=0,
        cached_tokens=0,
        queue_ms=queue_ms,
        ttft_ms=None,
        total_ms=queue_ms,
    )
