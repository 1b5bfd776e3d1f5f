"""The local engine: one GGUF base model, N LoRA adapters, one worker thread that owns them.

Plain Python, no HTTP. Requests wait in a bounded queue; a full queue is a ``QueueFullError``
(429). Adapters are loaded once and switched per request on the context; switching clears the
KV cache so one adapter's cache is never reused by another (llama.cpp's server gets this wrong).
"""

from __future__ import annotations

import ctypes
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from slm_agent.errors import (
    ContextOverflowError,
    DeadlineExceededError,
    ModelStoreError,
    NotFoundError,
    QueueFullError,
    SlmAgentError,
    UnavailableError,
)
from slm_agent.models import llama_log
from slm_agent.runtime.engine import prefix_cache
from slm_agent.runtime.engine.constraints import Constraint, ConstraintEngine
from slm_agent.runtime.engine.decoding import TextAssembler
from slm_agent.runtime.engine.guided import Guide, GuideCounters, guided_tokens
from slm_agent.runtime.engine.prefix_cache import PrefixCache
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

# A prefix shorter than this is cheaper to recompute than to snapshot (~10 MB a state).
_MIN_SAVED_PREFIX = 48
# A background request evaluates its prompt this many tokens at a time, checking for cancellation
# in between: a live request waits at most one chunk (1-2 decode steps here) behind shadow work.
_BACKGROUND_PREFILL_STEP = 8


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stats = EngineStats()
        self.adapters: dict[str, LoadedAdapter] = {}
        self._llm: Any = None
        self._lock = threading.RLock()  # held while the model is in use: generation or adapter changes
        self._queue: queue.Queue[tuple[GenerationRequest, Future[GenerationResult]] | None] = queue.Queue(
            maxsize=config.queue_size
        )
        self._worker: threading.Thread | None = None
        self._active = False
        self._busy = False
        self._current_adapter: tuple[str | None, float] = (None, 1.0)
        self._prefixes = PrefixCache(config.prefix_cache_size)
        self._ewma_request_s = 1.0
        self._tokenized: dict[str, list[int]] = {}
        self._last_finished = float("-inf")  # of a live request: background work is not serving
        self._submit_listeners: list[Callable[[GenerationRequest], None]] = []
        self._background_slot: tuple[str, prefix_cache.PrefixState] | None = None  # (adapter key, state)
        self._guide = Guide()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        from llama_cpp import Llama

        llama_log.install()

        started = time.perf_counter()
        self._llm = Llama(
            model_path=str(self.config.model_path),
            n_ctx=self.config.n_ctx,
            n_threads=self.config.n_threads,
            n_threads_batch=self.config.n_threads,
            n_batch=self.config.n_batch,
            logits_all=False,
            verbose=False,
        )
        self._vocab = self._llm._model.vocab
        if self.config.constraints == "llguidance":
            self._guide.start(self._vocab)
        self._active = True
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        log.info("loaded %s in %.2fs", self.config.model_path.name, time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self._active

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + (1 if self._busy else 0)

    @property
    def idle(self) -> bool:
        """Nothing queued or running, live or background."""
        return self.queue_depth == 0

    def on_submit(self, listener: Callable[[GenerationRequest], None]) -> Callable[[], None]:
        """Call ``listener(req)`` on the submitting thread whenever a live request is queued (the
        shadow worker cancels its background job then); returns the call that unregisters it."""
        self._submit_listeners.append(listener)
        return lambda: self._submit_listeners.remove(listener)

    def serving(self, within_s: float = 2.0) -> bool:
        """True while requests run or wait, or one finished in the last ``within_s`` seconds."""
        return self.queue_depth > 0 or time.monotonic() - self._last_finished < within_s

    def shutdown(self, timeout: float = 60) -> None:
        """Stop taking requests, finish the queued ones, then free the model."""
        if not self._active:
            return
        self._active = False
        self._queue.put(None)
        if self._worker:
            self._worker.join(timeout)
        self._guide.stop()
        with self._lock:
            for name in list(self.adapters):
                self._free_adapter(name)
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    # -- adapters --------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Path) -> None:
        import llama_cpp

        if self._llm is None:
            raise UnavailableError("the model is not loaded yet", retry_after_s=1)
        with self._lock:
            if name in self.adapters:
                return
            handle = llama_cpp.llama_adapter_lora_init(self._llm.model, str(path).encode())
            if not handle:
                # A 400 naming the adapter: the message reaches API callers, the path stays here.
                raise ModelStoreError(
                    f"llama.cpp could not load adapter {name!r}: its file is not a LoRA adapter it can read"
                )
            self.adapters[name] = LoadedAdapter(name=name, path=Path(path), handle=handle)
        log.info("loaded adapter %s", name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise NotFoundError(f"adapter {name!r} is not loaded")
            self._free_adapter(name)
        log.info("unloaded adapter %s", name)

    def _free_adapter(self, name: str) -> None:
        import llama_cpp

        if self._current_adapter[0] == name:
            self._apply_adapter(None, 1.0)
        adapter = self.adapters.pop(name)
        self._prefixes.drop_adapter(f"{name}@")
        if self._background_slot is not None and self._background_slot[0].startswith(f"{name}@"):
            self._background_slot = None
        llama_cpp.llama_adapter_lora_free(adapter.handle)

    def _apply_adapter(self, name: str | None, scale: float) -> None:
        """Set the context's adapter; a change invalidates the KV cache."""
        import llama_cpp

        if (name, scale) == self._current_adapter:
            return
        ctx = self._llm._ctx.ctx
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[name].handle)
            scales = (ctypes.c_float * 1)(scale)
            rc = llama_cpp.llama_set_adapters_lora(ctx, handles, 1, scales)
        if rc != 0:
            raise SlmAgentError(f"llama.cpp refused to set adapter {name!r} (code {rc})")
        self._llm.reset()  # the KV cache was computed under other weights
        self._current_adapter = (name, scale)
        self.stats.adapter_switches += 1

    # -- requests --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        if self._llm is None:
            raise UnavailableError("the model is loading", retry_after_s=1)
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

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
        try:
            self._queue.put_nowait((req, future))
        except queue.Full:
            retry = max(1, math.ceil(self._ewma_request_s * self._queue.qsize()))
            raise QueueFullError(
                f"the engine queue is full ({self.config.queue_size} waiting); retry in {retry}s",
                retry_after_s=retry,
            ) from None
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

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            req, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self._busy = True
            try:
                with self._lock:
                    result = self._run(req)
                future.set_result(result)
                # Service time only: counting the wait too would grow the estimate with the queue
                # it is multiplied by, and Retry-After would overshoot the real drain time.
                service_s = max(result.total_ms - result.queue_ms, 0.0) / 1000
                self._ewma_request_s = 0.8 * self._ewma_request_s + 0.2 * service_s
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                self._busy = False
                if not req.background:
                    self._last_finished = time.monotonic()

    def _adapter_key(self) -> str:
        name, scale = self._current_adapter
        return f"{name}@{scale}" if name else ""

    def _ensure_prefix(self, prefix: list[int], cancel: threading.Event | None = None) -> int | None:
        """Make the context hold ``prefix``; returns how many prompt tokens were reused, or None
        when ``cancel`` (a background request's) was set while the prefix was being computed."""
        llm = self._llm
        common = _common_prefix(llm._input_ids, prefix)
        if common >= len(prefix):
            self.stats.prefix_hits_kv += 1
            return len(prefix)
        key = tuple(prefix)
        saved = self._prefixes.get(self._adapter_key(), key)
        if saved is not None:
            prefix_cache.restore(llm, saved)
            self.stats.prefix_hits_state += 1
            return len(prefix)
        self.stats.prefix_misses += 1
        if cancel is not None:
            return self._background_prefix(prefix, common, cancel)
        if len(prefix) >= _MIN_SAVED_PREFIX and self._prefixes.capacity:
            self._evaluate(prefix, common, None)
            self._prefixes.put(self._adapter_key(), prefix_cache.save(llm))
        return common

    def _background_prefix(self, prefix: list[int], common: int, cancel: threading.Event) -> int | None:
        """Background work keeps its own snapshot (one slot, partial ones included): a job a live
        request interrupted resumes where it stopped, and never evicts a live prefix's state."""
        llm, key = self._llm, self._adapter_key()
        slot = self._background_slot
        held = slot[1].tokens if slot is not None and slot[0] == key else ()
        if slot is not None and common < len(held) <= len(prefix) and tuple(prefix[: len(held)]) == held:
            prefix_cache.restore(llm, slot[1])
            common = len(held)
        done = self._evaluate(prefix, common, cancel)
        if llm.n_tokens >= _MIN_SAVED_PREFIX and llm.n_tokens > common:
            self._background_slot = (key, prefix_cache.save(llm))
        return common if done else None

    def _evaluate(self, tokens: list[int], start: int, cancel: threading.Event | None) -> bool:
        """Evaluate ``tokens[start:]`` after the ``start`` the context holds. With ``cancel`` (a
        background request) in chunks, checking it in between: False when it was set."""
        llm = self._llm
        llm.n_tokens = start
        step = _BACKGROUND_PREFILL_STEP if cancel is not None else max(1, len(tokens) - start)
        for at in range(start, len(tokens), step):
            if cancel is not None and cancel.is_set():
                return False
            llm.eval(tokens[at : at + step])
        return True

    def _prefill(self, tokens: list[int], cancel: threading.Event) -> bool:
        """Evaluate what of ``tokens`` the context does not hold yet, interruptibly."""
        common = _common_prefix(self._llm._input_ids, tokens)
        return common >= len(tokens) or self._evaluate(tokens, common, cancel)

    def _run(self, req: GenerationRequest) -> GenerationResult:
        llm = self._llm
        started = time.perf_counter()
        queue_ms = (started - req.enqueued_at) * 1000
        if req.cancel.is_set():
            return _cancelled(req, queue_ms)
        if req.deadline is not None and time.monotonic() > req.deadline:
            raise DeadlineExceededError(
                f"the request waited {queue_ms:.0f} ms in the queue past its deadline"
            )
        self._apply_adapter(req.adapter, req.adapter_scale)
        # A background request computes its prompt in chunks a live submission can interrupt;
        # ``generate`` then finds it all in the KV cache and samples at once.
        cancel = req.cancel if req.background else None
        cached = self._ensure_prefix(req.prefix_tokens, cancel)
        tokens = req.prefix_tokens + req.body_tokens
        if cached is None or (cancel is not None and not self._prefill(tokens, cancel)):
            self.stats.cancelled += 1
            return _cancelled(req, queue_ms)
        if req.seed is not None:
            llm.set_seed(req.seed)
        else:
            llm.set_seed(int.from_bytes(np.random.bytes(4), "little"))
        assembler = TextAssembler(req.stop)
        logprobs: list[float] = []
        completion = 0
        finish = "length"
        ttft_ms: float | None = None
        self.stats.requests += 1
        counters = GuideCounters()
        steps, used = self._token_source(req, tokens, counters)
        try:
            for token, logprob in steps:
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000 + queue_ms
                if self._is_eog(token):
                    finish = "stop"
                    break
                completion += 1
                if req.logprobs:
                    logprobs.append(logprob if logprob is not None else self._logprob(token))
                delta = assembler.feed(llm.detokenize([token], special=False))
                if delta and req.on_text:
                    req.on_text(delta)
                if assembler.stopped:
                    finish = "stop"
                    break
                if completion >= req.max_tokens:
                    break
                if req.cancel.is_set():
                    finish = "cancelled"
                    self.stats.cancelled += 1
                    break
                if req.deadline is not None and time.monotonic() > req.deadline:
                    raise DeadlineExceededError(
                        f"the request passed its deadline after {completion} generated tokens",
                    )
            else:
                finish = "stop"  # the grammar is complete: nothing more may follow
        finally:
            steps.close()
        tail = assembler.flush()
        if tail and req.on_text and finish != "cancelled":
            req.on_text(tail)
        self.stats.prompt_tokens += len(tokens)
        self.stats.completion_tokens += completion
        return GenerationResult(
            text=assembler.text,
            finish_reason=finish,
            prompt_tokens=len(tokens),
            completion_tokens=completion,
            cached_tokens=cached,
            queue_ms=queue_ms,
            ttft_ms=ttft_ms,
            total_ms=(time.perf_counter() - started) * 1000 + queue_ms,
            token_logprobs=logprobs,
            constraint_engine=used,
            forced_tokens=counters.forced,
            mask_ms=counters.mask_ms,
        )

    def _token_source(
        self, req: GenerationRequest, tokens: list[int], counters: GuideCounters
    ) -> tuple[Generator[tuple[int, float | None], None, None], ConstraintEngine | None]:
        """The sampled tokens (with log-probabilities where known) and which constraint engine
        chose them: llguidance's masks where the request has a matcher, else llama.cpp's GBNF."""
        if req.matcher is not None:
            steps = guided_tokens(
                self._llm,
                tokens,
                req.matcher,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                logprobs=req.logprobs,
                is_eog=self._is_eog,
                counters=counters,
            )
            return steps, "llguidance"
        grammar = req.grammar.gbnf() if isinstance(req.grammar, Constraint) else req.grammar
        gen = self._llm.generate(
            tokens,
            top_k=0,
            top_p=req.top_p,
            min_p=0.0,
            temp=req.temperature,
            repeat_penalty=1.0,
            grammar=grammar,
        )
        return _unscored(gen), ("gbnf" if grammar is not None else None)

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _logprob(self, token: int) -> float:
        """Log-probability of the sampled token under the model's raw distribution."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),))
        peak = float(logits.max())
        return float(logits[token] - peak - math.log(float(np.exp(logits - peak).sum())))

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefixes


def _unscored(gen: Generator[int, Any, None]) -> Generator[tuple[int, float | None], None, None]:
    try:
        for token in gen:
            yield token, None
    finally:
        gen.close()


def _common_prefix(held: Any, tokens: list[int]) -> int:
    """How many leading tokens the context already holds."""
    common = 0
    for a, b in zip(held, tokens, strict=False):
        if a != b:
            break
        common += 1
    return common


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
