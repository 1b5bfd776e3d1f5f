"""Decoding under an llguidance token mask, token by token, in the engine's own loop.

llama.cpp's GBNF sampler checks every one of the 262k vocabulary entries against the grammar on
each step; llguidance computes the same mask from a token trie in tens of microseconds. The mask
is written into the context's logits (-inf where disallowed) and llama.cpp's own sampler chain
then samples, so seeds, temperature and top_p behave as in free decoding. Where the grammar
allows exactly one continuation its tokens are appended without sampling ("fast-forward") and
evaluated in the same batch as the sampled token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slm_agent.errors import SchemaError, SlmAgentError
from slm_agent.runtime.engine.constraints import Constraint, limits

log = logging.getLogger(__name__)

# Up to this many non-empty 32-token words of the mask, listing the allowed tokens, filling -inf
# and putting them back is cheaper than masking the whole vocabulary in place.
_SPARSE_WORDS = 1024


@dataclass
class GuideCounters:
    """One request's figures: time spent computing and applying masks, tokens fast-forwarded."""

    mask_ms: list[float] = field(default_factory=list)
    forced: int = 0


class Guide:
    """The engine's llguidance state: the tokenizer, built once from the model's vocabulary (~2 s,
    on a thread started at load), and one compiled matcher per grammar, copied for each request."""

    def __init__(self) -> None:
        self._tokenizer: Any = None
        self._built = threading.Event()
        self._error: BaseException | None = None
        self._templates: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, vocab: Any) -> None:
        self._thread = threading.Thread(
            target=self._build, args=(vocab,), name="llguidance-tokenizer", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a build still reading the vocabulary and wait for it: the engine frees the model
        next, and a thread still reading its vocabulary would then crash the process."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _build(self, vocab: Any) -> None:
        started = time.perf_counter()
        try:
            self._tokenizer = _tokenizer_from_vocab(vocab, self._cancel)
            log.info("llguidance tokenizer built in %.2fs", time.perf_counter() - started)
        except BaseException as exc:  # the engine then samples under GBNF
            if not self._cancel.is_set():
                log.exception("could not build the llguidance tokenizer")
            self._error = exc
        finally:
            self._built.set()

    def tokenizer(self, timeout: float = 30.0) -> Any:
        """The tokenizer, waiting for the build; None when it failed."""
        self._built.wait(timeout)
        return self._tokenizer

    def matcher(self, constraint: Constraint) -> Any:
        """A fresh matcher for ``constraint``; None when llguidance cannot take it (use GBNF)."""
        import llguidance

        if constraint.llg is None or (tokenizer := self.tokenizer()) is None:
            return None
        with self._lock:
            template = self._templates.get(constraint.key)
        if template is None:
            # Built on the caller's thread (LLMatcher drops the GIL), never on the engine's.
            template = llguidance.LLMatcher(tokenizer, constraint.llg, log_level=0, limits=limits())
            if template.is_error():
                log.info("llguidance rejected %r: %s; using GBNF", constraint, template.get_error())
                constraint.llg = None
                constraint.gbnf()  # raises SchemaError when GBNF cannot take it either
                return None
            with self._lock:
                if len(self._templates) >= 256:
                    self._templates.pop(next(iter(self._templates)))
                self._templates[constraint.key] = template
        return template.deep_copy()


def _tokenizer_from_vocab(vocab: Any, cancel: threading.Event) -> Any:
    """llguidance.llamacpp.lltokenizer_from_vocab, less its deprecated per-token call (which
    warns 262k times): every token's bytes, control tokens marked with a 0xff prefix."""
    import ctypes

    import llama_cpp
    from llguidance import LLTokenizer

    buffer = ctypes.create_string_buffer(16 * 1024 + 1)
    pieces: list[bytes] = []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if token % 4096 == 0 and cancel.is_set():
            raise RuntimeError("the engine shut down while the llguidance tokenizer was being built")
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 16 * 1024, 0, True)
        if n < 0:
            raise ValueError(f"token {token} does not fit in a 16 KB buffer")
        piece = buffer.raw[:n]
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or (
            attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
        ):
            piece = b"\xff" + piece
        pieces.append(piece)
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=pieces,
        vocab_ptr=vocab,
        tokenize_fptr=tokenize,
        eos_token=llama_cpp.llama_vocab_eos(vocab),
        slices=None,
    )


