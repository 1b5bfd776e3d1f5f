"""Owner-only files: traces, exports and sync batches hold prompts, so no other user may read them."""

from __future__ import annotations

import os
from pathlib import Path

# Group and others get nothing: every file and folder created afterwards is 0600 / 0700.
OWNER_ONLY_UMASK = 0o077
PRIVATE_FILE = 0o600


def restrict_umask() -> int:
    """Make this process create owner-only files from now on; returns the previous umask."""
    return os.umask(OWNER_ONLY_UMASK)


def private_sqlite(path: Path) -> None:
    """Create (or tighten) a SQLite database and its -wal/-shm files as 0600 before connecting.

    SQLite creates -wal and -shm with the main file's mode whatever the umask, so a database that
    exists as 0600 before the first connection keeps its journals private too; a chmod after
    connecting would leave journals that were already created readable.
    """
    path = Path(path)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE_FILE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o777 != PRIVATE_FILE:
            os.chmod(file, PRIVATE_FILE)


def open_private(path: Path, mode: str = "w") -> int:
    """A file descriptor for writing ``path``, created 0600 (an existing file keeps its mode)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    return os.open(path, flags, PRIVATE_FILE)
