"""Tags: which collected traces belong to a task their device did not name.

A proxied call carries no task; when a discovered task is accepted, the traces it covers are
tagged for it here, beside the traces, so ``train dataset`` finds them at once:

    <root>/tags/<task>.parquet      trace_id, task, signature, tagged_at

One file per task: accepting a task again replaces its tags. Trace files are never rewritten.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from slm_agent.atomic import write_atomic
from slm_agent.contracts.clock import utcnow
from slm_agent.contracts.tasks import TASK_NAME_RE
from slm_agent.errors import BadRequestError

TAGS_DIR = "tags"
TAG_SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("signature", pa.string()),
        pa.field("tagged_at", pa.string()),
    ]
)


def _root(data_url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(data_url)
    return fs, f"{root.rstrip('/')}/{TAGS_DIR}"


def write_tags(data_url: str, task: str, trace_ids: Sequence[str], *, signature: str | None = None) -> str:
    """Tag ``trace_ids`` for ``task`` (replacing the task's earlier tags); returns the file written."""
    if not TASK_NAME_RE.match(task):
        raise BadRequestError(f"invalid task name {task!r}", param="task")
    fs, folder = _root(data_url)
    ids = list(dict.fromkeys(trace_ids))
    now = utcnow()
    table = pa.table(
        {
            "trace_id": ids,
            "task": [task] * len(ids),
            "signature": [signature] * len(ids),
            "tagged_at": [now] * len(ids),
        },
        schema=TAG_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    path = f"{folder}/{task}.parquet"
    if isinstance(fs, LocalFileSystem):
        write_atomic(Path(path), sink.getvalue().to_pybytes(), tmp_prefix=".tags-")
    else:
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(path, sink.getvalue().to_pybytes())  # object stores make a PUT visible whole
    return path


def remove_tags(data_url: str, task: str) -> None:
    fs, folder = _root(data_url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(f"{folder}/{task}.parquet")


def read_tags(data_url: str, task: str | None = None) -> dict[str, list[str]]:
    """Trace id -> the tasks it is tagged for (only ``task``'s tags when given)."""
    fs, folder = _root(data_url)
    files = sorted(fs.glob(f"{folder}/*.parquet"))
    if task is not None:
        files = [f for f in files if f.rsplit("/", 1)[-1] == f"{task}.parquet"]
    if not files:
        return {}
    rows = ds.dataset(files, filesystem=fs, format="parquet", schema=TAG_SCHEMA).to_table(
        columns=["trace_id", "task"]
    )
    tags: dict[str, list[str]] = {}
    for trace_id, name in zip(
        rows.column("trace_id").to_pylist(), rows.column("task").to_pylist(), strict=True
    ):
        if name not in tags.setdefault(trace_id, []):
            tags[trace_id].append(name)
    return tags
