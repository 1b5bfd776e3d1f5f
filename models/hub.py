"""Pull GGUF files from the Hugging Face Hub (the only place the store downloads from)."""

from __future__ import annotations

import os
from pathlib import Path

from slm_agent.errors import ModelStoreError, OfflineError


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download(spec: str, cache_dir: Path | None = None) -> tuple[Path, str]:
    """Download ``REPO[:FILE]``; returns (local path, origin string). Honours HF_HUB_OFFLINE."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, filename = spec.partition(":")
    if not repo or repo.count("/") != 1:
        raise ModelStoreError(f"expected HF_REPO[:FILE] like 'org/name:model.gguf', got {spec!r}")
    try:
        if not filename:
            if _offline():
                raise OfflineError(
                    f"HF_HUB_OFFLINE is set: cannot list {repo}; name the file as {repo}:FILE.gguf"
                )
            ggufs = [f for f in HfApi().list_repo_files(repo) if f.endswith(".gguf")]
            if len(ggufs) != 1:
                raise ModelStoreError(
                    f"{repo} has {len(ggufs)} .gguf files ({', '.join(ggufs[:8])}): pick one as {repo}:FILE"
                )
            filename = ggufs[0]
        # huggingface_hub reads HF_HUB_OFFLINE once, at import; ask it per call so the variable
        # always counts (offline, a pull fails at once instead of retrying the network).
        path = hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=_offline())
    except LocalEntryNotFoundError as exc:
        raise OfflineError(
            f"{repo}:{filename} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline or HF_HUB_OFFLINE set); copy the file here and use 'slm-agent models add PATH'"
        ) from exc
    except (OfflineError, ModelStoreError):
        raise
    except Exception as exc:  # network, auth, missing repo: all end the pull the same way
        raise ModelStoreError(f"could not download {repo}:{filename}: {exc}") from exc
    return Path(path), f"hf://{repo}/{filename}"
