"""Publish an adapter for devices to pull: ``<publish_dir>/<name>/`` with the GGUF and its manifest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from slm_agent.atomic import write_atomic
from slm_agent.contracts.wire import MANIFEST_NAME, PublishedAdapter
from slm_agent.errors import ConflictError
from slm_agent.models.gguf_info import read_info
from slm_agent.models.hashing import sha256_file


def publish_adapter(
    source: Path,
    publish_dir: Path,
    *,
    name: str,
    tasks: list[str],
    base_sha256: str | None = None,
    metrics: dict[str, float] | None = None,
    dataset_sha256: str | None = None,
    training: dict[str, Any] | None = None,
    task_files: dict[str, str] | None = None,
) -> PublishedAdapter:
    """Copy the file first and write the manifest last: a listing never shows a half-copied file.

    Published versions are immutable; a new version gets a new name. ``task_files`` (task name ->
    TOML) travel in the manifest for tasks a device does not have yet (chat-shaped, discovered here).
    """
    source = Path(source)
    folder = Path(publish_dir) / name
    if (folder / MANIFEST_NAME).exists():
        raise ConflictError(f"adapter {name!r} is already published; publish a new version under a new name")
    folder.mkdir(parents=True, exist_ok=True)
    info = read_info(source)
    tmp = folder / f".{source.name}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, folder / source.name)
    manifest = PublishedAdapter(
        name=name,
        file=source.name,
        sha256=sha256_file(folder / source.name),
        size=source.stat().st_size,
        architecture=info.architecture,
        base_sha256=base_sha256,
        tasks=tasks,
        metrics=metrics,
        dataset_sha256=dataset_sha256,
        training=training,
        task_files=task_files or {},
    )
    write_atomic(folder / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
    return manifest
