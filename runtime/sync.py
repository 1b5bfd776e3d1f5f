"""Sync: device traces to the training box, adapters back to the device.

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
import gzip
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, Field

from slm_agent.atomic import write_atomic
from slm_agent.errors import (
    AuthenticationError,
    BadRequestError,
    ModelStoreError,
    SlmAgentError,
    StorageFullError,
    UnavailableError,
)
from slm_agent.runtime.traces import FeedbackRecord, TraceRecord, TraceStore, utcnow

log = logging.getLogger(__name__)

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
BATCH_SUFFIX = ".json.gz"
SCHEMA_VERSION = 1
CHECKSUM_HEADER = "X-Content-SHA256"


# -- settings and wire types (the collector imports the same ones) --------------------------------
class SyncSettings(BaseModel):
    enabled: bool = Field(False, description="Push traces in the background while slm-agentd runs.")
    target: str | None = Field(
        None, description="Collector URL (https://collector:8780) or a directory the collector imports."
    )
    interval_s: float = Field(300.0, gt=0, description="Seconds between background pushes.")
    batch_size: int = Field(500, ge=1, le=20_000, description="Traces (and feedback rows) per batch.")
    token_env: str = Field(
        "SLM_AGENT_SYNC_TOKEN", description="Environment variable holding this device's collector token."
    )
    device_id: str | None = Field(
        None,
        pattern=DEVICE_ID_PATTERN,
        description="This device's id at the collector; default: one generated and kept in the trace DB.",
    )
    timeout_s: float = Field(30.0, gt=0, description="HTTP timeout of one batch.")
    max_attempts: int = Field(
        5, ge=1, description="Tries per batch before a push gives up (backoff between)."
    )
    backoff_max_s: float = Field(300.0, gt=0, description="Longest wait between background retries.")
    lock_timeout_s: float = Field(120.0, ge=0, description="How long a push waits for another one to finish.")


class SyncBatch(BaseModel):
    """One batch as sent: rows with seq in (``*_from``, ``*_to``], minus opted-out tasks."""

    batch_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    store_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    schema_version: int = SCHEMA_VERSION
    trace_from: int = Field(ge=0)
    trace_to: int = Field(ge=0)
    feedback_from: int = Field(ge=0)
    feedback_to: int = Field(ge=0)
    traces: list[TraceRecord] = Field(default_factory=list)
    feedback: list[FeedbackRecord] = Field(default_factory=list)


class SyncAck(BaseModel):
    batch_id: str
    trace_seq: int = Field(description="Highest trace seq of this store the collector holds.")
    feedback_seq: int = Field(description="Highest feedback seq of this store the collector holds.")
    written: int = Field(0, description="Rows this request wrote (0 when the batch was already stored).")
    duplicate: bool = False


class PublishedAdapter(BaseModel):
    """Manifest of an adapter the training box publishes for devices to pull."""

    name: str
    file: str
    sha256: str
    size: int
    architecture: str | None = None
    base_sha256: str | None = Field(None, description="sha256 of the base GGUF it was trained on.")
    tasks: list[str] = Field(default_factory=list)
    created_at: str = Field(default_factory=utcnow)


class AdapterListing(BaseModel):
    adapters: list[PublishedAdapter]


class PushResult(BaseModel):
    target: str
    batches: int = 0
    traces: int = 0
    feedback: int = 0
    skipped: int = Field(0, description="Traces of opted-out tasks, never sent.")
    duplicates: int = Field(0, description="Batches the target already held (retries after a crash).")
    trace_seq: int = 0
    feedback_seq: int = 0
    pending_traces: int = 0
    seconds: float = 0.0


# -- scrubbing -----------------------------------------------------------------------------------
_SECRET = "[SECRET]"
_SECRET_KEYS = re.compile(
    r"^(authorization|proxy-authorization|x-api-key|api[-_]?key|apikey|access[-_]?token|refresh[-_]?token|"
    r"id[-_]?token|token|secret|client[-_]?secret|password|passwd|cookie|set-cookie|private[-_]?key)$",
    re.IGNORECASE,
)
# (pattern, keeps its first group): a key or header name stays readable, its value goes.
_SECRET_PATTERNS: list[tuple[re.Pattern[str], bool]] = [
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL
        ),
        False,
    ),
    (re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*)[^\r\n\"']+"), True),
    (re.compile(r"(?i)\b((?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}"), True),
    (
        re.compile(
            r"(?i)\b((?:api[-_ ]?key|access[-_ ]?key|secret(?:[-_ ]?key)?|password|passwd|token)"
            r"[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',;]{4,}"
        ),
        True,
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), False),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), False),
    (re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"), False),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), False),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"), False),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), False),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), False),
]


# One pass to find out whether any pattern can match: most strings hold no secret at all.
_ANY_SECRET = re.compile(
    "|".join(
        f"(?i:{p.pattern.removeprefix('(?i)')})" if p.pattern.startswith("(?i)") else f"(?:{p.pattern})"
        for p, _ in _SECRET_PATTERNS
    ),
    re.DOTALL,
)


def scrub_secrets(value: Any) -> Any:
    """Replace credentials anywhere in a JSON-like value: by key name, and by shape in text."""
    if isinstance(value, str):
        if not _ANY_SECRET.search(value):
            return value
        for pattern, keeps_name in _SECRET_PATTERNS:
            value = pattern.sub(
                (lambda m: m.group(1) + _SECRET) if keeps_name else (lambda m: _SECRET), value
            )
        return value
    if isinstance(value, dict):
        return {
            k: (
                _SECRET
                if isinstance(k, str) and _SECRET_KEYS.match(k) and v is not None
                else scrub_secrets(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


# Identifiers and times carry no personal data and must survive unchanged (they are the join keys).
_KEEP_FIELDS = {"id", "seq", "trace_id", "created_at"}


class Sanitizer:
    """Redactor (personal data) then secret scrubber over every field; the mapping is dropped."""

    def __init__(self) -> None:
        try:
            from slm_agent.runtime.redact import Redactor
        except ImportError as exc:
            # Never ship unredacted traces: without the redactor, sync refuses to run.
            raise UnavailableError(
                "the redactor (slm_agent.runtime.redact) is not available: sync refuses to send "
                "unredacted traces; reinstall slm-agent",
                code="redactor_missing",
            ) from exc
        self._redactor = Redactor()

    def clean(self, row: dict[str, Any]) -> dict[str, Any]:
        # One mapping per row: the same e-mail in request and response gets the same placeholder,
        # which training needs; the mapping itself dies with this call.
        mapping: dict[str, str] = {}
        out: dict[str, Any] = {}
        for name, value in row.items():
            if name in _KEEP_FIELDS or value is None or isinstance(value, bool | int | float):
                out[name] = value
                continue
            value = scrub_secrets(value)
            if isinstance(value, str):
                value = self._redactor.redact(value, mapping).text
            else:
                value = self._redactor.redact_json(value, mapping)[0]
            out[name] = value
        return out


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


def encode_batch(batch: SyncBatch, sanitizer: Sanitizer) -> bytes:
    """The bytes that leave the device: sanitized rows, validated again, JSON, gzip."""
    body = batch.model_dump(mode="json", exclude={"traces", "feedback"})
    body["traces"] = [
        TraceRecord.model_validate(sanitizer.clean(t.model_dump(mode="json"))).model_dump(mode="json")
        for t in batch.traces
    ]
    body["feedback"] = [
        FeedbackRecord.model_validate(sanitizer.clean(f.model_dump(mode="json"))).model_dump(mode="json")
        for f in batch.feedback
    ]
    return gzip.compress(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), compresslevel=3
    )


def decode_batch(body: bytes) -> SyncBatch:
    """Inverse of :func:`encode_batch`; a truncated or corrupt body raises BadRequestError."""
    try:
        raw = gzip.decompress(body)
    except (OSError, EOFError) as exc:
        raise BadRequestError(
            f"batch body is not complete gzip data ({exc}): resend it", code="corrupt_batch"
        ) from exc
    try:
        return SyncBatch.model_validate_json(raw)
    except ValueError as exc:
        raise BadRequestError(f"batch is not a valid SyncBatch: {exc}", code="invalid_batch") from exc


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
    pause_s: float = 0.0,
) -> PushResult:
    """Send every trace and feedback row past the target's cursor, batch by batch.

    Each batch is retried with backoff (``settings.max_attempts``); the cursor moves only on an
    acknowledgement, so stopping at any moment loses nothing and repeats nothing.
    """
    target = target or settings.target
    if not target:
        raise BadRequestError("no sync target: pass --to URL|DIR or set [sync] target in the config")
    target = normalize_target(target)
    with _push_lock(store, settings.lock_timeout_s):
        return _push_locked(
            store, settings, target, on_progress, excluded_tasks, max_batches, client, pause_s
        )


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
    pause_s: float,
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
            if pause_s:
                time.sleep(pause_s)
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
    """Pushes in a daemon thread on its own SQLite connection, in small batches with pauses.

    Failures back off exponentially (up to ``backoff_max_s``); the daemon never waits on it.
    """

    def __init__(
        self,
        settings: SyncSettings,
        db_path: Path,
        *,
        excluded_tasks: Callable[[], Collection[str]] | Collection[str] = frozenset(),
        pause_s: float = 0.05,
    ) -> None:
        self.settings = settings
        self.db_path = Path(db_path)
        self._excluded = excluded_tasks
        self.pause_s = pause_s
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
                        pause_s=self.pause_s,
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


# -- pull ----------------------------------------------------------------------------------------
class PullResult(BaseModel):
    installed: list[str] = Field(default_factory=list)
    unchanged: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict, description="name -> why")
    loaded: list[str] = Field(default_factory=list, description="Installed adapters the daemon hot-loaded.")
    daemon_running: bool = False


def list_published(
    source: str, settings: SyncSettings, client: httpx.Client | None = None
) -> list[PublishedAdapter]:
    if is_url(source):
        target = HttpTarget(source, device_token(settings), settings.timeout_s, client)
        try:
            return AdapterListing.model_validate_json(target.get("/v1/adapters").content).adapters
        finally:
            target.close()
    return scan_publish_dir(Path(source).expanduser())


def scan_publish_dir(root: Path) -> list[PublishedAdapter]:
    """Adapters laid out as ``<root>/<name>/manifest.json`` next to their GGUF."""
    adapters = []
    for path in sorted(root.glob("*/manifest.json")):
        try:
            adapters.append(PublishedAdapter.model_validate_json(path.read_text()))
        except ValueError as exc:
            log.warning("skipping unreadable adapter manifest %s: %s", path, exc)
    return adapters


def _fetch(
    source: str, adapter: PublishedAdapter, dest: Path, settings: SyncSettings, client: httpx.Client | None
) -> None:
    """Copy the adapter file to ``dest``, checking its sha256 on the way."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in _chunks(source, adapter, settings, client):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != adapter.sha256:
        raise ModelStoreError(
            f"adapter {adapter.name}: downloaded file has sha256 {digest.hexdigest()[:12]}…, "
            "the manifest says "
            f"{adapter.sha256[:12]}…: refusing it"
        )


