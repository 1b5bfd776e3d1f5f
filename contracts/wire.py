"""Sync's settings and the types on the wire: the device, the collector and the training box import the same ones.

A batch travels as gzip'd JSON of :class:`SyncBatch` (:func:`serialize_batch`, :func:`decode_batch`);
the device sanitizes its rows before serializing them (``runtime.sync.push.encode_batch``).
Published adapters lie as ``<publish_dir>/<name>/manifest.json`` next to their GGUF.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from slm_agent.contracts.clock import utcnow
from slm_agent.contracts.records import FeedbackRecord, TraceRecord
from slm_agent.errors import BadRequestError

log = logging.getLogger(__name__)

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
BATCH_SUFFIX = ".json.gz"
SCHEMA_VERSION = 1
CHECKSUM_HEADER = "X-Content-SHA256"
MANIFEST_NAME = "manifest.json"


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
    metrics: dict[str, float] | None = Field(None, description="Held-out test metrics from `train eval`.")
    dataset_sha256: str | None = Field(None, description="The dataset it was trained and tested on.")
    training: dict[str, Any] | None = Field(None, description="The LoRA training config.")
    task_files: dict[str, str] = Field(
        default_factory=dict,
        description="Task name -> its task file (TOML) for the tasks a device cannot know yet: chat-shaped "
        "tasks discovered on the training box. `sync pull` installs one where the device has no file of "
        "that name.",
    )


class AdapterListing(BaseModel):
    adapters: list[PublishedAdapter]


def scan_publish_dir(root: Path) -> list[PublishedAdapter]:
    """Adapters laid out as ``<root>/<name>/manifest.json`` next to their GGUF."""
    adapters = []
    for path in sorted(Path(root).glob(f"*/{MANIFEST_NAME}")):
        try:
            adapters.append(PublishedAdapter.model_validate_json(path.read_text()))
        except ValueError as exc:
            log.warning("skipping unreadable adapter manifest %s: %s", path, exc)
    return adapters


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


class PullResult(BaseModel):
    installed: list[str] = Field(default_factory=list)
    tasks_installed: list[str] = Field(
        default_factory=list, description="Task files written to the tasks dir (none is ever overwritten)."
    )
    unchanged: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict, description="name -> why")
    loaded: list[str] = Field(default_factory=list, description="Installed adapters the daemon hot-loaded.")
    daemon_running: bool = False


def serialize_batch(batch: SyncBatch) -> bytes:
    """The bytes of a batch on the wire: JSON, gzip. Rows must have been sanitized already."""
    return gzip.compress(
        json.dumps(batch.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")).encode(),
        compresslevel=3,
    )


def decode_batch(body: bytes) -> SyncBatch:
    """Inverse of :func:`serialize_batch`; a truncated or corrupt body raises BadRequestError."""
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
