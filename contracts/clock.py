"""Ids and times as every part of slm-agent writes them: time-ordered ids, UTC ISO-8601 strings."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime


def new_id(prefix: str = "tr") -> str:
    """Time-ordered id: hex milliseconds then randomness, so ids sort like creation time."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(epoch: float) -> str:
    """A Unix time as the stored form (UTC ISO-8601, milliseconds, ``Z``)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(stamp: str) -> float:
    """The stored form back to a Unix time."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
