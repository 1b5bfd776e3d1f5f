"""Re-quantize a GGUF model with llama.cpp's own quantizer (``llama_model_quantize``).

The output is written to a temporary file beside the target and renamed only when llama.cpp
reports success, so a failed or interrupted run never leaves a GGUF that looks whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, Field

from slm_agent.errors import BadRequestError, ConflictError, ModelStoreError, NotFoundError
from slm_agent.models import llama_log
from slm_agent.models.gguf_info import is_adapter, read_info
from slm_agent.models.hashing import sha256_file
from slm_agent.progress import ProgressFn

# llama_cpp is imported in the functions that call it: loading libllama costs ~0.1 s, and the
# quantize CLI imports this module for its help and type names.

log = logging.getLogger(__name__)

# Types that need no importance matrix, best quality first. IQ* and the 1-2 bit types need an
# imatrix, which this command does not compute, so they are left out rather than failing late.
QUANT_TYPES: tuple[str, ...] = (
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
)

# llama.cpp logs one "[  12/ 236] blk.0.attn_k.weight - ..." line per tensor it writes.
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


class QuantizeResult(BaseModel):
    source: str
    output: str
    qtype: str = Field(description="The requested type, e.g. Q8_0.")
    file_type: str | None = Field(None, description="The file type the output's header declares.")
    architecture: str
    source_bytes: int
    output_bytes: int
    seconds: float
    sha256: str = Field(description="sha256 of the output file.")

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.source_bytes if self.source_bytes else 0.0


def ftype_of(qtype: str) -> int:
    """The llama.cpp ftype constant for a type name such as ``q4_k_m``."""
    import llama_cpp

    name = qtype.strip().upper()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if name not in QUANT_TYPES or value is None:
        raise BadRequestError(
            f"unknown quantization type {qtype!r}; valid types: {', '.join(QUANT_TYPES)}", param="type"
        )
    return int(value)


def quantize_model(
    src: Path,
    dst: Path,
    qtype: str,
    *,
    threads: int | None = None,
    allow_requantize: bool = True,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> QuantizeResult:
    """Quantize the GGUF ``src`` to ``qtype`` at ``dst``; ``on_progress`` gets (tensors done, total)."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    ftype = ftype_of(qtype)
    if not src.is_file():
        raise NotFoundError(f"{src} does not exist or is not a file")
    info = read_info(src)  # refuses anything that is not a whole GGUF
    if is_adapter(info):
        raise ModelStoreError(f"{src} is a LoRA adapter; only base models can be quantized here")
    if dst.exists() and dst.resolve() == src.resolve():
        raise BadRequestError("the output would overwrite the source; pick another --output", param="output")
    if dst.exists() and not overwrite:
        raise ConflictError(f"{dst} already exists; remove it or pass --force")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: llama.cpp creates the file itself, so it gets the usual mode rather than 0600.
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    params.allow_requantize = allow_requantize
    lines: list[str] = []
    errors: list[str] = []

    def on_line(level: int, line: str) -> None:
        if level == llama_log.GGML_ERROR:
            errors.append(line)
        if on_progress and (match := _TENSOR_LINE.search(line)):
            on_progress(int(match.group(1)), int(match.group(2)))
        lines.append(line)
        del lines[:-64]

    started = time.monotonic()
    try:
        with llama_log.capture(on_line):
            code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            why = " ".join(e.strip() for e in errors) or "\n".join(lines[-3:])
            raise ModelStoreError(f"llama.cpp could not quantize {src} to {qtype.upper()}: {why}")
        out_info = read_info(tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    seconds = time.monotonic() - started
    result = QuantizeResult(
        source=str(src),
        output=str(dst),
        qtype=qtype.upper(),
        file_type=out_info.file_type,
        architecture=out_info.architecture,
        source_bytes=src.stat().st_size,
        output_bytes=dst.stat().st_size,
        seconds=round(seconds, 2),
        sha256=digest,
    )
    log.info("quantized %s -> %s (%s) in %.1fs", src, dst, result.file_type, seconds)
    return result
