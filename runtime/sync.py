"""Push: device traces to the training box, exactly once (pulling adapters back: ``sync_pull``).

Exactly-once delivery rests on three facts:

* every trace has a sequence number that never changes (``(store_id, seq)`` names it for ever);
* the device records the bounds of a batch *before* sending it, so after a crash it resends the
  very same batch under the very same id, and advances its cursor only on an acknowledgement;
* the collector writes a batch id at most once and keeps its own per-store cursor, so a retried
  or overlapping batch is recognised and acknowledged without being written again.

Nothing leaves the device before it passed the redactor and the secret scrubber; the redactor's
mapping (the originals) is dropped on the spot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel

from slm_agent.atomic import write_atomic
from slm_agent.errors import (
    AuthenticationError,
    BadRequestError,
    SlmAgentError,
    StorageFullError,
    UnavailableError,
)
from slm_agent.runtime.scrub import Sanitizer
from slm_agent.runtime.sync_wire import (
    BATCH_SUFFIX,
    CHECKSUM_HEADER,
    PushResult,
    SyncAck,
    SyncBatch,
    SyncSettings,
    encode_batch,
)
from slm_agent.runtime.traces import FeedbackRecord, TraceRecord, TraceStore, utcnow

log = logging.getLogger(__name__)


# -- device state (trace DB, migration m002) -----------------------------------------------------
class SyncState(BaseModel):
    target: str
    trace_seq: int = 0
    feedback_seq: int = 0
    pending_trace_seq: int | None = None
    pending_feedback_seq: int | None = None
    pushed_traces: int = 0
    pushed_feedback: int = 0
    last_attempt_at: str | None = None
    last_success_at: str | None = None
    last_error: str | None = None


def _conn(store: TraceStore) -> sqlite3.Connection:
    # Autocommit connection; each statement below is its own durable transaction (WAL).
    return store.db.conn


def store_ids(store: TraceStore, settings: SyncSettings) -> tuple[str, str]:
    """(device_id, store_id): the configured device id or the one generated in the trace DB."""
    meta = dict(_conn(store).execute("SELECT key, value FROM sync_meta").fetchall())
    return settings.device_id or meta["device_id"], meta["store_id"]


def normalize_target(target: str) -> str:
    if is_url(target):
        return target.rstrip("/")
    return str(Path(target).expanduser().resolve())


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def read_state(store: TraceStore, target: str) -> SyncState:
    target = normalize_target(target)
    conn = _conn(store)
    conn.execute("INSERT OR IGNORE INTO sync_state (target) VALUES (?)", [target])
    row = conn.execute("SELECT * FROM sync_state WHERE target = ?", [target]).fetchone()
    return SyncState.model_validate(dict(row))


def all_states(store: TraceStore) -> list[SyncState]:
    rows = _conn(store).execute("SELECT * FROM sync_state ORDER BY target").fetchall()
    return [SyncState.model_validate(dict(r)) for r in rows]


def backlog(store: TraceStore, state: SyncState) -> int:
    return int(
        _conn(store).execute("SELECT count(*) FROM traces WHERE seq > ?", [state.trace_seq]).fetchone()[0]
    )


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    from slm_agent.runtime.traces import _decode_row  # the store's own JSON-column decoding

    return _decode_row(dict(row))


def _build_batch(
    store: TraceStore,
    state: SyncState,
    device_id: str,
    store_id: str,
    batch_size: int,
    excluded: Collection[str],
) -> tuple[SyncBatch, int] | None:
    """The next batch (the pending one again after a crash) and the number of opted-out traces."""
    conn = _conn(store)
    t_from, f_from = state.trace_seq, state.feedback_seq
    if state.pending_trace_seq is not None and state.pending_feedback_seq is not None:
        t_to, f_to = state.pending_trace_seq, state.pending_feedback_seq
    else:
        # Bounds first, rows second: the bounds are recorded before anything is sent.
        t_last = conn.execute(
            "SELECT max(seq) FROM (SELECT seq FROM traces WHERE seq > ? ORDER BY seq LIMIT ?)",
            [t_from, batch_size],
        ).fetchone()[0]
        f_last = conn.execute(
            "SELECT max(seq) FROM (SELECT seq FROM feedback WHERE seq > ? ORDER BY seq LIMIT ?)",
            [f_from, batch_size],
        ).fetchone()[0]
        t_to, f_to = t_last or t_from, f_last or f_from
        if (t_to, f_to) == (t_from, f_from):
            return None
        conn.execute(
            "UPDATE sync_state SET pending_trace_seq = ?, pending_feedback_seq = ? WHERE target = ?",
            [t_to, f_to, state.target],
        )
    trace_rows = conn.execute(
        "SELECT * FROM traces WHERE seq > ? AND seq <= ? ORDER BY seq", [t_from, t_to]
    ).fetchall()
    fb_rows = conn.execute(
        "SELECT f.*, t.task AS _task FROM feedback f LEFT JOIN traces t ON t.id = f.trace_id "
        "WHERE f.seq > ? AND f.seq <= ? ORDER BY f.seq",
        [f_from, f_to],
    ).fetchall()
    traces = [TraceRecord.model_validate(_decode(r)) for r in trace_rows if r["task"] not in excluded]
    feedback = [
        FeedbackRecord.model_validate({k: v for k, v in dict(r).items() if k != "_task"})
        for r in fb_rows
        if r["_task"] not in excluded
    ]
    batch = SyncBatch(
        batch_id=f"{device_id}.{store_id}.t{t_from + 1:012d}-{t_to:012d}.f{f_from + 1:012d}-{f_to:012d}",
        device_id=device_id,
        store_id=store_id,
        trace_from=t_from,
        trace_to=t_to,
        feedback_from=f_from,
        feedback_to=f_to,
        traces=traces,
        feedback=feedback,
    )
    return batch, len(trace_rows) - len(traces)


# -- targets -------------------------------------------------------------------------------------
class Target(Protocol):
    def send(self, batch: SyncBatch, body: bytes) -> SyncAck: ...

    def close(self) -> None: ...


class HttpTarget:
    """A collector over HTTP(S), authenticated with this device's bearer token."""

    def __init__(
        self, url: str, token: str | None, timeout_s: float, client: httpx.Client | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owned = client is None
        self.client = client or httpx.Client(timeout=timeout_s)
        self.client.headers.update(headers)

    def send(self, batch: SyncBatch, body: bytes) -> SyncAck:
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            CHECKSUM_HEADER: hashlib.sha256(body).hexdigest(),
        }
        try:
            response = self.client.post(f"{self.url}/v1/batches", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise UnavailableError(f"collector {self.url} unreachable: {exc}", code="target_down") from exc
        raise_for_response(response, self.url)
        return SyncAck.model_validate_json(response.content)

    def get(self, path: str) -> httpx.Response:
        try:
            response = self.client.get(f"{self.url}{path}")
        except httpx.HTTPError as exc:
            raise UnavailableError(f"collector {self.url} unreachable: {exc}", code="target_down") from exc
        raise_for_response(response, self.url)
        return response

    def close(self) -> None:
        if self._owned:
            self.client.close()


def raise_for_response(response: httpx.Response, url: str) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
        message, code = error.get("message", response.text), error.get("code")
    except ValueError:
        message, code = response.text[:200], None
    status = response.status_code
    if status == 401:
        raise AuthenticationError(f"collector {url} refused this device's token: {message}")
    if status == 507:
        raise StorageFullError(f"collector {url} is out of storage: {message}")
    if status in (400, 422) and code == "corrupt_batch":
        # Damaged in transit: sending the same batch again is the cure.
        raise UnavailableError(f"collector {url} received a damaged batch: {message}", code="corrupt_batch")
    if status >= 500 or status == 429:
        raise UnavailableError(f"collector {url} answered {status}: {message}", code="target_down")
    raise BadRequestError(f"collector {url} refused the batch ({status}): {message}", code=code)


class DirectoryTarget:
    """A folder the collector imports later (``slm-agent collector import DIR``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def send(self, batch: SyncBatch, body: bytes) -> SyncAck:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / f"{batch.batch_id}{BATCH_SUFFIX}", body)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StorageFullError(f"no room in {self.path} for batch {batch.batch_id}: {exc}") from exc
            raise UnavailableError(f"cannot write to {self.path}: {exc}", code="target_down") from exc
        # A durable file under its final name is the acknowledgement; a re-sent batch overwrites it
        # under the same name, and the collector imports each batch id once.
        return SyncAck(batch_id=batch.batch_id, trace_seq=batch.trace_to, feedback_seq=batch.feedback_to)

    def close(self) -> None:
        pass


_FULL_ERRNOS = {28, 27, 122}  # ENOSPC, EFBIG, EDQUOT


def device_token(settings: SyncSettings) -> str | None:
    return os.environ.get(settings.token_env) or None


def open_target(target: str, settings: SyncSettings, client: httpx.Client | None = None) -> Target:
    if is_url(target):
        return HttpTarget(target, device_token(settings), settings.timeout_s, client)
    return DirectoryTarget(Path(target).expanduser())


# -- push ----------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int], None]


def push(
    store: TraceStore,
    settings: SyncSettings,
    target: str | None = None,
    on_progress: ProgressFn | None = None,
    *,
    excluded_tasks: Collection[str] = frozenset(),
    max_batches: int | None = None,
    client: httpx.Client | None = None,
    pause: Callable[[float], None] | None = None,
) -> PushResult:
    """Send every trace and feedback row past the target's cursor, batch by batch.

    Each batch is retried with backoff (``settings.max_attempts``); the cursor moves only on an
    acknowledgement, so stopping at any moment loses nothing and repeats nothing. ``pause`` is
    called after each batch with the seconds it took, so a caller can throttle the push.
    """
    target = target or settings.target
    if not target:
        raise BadRequestError("no sync target: pass --to URL|DIR or set [sync] target in the config")
    target = normalize_target(target)
    with _push_lock(store, settings.lock_timeout_s):
        return _push_locked(store, settings, target, on_progress, excluded_tasks, max_batches, client, pause)


@contextlib.contextmanager
def _push_lock(store: TraceStore, timeout_s: float) -> Iterator[None]:
    """One pusher per trace DB at a time (daemon worker vs. CLI); the OS frees it if we die."""
    path = store.path.with_name(store.path.name + ".sync.lock")
    with path.open("a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"another sync push on {store.path} is still running; try again later",
                        code="sync_busy",
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _push_locked(
    store: TraceStore,
    settings: SyncSettings,
    target: str,
    on_progress: ProgressFn | None,
    excluded_tasks: Collection[str],
    max_batches: int | None,
    client: httpx.Client | None,
    pause: Callable[[float], None] | None,
) -> PushResult:
    started = time.monotonic()
    device_id, store_id = store_ids(store, settings)
    sanitizer = Sanitizer()
    state = read_state(store, target)
    result = PushResult(target=target, trace_seq=state.trace_seq, feedback_seq=state.feedback_seq)
    total = backlog(store, state)
    sink = open_target(target, settings, client)
    try:
        while max_batches is None or result.batches < max_batches:
            batch_started = time.perf_counter()
            state = read_state(store, target)
            built = _build_batch(store, state, device_id, store_id, settings.batch_size, excluded_tasks)
            if built is None:
                break
            batch, skipped = built
            if batch.traces or batch.feedback:
                ack = _send_with_retry(sink, batch, encode_batch(batch, sanitizer), settings, store, target)
            else:  # only opted-out rows: nothing to send, just move past them
                ack = SyncAck(
                    batch_id=batch.batch_id, trace_seq=batch.trace_to, feedback_seq=batch.feedback_to
                )
            if ack.trace_seq < batch.trace_to or ack.feedback_seq < batch.feedback_to:
                raise UnavailableError(
                    f"collector acknowledged up to {ack.trace_seq}/{ack.feedback_seq}, short of the batch "
                    f"{batch.batch_id}: will resend",
                    code="short_ack",
                )
            _conn(store).execute(
                "UPDATE sync_state SET trace_seq = max(trace_seq, ?), feedback_seq = max(feedback_seq, ?), "
                "pending_trace_seq = NULL, "
                "pending_feedback_seq = NULL, pushed_traces = pushed_traces + ?, "
                "pushed_feedback = pushed_feedback + ?, last_success_at = ?, last_error = NULL "
                "WHERE target = ?",
                [batch.trace_to, batch.feedback_to, len(batch.traces), len(batch.feedback), utcnow(), target],
            )
            result.batches += 1
            result.traces += len(batch.traces)
            result.feedback += len(batch.feedback)
            result.skipped += skipped
            result.duplicates += int(ack.duplicate)
            result.trace_seq, result.feedback_seq = batch.trace_to, batch.feedback_to
            if on_progress:
                on_progress(result.traces + result.skipped, total)
            if pause:
                pause(time.perf_counter() - batch_started)
    finally:
        sink.close()
    result.pending_traces = backlog(store, read_state(store, target))
    result.seconds = time.monotonic() - started
    log.info(
        "pushed %d traces, %d feedback in %d batches to %s (%.1fs)",
        result.traces,
        result.feedback,
        result.batches,
        target,
        result.seconds,
    )
    return result


def _send_with_retry(
    sink: Target, batch: SyncBatch, body: bytes, settings: SyncSettings, store: TraceStore, target: str
) -> SyncAck:
    delay = 0.5
    for attempt in range(1, settings.max_attempts + 1):
        _conn(store).execute("UPDATE sync_state SET last_attempt_at = ? WHERE target = ?", [utcnow(), target])
        try:
            return sink.send(batch, body)
        except UnavailableError as exc:
            _conn(store).execute(
                "UPDATE sync_state SET last_error = ? WHERE target = ?", [exc.message, target]
            )
            if attempt == settings.max_attempts:
                raise
            log.warning(
                "batch %s attempt %d failed: %s; retrying in %.1fs", batch.batch_id, attempt, exc, delay
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, settings.backoff_max_s)
        except SlmAgentError as exc:
            _conn(store).execute(
                "UPDATE sync_state SET last_error = ? WHERE target = ?", [exc.message, target]
            )
            raise
    raise AssertionError("unreachable")


# -- background worker ---------------------------------------------------------------------------
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
