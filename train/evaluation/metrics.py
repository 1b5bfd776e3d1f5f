"""Aggregate per-example scores into a candidate's metrics on one task's eval set.

How one answer is scored lives in the shared layer (contracts/scoring.py): the daemon's shadow
mode scores local answers against the remote's with the same functions.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from slm_agent.contracts.scoring import ExampleScore


class TaskMetrics(BaseModel):
    """One candidate's scores on one task's eval set."""

    n: int = Field(description="Examples scored.")
    valid_rate: float = Field(description="Share of answers that keep the task's contract.")
    exact_match: float = Field(description="Share of answers equal to the reference.")
    f1: float = Field(description="Mean per-example F1.")
    primary: float = Field(description="The figure candidates are ranked by: the exact-match rate.")
    latency_ms_p50: float | None = Field(None, description="Median answer latency; None when not measured.")
    latency_ms_p95: float | None = Field(None, description="95th-percentile answer latency.")


def aggregate(scores: list[ExampleScore], latencies_ms: list[float] | None = None) -> TaskMetrics:
    exact = _mean([float(s.exact) for s in scores])
    p50, p95 = np.percentile(latencies_ms, [50, 95]).tolist() if latencies_ms else (None, None)
    return TaskMetrics(
        n=len(scores),
        valid_rate=_mean([float(s.valid) for s in scores]),
        exact_match=exact,
        f1=_mean([s.f1 for s in scores]),
        primary=exact,
        latency_ms_p50=p50,
        latency_ms_p95=p95,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
