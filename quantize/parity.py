"""Does the converted adapter do in llama.cpp what it did in PEFT? Compare answer losses.

The loss of every (prompt, answer) pair is computed on llama.cpp with the GGUF base and adapter,
exactly as the daemon will run them, and compared with PEFT's on the dequantized weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from slm_agent.errors import BadRequestError
from slm_agent.models import llama_log

Pair = tuple[list[int], list[int]]  # (prompt ids, answer ids)


class ParityReport(BaseModel):
    examples: int
    tokens: int
    peft_loss: float
    llama_loss: float
    base_peft_loss: float | None = None
    base_llama_loss: float | None = None
    difference: float
    tolerance: float
    passed: bool


def llama_answer_loss(
    model_path: Path, pairs: Sequence[Pair], lora_path: Path | None = None, threads: int | None = None
) -> float:
    """Token-weighted mean cross-entropy of the answers given their prompts, on llama.cpp."""
    from llama_cpp import Llama  # here, not at the top: loading libllama costs ~0.1 s

    llama_log.install()
    if not pairs:
        raise BadRequestError("no examples to measure the loss on")
    width = max(len(p) + len(a) for p, a in pairs)
    llm = Llama(
        str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=width + 8,
        n_batch=width + 8,
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    try:
        total, count = 0.0, 0
        for prompt, answer in pairs:
            llm.reset()
            llm.eval(prompt + answer[:-1])
            start = len(prompt) - 1
            logits = np.asarray(llm.scores[start : start + len(answer)], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
            total += float((log_z - logits[np.arange(len(answer)), answer]).sum())
            count += len(answer)
        return total / count
    finally:
        llm.close()


def check_parity(
    model_path: Path,
    lora_path: Path,
    pairs: Sequence[Pair],
    peft_loss: float,
    tolerance: float,
    base_peft_loss: float | None = None,
) -> ParityReport:
    llama_loss = llama_answer_loss(model_path, pairs, lora_path)
    base_llama = llama_answer_loss(model_path, pairs) if base_peft_loss is not None else None
    diff = abs(llama_loss - peft_loss)
    return ParityReport(
        examples=len(pairs),
        tokens=sum(len(a) for _, a in pairs),
        peft_loss=round(peft_loss, 5),
        llama_loss=round(llama_loss, 5),
        base_peft_loss=round(base_peft_loss, 5) if base_peft_loss is not None else None,
        base_llama_loss=round(base_llama, 5) if base_llama is not None else None,
        difference=round(diff, 5),
        tolerance=tolerance,
        passed=diff <= tolerance,
    )
