"""One request in the running batch: its prompt, what of it the KV cache holds, how it samples,
and its output so far.

The context (context.py) puts each sequence's next tokens into a shared batch and hands back the
rows of logits that belong to it; everything a request asks for per token (grammar, stop
strings, logprobs, streaming, cancellation, deadline) happens here, the same alone or batched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_agent.errors import DeadlineExceededError
from slm_agent.runtime.engine.constraints import Constraint
from slm_agent.runtime.engine.decoding import TextAssembler
from slm_agent.runtime.engine.guided import GuideCounters, GuidedDecoder
from slm_agent.runtime.engine.sampling import Sampler, logits_row, logsumexp
from slm_agent.runtime.engine.types import GenerationRequest, GenerationResult

# Fast-forwarded tokens per step: the grammar can force a long run (a tool's fixed keys); more
# than this waits for the next step so one sequence never swells everyone's batch.
_MAX_FORCED = 64


@dataclass(frozen=True)
class Vocab:
    """What a sequence needs of the model's vocabulary."""

    handle: Any  # llama_vocab_p, for GBNF samplers
    n_vocab: int
    piece: Callable[[int], bytes]
    is_eog: Callable[[int], bool]


@dataclass(frozen=True)
class Step:
    """This step's tokens of one sequence: where they start, and which rows need logits."""

    tokens: list[int]
    pos: int
    logits: list[bool]