class GuidedDecoder:
    """One sequence's llguidance state in the running batch: which token the grammar lets it take
    from its row of logits, and the tokens the grammar then forces (fast-forward)."""

    def __init__(self, matcher: Any, n_vocab: int, top_p: float, counters: GuideCounters) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.counters = counters
        self._bitmask = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)
        # Sample from the raw logits first and compute a mask only when the grammar refuses the
        # token: inside strings the model's choice is nearly always allowed, and masking 262k
        # logits costs more than checking one token. Conditioned on acceptance the sample follows
        # the masked distribution exactly, unless top_p cuts the raw distribution first: then
        # mask up front.
        self._optimistic = top_p >= 1.0

    def choose(self, logits: np.ndarray, sample: Callable[[], int]) -> int:
        """The next token: ``sample()`` draws from ``logits``, which are masked in place first
        where the grammar refuses the unmasked draw."""
        token = sample() if self._optimistic else -1
        started = time.perf_counter()
        if token < 0 or self.matcher.validate_tokens([token]) != 1:
            self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            allowed = _apply_mask(logits, self._bitmask, self.n_vocab)
            if allowed is not None and len(allowed) == 0:
                raise SlmAgentError(
                    f"the output grammar allows no token: {self.matcher.get_error() or 'dead end'}"
                )
            # One allowed token needs no sampling (and no pass over 262k candidates).
            token = int(allowed[0]) if allowed is not None and len(allowed) == 1 else sample()
        self.counters.mask_ms.append((time.perf_counter() - started) * 1000)
        return token

    def advance(self, token: int, room: int) -> list[int]:
        """Consume the chosen ``token``; return the tokens the grammar forces after it (at most
        ``room``), consumed too."""
        if not self.matcher.consume_token(token):
            raise _grammar_error("the sampled token", self.matcher)
        if self.matcher.is_stopped() or room <= 0:
            return []
        forced = list(self.matcher.compute_ff_tokens()[:room])
        if forced and not self.matcher.consume_tokens(forced):
            raise _grammar_error("fast-forward", self.matcher)
        self.counters.forced += len(forced)
        return forced

    @property
    def stopped(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return bool(self.matcher.is_stopped())


def _apply_mask(logits: np.ndarray, bitmask: np.ndarray, n_vocab: int) -> np.ndarray | None:
    """Set disallowed logits to -inf in place; return the allowed token ids, or None when they
    are too many to list cheaply."""
    words = np.flatnonzero(bitmask)
    if len(words) <= _SPARSE_WORDS:
        bits = np.unpackbits(bitmask[words].view(np.uint8), bitorder="little").reshape(-1, 32)
        row, col = np.nonzero(bits)
        allowed = words[row] * 32 + col
        allowed = allowed[allowed < n_vocab]
        kept = logits[allowed]
        logits.fill(-np.inf)
        logits[allowed] = kept
        return allowed
    every = np.unpackbits(bitmask.view(np.uint8), count=n_vocab, bitorder="little")
    np.copyto(logits, -np.inf, where=every == 0)
    return None


def _grammar_error(what: str, matcher: Any) -> SchemaError:
    """The parser gave up mid-answer (a limit a huge schema reaches, or a broken grammar): the
    schema's fault, said in one line. llguidance's own message dumps its state and the whole
    grammar, which would echo megabytes of schema back."""
    first = (matcher.get_error() or "unknown error").strip().splitlines()[0][:300]
    return SchemaError(
        f"{what} could not continue under the output grammar: {first}", param="response_format"
    )
