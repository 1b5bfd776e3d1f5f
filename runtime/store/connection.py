"""One SQLite connection shared by a store's threads, behind a lock: the shape of every store that
writes one table of ``traces.db`` besides the trace store itself (spans, task states, responses)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class LockedConnection:
    """Autocommit (each statement is its own transaction unless the store opens one), rows by
    column name, and 30 s of patience for the trace writer's lock instead of failing at once."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(Path(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
