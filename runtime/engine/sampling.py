"""One sequence's sampler: llama.cpp's own sampler chain, run on that sequence's row of a batch.

Each sequence in the running batch keeps its chain (seed, temperature, top_p, and a GBNF grammar
where the request is constrained by one), so sequences sharing a decode step sample
independently and a seeded request draws the same tokens alone or batched.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from slm_agent.errors import SchemaError

# llama_cpp is imported where it is called, as in llama.py: loading libllama costs ~0.1 s.


class Sampler:
    def __init__(
        self, vocab: Any, *, temperature: float, top_p: float, seed: int | None, gbnf: Any = None
    ) -> None:
        import llama_cpp

        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if gbnf is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(
                vocab, gbnf._grammar.encode("utf-8"), gbnf._root.encode("utf-8")
            )
            if not grammar:
                self.close()
                raise SchemaError("llama.cpp could not parse the output grammar", param="response_format")
            self._add(grammar)
        if temperature <= 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
        else:
            self._add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            self._add(llama_cpp.llama_sampler_init_temp(temperature))
            self._add(llama_cpp.llama_sampler_init_dist(seed if seed is not None else random.getrandbits(32)))

    def _add(self, sampler: Any) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: Any, index: int) -> int:
        """Sample from the logits of batch position ``index`` (already masked, where guided); the
        chain accepts the token, so a grammar in it advances."""
        import llama_cpp

        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        import llama_cpp

        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def logits_row(ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    """The logits of batch position ``index``, as a writable view (masks are applied in place)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


def logsumexp(logits: np.ndarray) -> float:
    peak = float(logits.max())
    return peak + math.log(float(np.exp(logits - peak).sum()))
