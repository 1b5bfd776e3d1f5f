"""The conversion report's boundary types, shared by the CLI, ``GET /v1/report`` and the TUI.

The headline is a computed field: it is always the sentence the figures say, in JSON as on screen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, computed_field

Granularity = Literal["hour", "day"]
PriceSource = Literal["observed", "settings", "default"]


class Bucket(BaseModel):
    """Calls in one hour or day (UTC), and how many of them were answered locally."""

    start: str
    calls: int = 0
    local: int = 0

    @property
    def local_share(self) -> float | None:
        return self.local / self.calls if self.calls else None


class Price(BaseModel):
    """What the remote charges per million tokens, and where that figure came from."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    source: PriceSource = Field(
        description="observed: the task's own remote calls; settings: the provider's configured price; "
        "default: neither was known, a typical large-model price."
    )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1_000_000


class TaskConversion(BaseModel):
    """One task's row: how much of its traffic moved to the device, and how well it agrees."""

    task: str | None = Field(description="None: the calls matched to no task.")
    state: str = Field(
        description="shadow, live, demoted or proxied (from task_states); 'unmatched' for the no-task row."
    )
    adapter: str | None = None
    calls: int
    local: int = Field(description="Calls answered locally without an error.")
    share: float = Field(description="This task's calls over all calls in the period.")
    local_share: float | None = Field(description="Of this task's calls, the share answered locally.")
    pairs: int = Field(0, description="Scored shadow pairs of the current adapter in the period.")
    agreed: int = 0
    agreement: float | None = None
    agreement_lower: float | None = Field(
        None, description="Wilson lower bound of agreement (one-sided 95 %, as promotion uses)."
    )
    local_p50_ms: float | None = None
    remote_p50_ms: float | None = None
    tokens_saved: int = Field(0, description="Prompt + completion tokens of local answers: not sent remote.")
    cost_saved_usd: float = 0.0
    price: Price
    buckets: list[Bucket] = Field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return speedup(self.local_p50_ms, self.remote_p50_ms)


class ConversionReport(BaseModel):
    since: str = Field(description="Period start (UTC ISO-8601); the first trace when not asked.")
    until: str
    granularity: Granularity
    calls: int
    local: int
    agreement: float | None = Field(
        description="Agreement with the remote, weighted by each task's local calls: what local answers are worth."
    )
    local_p50_ms: float | None = Field(description="p50 of local answers of tasks answered locally.")
    remote_p50_ms: float | None = Field(description="p50 of remote answers of those same tasks.")
    tokens_saved: int
    cost_saved_usd: float
    tasks: list[TaskConversion]
    buckets: list[Bucket]

    @property
    def local_share(self) -> float | None:
        return self.local / self.calls if self.calls else None

    @property
    def speedup(self) -> float | None:
        return speedup(self.local_p50_ms, self.remote_p50_ms)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def headline(self) -> str:
        """The one sentence: share answered locally, agreement, speed-up, saving, since when."""
        faster = "n/a" if self.speedup is None else f"{self.speedup:.1f}×"
        return (
            f"{percent(self.local_share)} of calls answered locally at {percent(self.agreement)} agreement "
            f"with the remote, {faster} faster, {dollars(self.cost_saved_usd)} saved since {self.since[:10]}"
        )


def speedup(local_ms: float | None, remote_ms: float | None) -> float | None:
    if not local_ms or remote_ms is None:
        return None
    return remote_ms / local_ms


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f} %"


def dollars(value: float) -> str:
    # Cents hide a saving of a few hundred small local answers; show four places below a cent.
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"
