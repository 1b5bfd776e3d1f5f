"""Crash-safe file writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, tmp_prefix: str | None = None) -> None:
    """temp file + fsync + rename + fsync(dir): after a crash the file is whole or absent.

    Leftover temp files end in ``.tmp`` (and start with ``tmp_prefix`` when given), so a
    restart can find and delete them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_dir(staged: Path, target: Path) -> None:
    """Swap a fully written folder into ``target``: a reader sees the old folder or the new one.

    The old folder is renamed aside first and deleted only after the new one is in place.
    """
    staged, target = Path(staged), Path(target)
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)
