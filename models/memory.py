"""Memory estimates: will a model fit before we try to load it?"""

from __future__ import annotations

import os

from pydantic import BaseModel

from slm_agent.errors import InsufficientMemoryError
from slm_agent.models.manifest import GGUFInfo, ModelManifest

# llama.cpp's compute buffers and scratch: measured ~60-90 MB for gemma-3-270m at n_ctx 4096.
_COMPUTE_OVERHEAD = 96 * 1024 * 1024
_KV_BYTES_PER_ELEMENT = 2  # f16 cache
# What a KV cell is taken to cost when the GGUF does not say (about a 1B model's).
UNKNOWN_KV_BYTES_PER_CELL = 32 * 1024


class MemoryEstimate(BaseModel):
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    n_ctx: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


def kv_bytes_per_token(info: GGUFInfo | None) -> int:
    """Bytes one token takes in the KV cache: keys and values of every layer, f16; 0 unknown."""
    if not info or not info.block_count or not info.head_count_kv:
        return 0
    key_len = info.key_length or (info.embedding_length or 0) // max(info.head_count or 1, 1)
    value_len = info.value_length or key_len
    return info.block_count * info.head_count_kv * (key_len + value_len) * _KV_BYTES_PER_ELEMENT


def estimate(
    manifest: ModelManifest, n_ctx: int, kv_cells: int | None = None, contexts: int = 1
) -> MemoryEstimate:
    """Weights (the file, memory-mapped) + KV cache + compute buffers of ``contexts`` contexts.
    The KV cache holds ``n_ctx`` cells unless the engine's plan says how many (``kv_cells``, all
    contexts together)."""
    kv = kv_bytes_per_token(manifest.info) * (kv_cells if kv_cells is not None else n_ctx)
    overhead = _COMPUTE_OVERHEAD * contexts if manifest.kind == "base" else 0
    return MemoryEstimate(
        weights_bytes=manifest.size, kv_cache_bytes=kv, overhead_bytes=overhead, n_ctx=n_ctx
    )


def available_bytes() -> int:
    """Memory the OS can give us now (MemAvailable), falling back to free physical pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ensure_fits(needed: int, what: str, limit_bytes: int | None = None) -> None:
    """Refuse a load that needs more than the configured limit or than the OS has available."""
    budget = min(available_bytes(), limit_bytes) if limit_bytes else available_bytes()
    if needed > budget:
        raise InsufficientMemoryError(
            f"{what} needs about {needed / 2**20:.0f} MiB but only {budget / 2**20:.0f} MiB is available; "
            "lower n_ctx, pick a smaller quantization, or raise max_memory_mb"
        )


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