def _chunks(
    source: str, adapter: PublishedAdapter, settings: SyncSettings, client: httpx.Client | None
) -> Iterator[bytes]:
    if not is_url(source):
        with (Path(source).expanduser() / adapter.name / adapter.file).open("rb") as fh:
            while block := fh.read(1 << 20):
                yield block
        return
    target = HttpTarget(source, device_token(settings), settings.timeout_s, client)
    try:
        with target.client.stream("GET", f"{target.url}/v1/adapters/{adapter.name}/file") as response:
            if response.status_code >= 400:
                response.read()
                raise_for_response(response, target.url)
            yield from response.iter_bytes(1 << 20)
    except httpx.HTTPError as exc:
        raise UnavailableError(f"collector {source} unreachable: {exc}", code="target_down") from exc
    finally:
        target.close()


def pull(
    source: str,
    settings: SyncSettings,
    model_store: Any,
    base_model: str,
    *,
    daemon_url: str | None = None,
    daemon_token: str | None = None,
    client: httpx.Client | None = None,
) -> PullResult:
    """Install every published adapter that fits ``base_model``; tell a running daemon to load it.

    A rejected artifact (bad checksum, wrong base, name clash) is reported and leaves whatever is
    installed untouched: the store only ever gains whole, checked adapters.
    """
    result = PullResult()
    base = model_store.get(base_model)
    incoming = model_store.root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    for adapter in list_published(source, settings, client):
        try:
            if model_store.has(adapter.name):
                current = model_store.get(adapter.name)
                if current.sha256 == adapter.sha256:
                    result.unchanged.append(adapter.name)
                    continue
                raise ModelStoreError(
                    f"a different {adapter.name!r} is installed: "
                    "published adapters must get a new name per version"
                )
            if adapter.base_sha256 and adapter.base_sha256 != base.sha256:
                raise ModelStoreError(
                    f"{adapter.name} was trained on base {adapter.base_sha256[:12]}…, this device serves "
                    f"{base.name} ({base.sha256[:12]}…)"
                )
            tmp = incoming / f"{adapter.name}.{os.getpid()}.gguf"
            try:
                _fetch(source, adapter, tmp, settings, client)
                model_store.add(
                    tmp,
                    name=adapter.name,
                    base=base.name,
                    tasks=adapter.tasks,
                    origin=f"{source.rstrip('/')}/{adapter.name}",
                    move=True,
                    expected_sha256=adapter.sha256,
                )
            finally:
                tmp.unlink(missing_ok=True)
            result.installed.append(adapter.name)
        except SlmAgentError as exc:
            log.warning("rejected adapter %s: %s", adapter.name, exc.message)
            result.rejected[adapter.name] = exc.message
    if result.installed and daemon_url:
        result.daemon_running, result.loaded = notify_daemon(daemon_url, daemon_token, result.installed)
    return result


def notify_daemon(daemon_url: str, token: str | None, names: list[str]) -> tuple[bool, list[str]]:
    """Ask a running slm-agentd to hot-load adapters; (daemon reachable, names it loaded)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    loaded = []
    with httpx.Client(base_url=daemon_url.rstrip("/"), timeout=60, headers=headers) as client:
        for name in names:
            try:
                response = client.post("/v1/admin/adapters", json={"name": name})
            except httpx.HTTPError:
                return False, loaded
            if response.status_code < 300:
                loaded.append(name)
            else:
                log.warning(
                    "daemon refused to load %s (%s): %s", name, response.status_code, response.text[:200]
                )
    return True, loaded
