"""Exactly-once ingest of device batches, shared by the HTTP app and ``collector import``.

Order of events for a new batch: Parquet files durable → catalogue row + cursor committed →
acknowledgement. A crash before the commit leaves files with no catalogue row; ``reconcile``
removes them at start and the device, never having been acknowledged, sends the batch again.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, Field

from slm_agent.collector.catalogue import BatchRecord, Catalogue
from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.clock import utcnow
from slm_agent.contracts.wire import BATCH_SUFFIX, SyncAck, SyncBatch, decode_batch
from slm_agent.errors import BadRequestError, SlmAgentError, StorageFullError

log = logging.getLogger(__name__)


class ImportResult(BaseModel):
    files: int = 0
    batches: int = 0
    duplicates: int = 0
    traces: int = 0
    rejected: dict[str, str] = Field(default_factory=dict)


class Collector:
    def __init__(self, storage: TraceStorage, catalogue: Catalogue) -> None:
        self.storage = storage
        self.catalogue = catalogue
        # One writer per store stream: two copies of one batch racing must not both write.
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def reconcile(self) -> tuple[int, int]:
        """Remove part files no catalogue row owns, and temp files; returns (orphans, temps)."""
        known = self.catalogue.batch_ids()
        orphans = [
            p for batch_id, paths in self.storage.parts().items() if batch_id not in known for p in paths
        ]
        temps = self.storage.leftovers()
        self.storage.remove(orphans + temps)
        if orphans or temps:
            log.warning(
                "reconciled storage: removed %d unacknowledged part files and %d temp files "
                "(their devices will resend them)",
                len(orphans),
                len(temps),
            )
        return len(orphans), len(temps)

    def _lock_for(self, batch: SyncBatch) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(batch.device_id, batch.store_id)]

    def ingest(self, batch: SyncBatch) -> SyncAck:
        _check_ranges(batch)
        with self._lock_for(batch):
            if self.catalogue.batch(batch.batch_id) is not None:
                cursor = self.catalogue.cursor(batch.device_id, batch.store_id)
                return SyncAck(
                    batch_id=batch.batch_id,
                    trace_seq=cursor.trace_seq,
                    feedback_seq=cursor.feedback_seq,
                    duplicate=True,
                )
            cursor = self.catalogue.cursor(batch.device_id, batch.store_id)
            # Rows at or below the cursor arrived in an earlier batch (one cut differently, e.g.
            # after the device changed its batch size): keep the stored copy, skip these.
            traces = [t for t in batch.traces if t.seq is not None and t.seq > cursor.trace_seq]
            feedback = [f for f in batch.feedback if f.seq is not None and f.seq > cursor.feedback_seq]
            files = self.storage.write_batch(
                batch.batch_id, batch.device_id, batch.store_id, traces, feedback
            )
            record = BatchRecord(
                batch_id=batch.batch_id,
                device_id=batch.device_id,
                store_id=batch.store_id,
                trace_from=batch.trace_from,
                trace_to=batch.trace_to,
                feedback_from=batch.feedback_from,
                feedback_to=batch.feedback_to,
                traces=len(traces),
                feedback=len(feedback),
                files=files,
                received_at=utcnow(),
            )
            try:
                cursor = self.catalogue.record(record)
            except BaseException as exc:
                self.storage.remove(files)
                if "full" in str(exc).lower():
                    raise StorageFullError(f"catalogue {self.catalogue.path} is out of space: {exc}") from exc
                raise
        return SyncAck(
            batch_id=batch.batch_id,
            trace_seq=cursor.trace_seq,
            feedback_seq=cursor.feedback_seq,
            written=len(traces) + len(feedback),
        )

    def import_dir(self, folder: Path, *, keep: bool = False) -> ImportResult:
        """Ingest the batch files a device wrote to ``folder``; move them to imported/ (or rejected/)."""
        result = ImportResult()
        done_dir, bad_dir = folder / "imported", folder / "rejected"
        # Names sort by device, store and sequence: each store's batches arrive in order.
        for path in sorted(folder.glob(f"*{BATCH_SUFFIX}")):
            result.files += 1
            try:
                batch = decode_batch(path.read_bytes())
                if path.name != f"{batch.batch_id}{BATCH_SUFFIX}":
                    raise BadRequestError(f"file name does not match its batch id {batch.batch_id}")
                self.catalogue.ensure_device(batch.device_id)
                ack = self.ingest(batch)
            except StorageFullError:
                raise  # stop: later files must not overtake this one
            except SlmAgentError as exc:
                log.warning("rejected %s: %s", path.name, exc.message)
                result.rejected[path.name] = exc.message
                bad_dir.mkdir(exist_ok=True)
                shutil.move(path, bad_dir / path.name)
                continue
            result.batches += 1
            result.duplicates += int(ack.duplicate)
            result.traces += ack.written
            if not keep:
                done_dir.mkdir(exist_ok=True)
                shutil.move(path, done_dir / path.name)
        return result


def _check_ranges(batch: SyncBatch) -> None:
    if batch.trace_to < batch.trace_from or batch.feedback_to < batch.feedback_from:
        raise BadRequestError(f"batch {batch.batch_id} has an empty or reversed range", code="invalid_batch")
    for trace in batch.traces:
        if trace.seq is None or not batch.trace_from < trace.seq <= batch.trace_to:
            raise BadRequestError(
                f"trace {trace.id} seq {trace.seq} outside the batch range", code="invalid_batch"
            )
    for fb in batch.feedback:
        if fb.seq is None or not batch.feedback_from < fb.seq <= batch.feedback_to:
            raise BadRequestError(f"feedback seq {fb.seq} outside the batch range", code="invalid_batch")
