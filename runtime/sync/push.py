"""Push: device traces to the training box, exactly once (pulling adapters back: ``pull``).

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
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Iterator

import httpx

from slm_agent.contracts.records import FeedbackRecord, TraceRecord, decode_row
from slm_agent.contracts.wire import PushResult, SyncAck, SyncBatch, SyncSettings, serialize_batch
from slm_agent.errors import BadRequestError, SlmAgentError, UnavailableError
from slm_agent.permissions import open_private
from slm_agent.privacy.scrub import Sanitizer
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.state import (
    SyncState,
    backlog,
    connection,
    read_state,
    record_acknowledged,
    record_attempt,
    record_error,
    record_pending,
    store_ids,
)
from slm_agent.runtime.sync.targets import Target, normalize_target, open_target

log = logging.getLogger(__name__)

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
    with os.fdopen(open_private(path, "a"), "a") as fh:
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
            record_acknowledged(store, target, batch)
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
        record_attempt(store, target)
        try:
            return sink.send(batch, body)
        except UnavailableError as exc:
            record_error(store, target, exc.message)
            if attempt == settings.max_attempts:
                raise
            log.warning(
                "batch %s attempt %d failed: %s; retrying in %.1fs", batch.batch_id, attempt, exc, delay
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, settings.backoff_max_s)
        except SlmAgentError as exc:
            record_error(store, target, exc.message)
            raise
    raise AssertionError("unreachable")


def encode_batch(batch: SyncBatch, sanitizer: Sanitizer) -> bytes:
    """The bytes that leave the device: sanitized rows, validated again, then the wire format."""
    clean = batch.model_copy(
        update={
            "traces": [
                TraceRecord.model_validate(sanitizer.clean(t.model_dump(mode="json"))) for t in batch.traces
            ],
            "feedback": [
                FeedbackRecord.model_validate(sanitizer.clean(f.model_dump(mode="json")))
                for f in batch.feedback
            ],
        }
    )
    return serialize_batch(clean)


def _build_batch(
    store: TraceStore,
    state: SyncState,
    device_id: str,
    store_id: str,
    batch_size: int,
    excluded: Collection[str],
) -> tuple[SyncBatch, int] | None:
    """The next batch (the pending one again after a crash) and the number of opted-out traces."""
    conn = connection(store)
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
        record_pending(store, state.target, t_to, f_to)
    trace_rows = conn.execute(
        "SELECT * FROM traces WHERE seq > ? AND seq <= ? ORDER BY seq", [t_from, t_to]
    ).fetchall()
    fb_rows = conn.execute(
        "SELECT f.*, t.task AS _task FROM feedback f LEFT JOIN traces t ON t.id = f.trace_id "
        "WHERE f.seq > ? AND f.seq <= ? ORDER BY f.seq",
        [f_from, f_to],
    ).fetchall()
    traces = [
        TraceRecord.model_validate(decode_row(dict(r))) for r in trace_rows if r["task"] not in excluded
    ]
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
