"""Partitioned Parquet under a directory or any fsspec URL, readable as-is by DuckDB/pandas/Spark.

    <root>/traces/day=YYYY-MM-DD/device=<id>/part-<batch id>.parquet
    <root>/feedback/day=YYYY-MM-DD/device=<id>/part-<batch id>.parquet

A file's name is its batch id, so writing a batch again replaces its files instead of adding
rows, and reconciliation can tell which batch every file belongs to.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from slm_agent.atomic import write_atomic
from slm_agent.contracts.records import JSON_COLUMNS, FeedbackRecord, TraceRecord
from slm_agent.errors import StorageFullError

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

_PY_TO_ARROW = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _arrow_type(name: str, model: type[Any]) -> pa.DataType:
    if name in JSON_COLUMNS:
        return pa.string()  # JSON text: every reader gets it, DuckDB's json functions parse it
    annotation = str(model.model_fields[name].annotation)
    for key in ("bool", "float", "int", "str"):
        if key in annotation:
            return _PY_TO_ARROW[key]
    return pa.string()


def _schema(model: type[Any]) -> pa.Schema:
    fields = [pa.field(name, _arrow_type(name, model)) for name in model.model_fields]
    # Partition keys (day, device) live in the path only: a column of the same name would clash.
    fields += [pa.field("store_id", pa.string()), pa.field("batch_id", pa.string())]
    return pa.schema(fields)


TRACE_SCHEMA = _schema(TraceRecord)
FEEDBACK_SCHEMA = _schema(FeedbackRecord)


def _table(rows: Sequence[Any], schema: pa.Schema, store_id: str, batch_id: str) -> pa.Table:
    columns: dict[str, list[Any]] = {}
    for field in schema:
        name = field.name
        if name == "store_id":
            columns[name] = [store_id] * len(rows)
        elif name == "batch_id":
            columns[name] = [batch_id] * len(rows)
        elif name in JSON_COLUMNS:
            columns[name] = [
                None if (v := getattr(r, name)) is None else json.dumps(v, ensure_ascii=False) for r in rows
            ]
        else:
            columns[name] = [getattr(r, name) for r in rows]
    return pa.table(columns, schema=schema)


class TraceStorage:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def part_path(self, kind: str, day: str, device_id: str, batch_id: str) -> str:
        return f"{self.root}/{kind}/day={day}/device={device_id}/part-{batch_id}.parquet"

    def write_batch(
        self,
        batch_id: str,
        device_id: str,
        store_id: str,
        traces: Sequence[TraceRecord],
        feedback: Sequence[FeedbackRecord],
    ) -> list[str]:
        """Write one file per (kind, day); on any failure remove what was written and raise."""
        written: list[str] = []
        try:
            for kind, rows, schema in (
                ("traces", traces, TRACE_SCHEMA),
                ("feedback", feedback, FEEDBACK_SCHEMA),
            ):
                by_day: dict[str, list[Any]] = defaultdict(list)
                for row in rows:
                    by_day[row.created_at[:10]].append(row)
                for day, day_rows in sorted(by_day.items()):
                    path = self.part_path(kind, day, device_id, batch_id)
                    self._put(path, _table(day_rows, schema, store_id, batch_id))
                    written.append(path)
        except BaseException as exc:
            self.remove(written)
            if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
                raise StorageFullError(
                    f"no room to store batch {batch_id} under {self.url} ({exc.strerror}); nothing was "
                    "acknowledged: free space and the device will resend it"
                ) from exc
            raise
        return written

    def _put(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        if not self.local:
            self.fs.pipe_file(path, data)  # object stores make a PUT visible whole or not at all
            return
        write_atomic(Path(path), data, tmp_prefix=".part-")

    def remove(self, paths: Sequence[str]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(path)

    def parts(self) -> dict[str, list[str]]:
        """Every stored part file, by the batch id in its name."""
        found: dict[str, list[str]] = defaultdict(list)
        for kind in ("traces", "feedback"):
            for path in self.fs.glob(f"{self.root}/{kind}/day=*/device=*/part-*.parquet"):
                name = path.rsplit("/", 1)[-1]
                found[name.removeprefix("part-").removesuffix(".parquet")].append(path)
        return found

    def leftovers(self) -> list[str]:
        """Temp files of writes a crash interrupted."""
        return [
            p
            for kind in ("traces", "feedback")
            for p in self.fs.glob(f"{self.root}/{kind}/day=*/device=*/.part-*.tmp")
        ]
