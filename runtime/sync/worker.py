"""The background push: a daemon thread that drains the backlog without slowing requests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from pathlib import Path

from slm_agent.contracts.wire import PushResult, SyncSettings
from slm_agent.errors import SlmAgentError
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.push import push

log = logging.getLogger(__name__)


class SyncWorker:
    """Pushes in a daemon thread on its own SQLite connection, one batch at a time.

    While the daemon serves (``busy()``), the worker rests after each batch so that it takes at most
    ``max_share`` of the time: sanitizing is CPU work in this process, and requests come first.
    When the daemon is idle it drains the backlog at full speed. Failures back off exponentially
    (up to ``backoff_max_s``); the daemon never waits on it.
    """

    def __init__(
        self,
        settings: SyncSettings,
        db_path: Path,
        *,
        excluded_tasks: Callable[[], Collection[str]] | Collection[str] = frozenset(),
        busy: Callable[[], bool] = lambda: False,
        max_share: float = 0.03,
    ) -> None:
        self.settings = settings
        self.db_path = Path(db_path)
        self._excluded = excluded_tasks
        self._busy = busy
        self.max_share = max_share
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: PushResult | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="slm-agent-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in flight (an unacknowledged batch is simply resent next time)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def trigger(self) -> None:
        """Push now instead of at the next interval."""
        self._wake.set()

    def _rest(self, spent_s: float) -> None:
        if self._busy():
            self._stop.wait(spent_s * (1 / self.max_share - 1))

    def _excluded_now(self) -> Collection[str]:
        return self._excluded() if callable(self._excluded) else self._excluded

    def _run(self) -> None:
        store = TraceStore(self.db_path)
        delay = 0.0
        failures = 0
        try:
            while not self._stop.is_set():
                self._wake.wait(delay)
                self._wake.clear()
                if self._stop.is_set():
                    break
                try:
                    self.last_result = push(
                        store,
                        self.settings,
                        excluded_tasks=self._excluded_now(),
                        pause=self._rest,
                        max_batches=1000,
                    )
                    self.last_error, failures, delay = None, 0, self.settings.interval_s
                except SlmAgentError as exc:
                    failures += 1
                    self.last_error = exc.message
                    delay = min(self.settings.backoff_max_s, self.settings.interval_s / 10 * 2**failures)
                    log.warning("sync push failed (%s); next try in %.0fs", exc.message, delay)
                except Exception:  # the worker must outlive any bug in one push
                    failures += 1
                    delay = min(self.settings.backoff_max_s, self.settings.interval_s * 2**failures)
                    log.exception("sync push crashed; next try in %.0fs", delay)
        finally:
            store.close()
