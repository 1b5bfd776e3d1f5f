"""The collector's catalogue: devices (hashed tokens), stored batches and per-store cursors.

A batch is recorded only after its Parquet files are durable, in the same transaction that moves
its store's cursor: the catalogue row is the commit point of exactly-once delivery.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from pathlib import Path

from pydantic import BaseModel

from slm_agent.contracts.clock import utcnow
from slm_agent.permissions import private_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT UNIQUE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT
);
CREATE TABLE IF NOT EXISTS streams (
    device_id TEXT NOT NULL REFERENCES devices(id),
    store_id TEXT NOT NULL,
    trace_seq INTEGER NOT NULL DEFAULT 0,
    feedback_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, store_id)
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    store_id TEXT NOT NULL,
    trace_from INTEGER NOT NULL,
    trace_to INTEGER NOT NULL,
    feedback_from INTEGER NOT NULL,
    feedback_to INTEGER NOT NULL,
    traces INTEGER NOT NULL,
    feedback INTEGER NOT NULL,
    files TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_batches_device ON batches (device_id, received_at);
"""


def hash_token(token: str) -> str:
    # Tokens are 256 random bits: a plain sha256 is enough, no slow KDF needed.
    return hashlib.sha256(token.encode()).hexdigest()


class Cursor(BaseModel):
    trace_seq: int = 0
    feedback_seq: int = 0


class BatchRecord(BaseModel):
    batch_id: str
    device_id: str
    store_id: str
    trace_from: int
    trace_to: int
    feedback_from: int
    feedback_to: int
    traces: int
    feedback: int
    files: list[str]
    received_at: str


class DeviceRow(BaseModel):
    id: str
    created_at: str
    last_seen_at: str | None
    has_token: bool
    batches: int
    traces: int
    feedback: int


class Catalogue:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_sqlite(self.path)  # device token hashes and the batch ledger: the owner's only
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledgement promises the batch survives a power cut, not just a crash.
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.conn.close()

    # -- devices -------------------------------------------------------------------------------
    def register(self, device_id: str, *, rotate: bool = False) -> str:
        """Create a device (or give it a new token with ``rotate``); returns the token, shown once."""
        token = f"slmdev_{secrets.token_urlsafe(32)}"
        with self._lock:
            exists = self.conn.execute("SELECT 1 FROM devices WHERE id = ?", [device_id]).fetchone()
            if exists and not rotate:
                raise ValueError(f"device {device_id!r} is already registered; use --rotate for a new token")
            self.conn.execute(
                "INSERT INTO devices (id, token_sha256, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET token_sha256 = excluded.token_sha256",
                [device_id, hash_token(token), utcnow()],
            )
        return token

    def ensure_device(self, device_id: str) -> None:
        """A device known only from imported files: no token, it cannot push over HTTP."""
        with self._lock:
            self.conn.execute(
                "INSERT OR IGNORE INTO devices (id, created_at) VALUES (?, ?)", [device_id, utcnow()]
            )

    def device_for_token(self, token: str) -> str | None:
        with self._lock:
            row = self.conn.execute(
                "SELECT id FROM devices WHERE token_sha256 = ?", [hash_token(token)]
            ).fetchone()
        return row["id"] if row else None

    def devices(self) -> list[DeviceRow]:
        with self._lock:
            rows = self.conn.execute(
                """SELECT d.id, d.created_at, d.last_seen_at, d.token_sha256 IS NOT NULL AS has_token,
                          count(b.batch_id) AS batches, coalesce(sum(b.traces), 0) AS traces,
                          coalesce(sum(b.feedback), 0) AS feedback
                   FROM devices d LEFT JOIN batches b ON b.device_id = d.id
                   GROUP BY d.id ORDER BY d.id"""
            ).fetchall()
        return [DeviceRow.model_validate(dict(r)) for r in rows]

    # -- batches and cursors -------------------------------------------------------------------
    def batch(self, batch_id: str) -> BatchRecord | None:
        with self._lock:
            row = self.conn.execute("SELECT * FROM batches WHERE batch_id = ?", [batch_id]).fetchone()
        if row is None:
            return None
        return BatchRecord.model_validate({**dict(row), "files": json.loads(row["files"])})

    def batch_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self.conn.execute("SELECT batch_id FROM batches")}

    def cursor(self, device_id: str, store_id: str) -> Cursor:
        with self._lock:
            row = self.conn.execute(
                "SELECT trace_seq, feedback_seq FROM streams WHERE device_id = ? AND store_id = ?",
                [device_id, store_id],
            ).fetchone()
        return Cursor.model_validate(dict(row)) if row else Cursor()

    def record(self, batch: BatchRecord) -> Cursor:
        """Record a written batch and move its store's cursor, in one transaction."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        batch.batch_id,
                        batch.device_id,
                        batch.store_id,
                        batch.trace_from,
                        batch.trace_to,
                        batch.feedback_from,
                        batch.feedback_to,
                        batch.traces,
                        batch.feedback,
                        json.dumps(batch.files),
                        batch.received_at,
                    ],
                )
                self.conn.execute(
                    """INSERT INTO streams (device_id, store_id, trace_seq, feedback_seq) VALUES (?, ?, ?, ?)
                       ON CONFLICT(device_id, store_id) DO UPDATE SET
                         trace_seq = max(trace_seq, excluded.trace_seq),
                         feedback_seq = max(feedback_seq, excluded.feedback_seq)""",
                    [batch.device_id, batch.store_id, batch.trace_to, batch.feedback_to],
                )
                self.conn.execute(
                    "UPDATE devices SET last_seen_at = ? WHERE id = ?", [batch.received_at, batch.device_id]
                )
                row = self.conn.execute(
                    "SELECT trace_seq, feedback_seq FROM streams WHERE device_id = ? AND store_id = ?",
                    [batch.device_id, batch.store_id],
                ).fetchone()
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return Cursor.model_validate(dict(row))

    def totals(self) -> dict[str, int]:
        with self._lock:
            row = self.conn.execute(
                "SELECT count(*) AS batches, coalesce(sum(traces), 0) AS traces, "
                "coalesce(sum(feedback), 0) AS feedback FROM batches"
            ).fetchone()
            devices = self.conn.execute("SELECT count(*) FROM devices").fetchone()[0]
        return {"devices": devices, **dict(row)}
