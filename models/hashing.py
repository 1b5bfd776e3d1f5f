"""sha256 of model files, with progress for the large ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

from slm_agent.progress import ProgressFn

_BLOCK = 4 * 1024 * 1024


def sha256_file(path: Path, on_progress: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
            done += len(block)
            if on_progress:
                on_progress(done, total)
    return digest.hexdigest()
