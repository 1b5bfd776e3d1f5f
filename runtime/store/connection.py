"""One SQLite connection shared by a store's threads, behind a lock: the shape of every store that
writes one table of ``traces.db`` besides the trace store itself (spans, task states, responses)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from slm_agent.privacy.scrub import Sanitizer


class LockedConnection:
    """Autocommit (each statement is its own transaction unless the store opens one), rows by
    column name, and 30 s of patience for the trace writer's lock instead of failing at once.

    ``store_redacted`` (the ``[traces]`` setting) makes ``at_rest`` redact what a row quotes of
    prompts and answers, as the trace store does for traces."""

    def __init__(self, path: Path, *, store_redacted: bool = False) -> None:
        self._conn = sqlite3.connect(Path(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._sanitizer = Sanitizer() if store_redacted else None

    def at_rest(self, content: dict[str, Any]) -> dict[str, Any]:
        """``content`` (a row's text fields) as it may be written."""
        return content if self._sanitizer is None else self._sanitizer.clean(content)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
