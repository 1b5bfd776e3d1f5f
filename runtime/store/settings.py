"""The ``[traces]`` settings: how long traces stay on the device, and in what form."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TraceSettings(BaseModel):
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Delete traces older than this many days (never ones not yet synced); unset keeps them.",
    )
    max_db_mb: float | None = Field(
        None,
        gt=0,
        description="Delete the oldest traces (never ones not yet synced) while the database holds more "
        "than this many MiB; unset means no limit.",
    )
    prune_interval_s: float = Field(
        600.0, gt=0, description="Seconds between the daemon's automatic prunes, run while it is idle."
    )
    store_redacted: bool = Field(
        False,
        description="Keep only redacted text at rest: secrets and personal data in prompts, answers and "
        "feedback are replaced before the row is written.",
    )