class Sequence:
    def __init__(
        self, req: GenerationRequest, future: Future[GenerationResult], seq_id: int, vocab: Vocab
    ) -> None:
        self.req = req
        self.future = future
        self.seq_id = seq_id
        self.vocab = vocab
        self.prompt = req.prefix_tokens + req.body_tokens
        self._prompt_len = len(self.prompt)  # as asked (the prompt grows when it is read again)
        self.parked = False  # its KV cells were taken back: it waits for room to read it again
        self.started = time.perf_counter()
        self.queue_ms = (self.started - req.enqueued_at) * 1000
        self.n_past = 0  # tokens of this sequence the KV cache holds
        self.cached = 0  # of which were reused rather than computed
        self._feed: list[int] = []  # sampled (and forced) tokens not evaluated yet
        self._scoring_only = False  # one last decode to score forced tokens, then finish
        self._unscored = 0  # trailing logprobs of forced tokens, known after the next decode
        self.counters = GuideCounters()
        gbnf = None
        if req.matcher is None and req.grammar is not None:
            gbnf = req.grammar.gbnf() if isinstance(req.grammar, Constraint) else req.grammar
        self._sampler = Sampler(
            vocab.handle, temperature=req.temperature, top_p=req.top_p, seed=req.seed, gbnf=gbnf
        )
        self._guided = (
            GuidedDecoder(req.matcher, vocab.n_vocab, req.top_p, self.counters)
            if req.matcher is not None
            else None
        )
        self.constraint_engine = "llguidance" if self._guided else ("gbnf" if gbnf is not None else None)
        self._assembler = TextAssembler(req.stop)
        self._logprobs: list[float] = []
        self._tokens: list[int] = []
        self.completion = 0
        self.ttft_ms: float | None = None
        self.finish: str | None = None
        self.error: BaseException | None = None  # set instead of a result when it failed

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    @property
    def background(self) -> bool:
        return self.req.background

    @property
    def done(self) -> bool:
        return self.finish is not None and not self._scoring_only

    def cells(self, reserve: int) -> int:
        """KV cells this sequence holds, or may soon: its tokens so far and room for its first
        ``reserve`` generated tokens (no more than it may generate), less those it shares with a
        resident prefix."""
        grown = max(self.completion, min(self.req.max_tokens, reserve))
        return self._prompt_len + grown + 1 - self.cached

    def evicted(self) -> None:
        """Its KV cells were taken back for others (preemption by recompute): once there is room
        it reads its prompt and what it generated again, then goes on where it stopped. Only the
        logprobs of grammar-forced tokens still waiting to be scored are lost."""
        self.prompt = self.prompt[: self._prompt_len] + self._tokens
        self.n_past = self.cached = 0
        self._feed = []
        self._unscored = 0
        self._scoring_only = False
        self.parked = True

    def next_step(self, budget: int, stop_at: int | None = None) -> Step | None:
        """The tokens to evaluate now: up to ``budget`` prompt tokens (ending at ``stop_at`` when
        given, where a prefix is about to be kept) while prefilling, else the pending feed."""
        if self.prefilling:
            end = min(len(self.prompt), self.n_past + budget)
            if stop_at is not None and self.n_past < stop_at < end:
                end = stop_at
            if end <= self.n_past:
                return None
            chunk = self.prompt[self.n_past : end]
            return Step(chunk, self.n_past, [False] * (len(chunk) - 1) + [end == len(self.prompt)])
        feed = self._feed
        # Logits at every fed token only to score forced tokens' logprobs.
        every = self.req.logprobs and len(feed) > 1
        return Step(feed, self.n_past, [every] * (len(feed) - 1) + [True])

    def evaluated(self, ctx: Any, step: Step, first_row: int) -> None:
        """``step`` was decoded, its rows starting at batch index ``first_row``: take the next
        token where the step ended with logits."""
        self.n_past += len(step.tokens)
        if not step.logits[-1]:
            return
        last = first_row + len(step.tokens) - 1
        if self._unscored:
            rows = [logits_row(ctx, first_row + i, self.vocab.n_vocab) for i in range(len(step.tokens) - 1)]
            scores = [
                float(row[tok]) - logsumexp(row) for row, tok in zip(rows, step.tokens[1:], strict=True)
            ]
            self._logprobs[-self._unscored :] = scores[: self._unscored]
            self._unscored = 0
        if self._scoring_only:
            self._scoring_only = False
            return
        self._next(ctx, last)

    def _next(self, ctx: Any, index: int) -> None:
        # Greedy without a GBNF grammar is an argmax over the row (~0.1 ms): llama.cpp's sampler
        # first copies all 262k logits into a candidate array, ~15 % of a decode step here.
        argmax = self.req.temperature <= 0 and self.constraint_engine != "gbnf"
        wanted = self._guided is not None or self.req.logprobs or argmax
        logits = logits_row(ctx, index, self.vocab.n_vocab) if wanted else None
        lse = logsumexp(logits) if logits is not None and self.req.logprobs else 0.0

        def draw() -> int:  # from the row as it is now: masked in place where guided
            if argmax:
                assert logits is not None
                return int(np.argmax(logits))
            return self._sampler.sample(ctx, index)

        if self._guided is not None:
            assert logits is not None
            token = self._guided.choose(logits, draw)
        else:
            token = draw()
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000 + self.queue_ms
        if self.vocab.is_eog(token):
            self.finish = "stop"
            return
        forced: list[int] = []
        if self._guided is not None:
            room = min(self.req.max_tokens - self.completion - 1, _MAX_FORCED)
            forced = self._guided.advance(token, room)
        logprob = float(logits[token]) - lse if logits is not None and self.req.logprobs else None
        if self._emit(token, logprob):
            return
        for tok in forced:
            self._unscored += 1 if self.req.logprobs else 0
            if self._emit(tok, None):
                break
        if self.finish is None and self._guided is not None and self._guided.stopped:
            self.finish = "stop"  # the grammar is complete: nothing more may follow
        if self.finish is not None:
            if self._unscored:
                self._feed, self._scoring_only = [token, *forced], True
            return
        self._feed = [token, *forced]
        self.check_deadline()

    def _emit(self, token: int, logprob: float | None) -> bool:
        """One generated token into the output; True when the sequence is finished."""
        if self.vocab.is_eog(token):
            self.finish = "stop"
            return True
        self.completion += 1
        self._tokens.append(token)
        if self.req.logprobs:
            self._logprobs.append(logprob if logprob is not None else float("nan"))
        delta = self._assembler.feed(self.vocab.piece(token))
        if delta and self.req.on_text:
            self.req.on_text(delta)
        if self._assembler.stopped:
            self.finish = "stop"
        elif self.completion >= self.req.max_tokens:
            self.finish = "length"
        elif self.req.cancel.is_set():
            self.finish = "cancelled"
        return self.finish is not None

    def check_deadline(self) -> None:
        if self.req.deadline is not None and time.monotonic() > self.req.deadline:
            what = (
                f"after {self.completion} generated tokens"
                if not self.prefilling
                else "while reading the prompt"
            )
            raise DeadlineExceededError(f"the request passed its deadline {what}")

    def result(self) -> GenerationResult:
        tail = self._assembler.flush()
        if tail and self.req.on_text and self.finish != "cancelled":
            self.req.on_text(tail)
        return GenerationResult(
            text=self._assembler.text,
            finish_reason=self.finish or "stop",
            prompt_tokens=self._prompt_len,
            completion_tokens=self.completion,
            cached_tokens=self.cached,
            queue_ms=self.queue_ms,
            ttft_ms=self.ttft_ms,
            total_ms=(time.perf_counter() - self.started) * 1000 + self.queue_ms,
            token_logprobs=[lp for lp in self._logprobs if not np.isnan(lp)],
            tokens=self._tokens,
            constraint_engine=self.constraint_engine,  # type: ignore[arg-type]
            forced_tokens=self.counters.forced,
            mask_ms=self.counters.mask_ms,
        )

    def close(self) -> None:
        self._sampler.close()
