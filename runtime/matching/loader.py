"""Loading the matching encoder at daemon start, so a missing or broken one degrades, never fails.

A device without the encoder (not built, not pulled, corrupt, or onnxruntime not installed) still
serves every request: the matcher then matches by explicit name and template signature only, and
says so once (TaskMatcher's ``encoder_problem``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from slm_agent.contracts.centroids import MATCH_MAX_TOKENS
from slm_agent.models.encoder import MANIFEST, MODEL_FILE, Encoder
from slm_agent.models.hashing import sha256_file

log = logging.getLogger(__name__)

BUILD_HINT = "build it with `slm-agent quantize encoder`"


def load_encoder(
    folder: Path | None, *, threads: int | None = None, max_tokens: int = MATCH_MAX_TOKENS
) -> tuple[Encoder | None, str | None]:
    """(encoder, None) when ``folder`` holds a working encoder, else (None, why not, in one line).

    The model file is checked against the manifest's sha256 and one sentence is embedded, so a
    truncated or altered file is caught here rather than on a request.
    """
    if folder is None:
        return None, f"no encoder configured; {BUILD_HINT}"
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None, f"no encoder at {folder} (no {MANIFEST}); {BUILD_HINT}"
    try:
        encoder = Encoder(folder, threads=threads, max_length=max_tokens)
        digest = sha256_file(folder / MODEL_FILE)
        if digest != encoder.manifest.sha256:
            return (
                None,
                f"encoder {folder / MODEL_FILE} is corrupt (sha256 differs from its manifest); rebuild it",
            )
        probe = encoder.embed(["ok"])
        if probe.shape != (1, encoder.dim) or not np.isfinite(probe).all():
            return (
                None,
                f"encoder {folder} gives {probe.shape} embeddings, not (1, {encoder.dim}); rebuild it",
            )
    except ImportError as exc:
        return (
            None,
            f"onnxruntime and tokenizers are needed to embed ({exc}); pip install onnxruntime tokenizers",
        )
    except Exception as exc:  # onnxruntime, tokenizers and pydantic each raise their own kinds
        return None, f"cannot load encoder {folder}: {type(exc).__name__}: {exc}"
    log.info("matching encoder %s loaded (%d dims, %d tokens)", folder, encoder.dim, encoder.max_length)
    return encoder, None
