"""What shadow mode stores and reports: a task's state, one scored pair, a pair tally.

The rows of the trace database's ``task_states``, ``task_transitions`` and ``shadow_pairs``
tables (migration m003), as the HTTP API, the CLI, the TUI and the report read them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from slm_agent.contracts.clock import utcnow
from slm_agent.runtime.shadow.gate import Gate
from slm_agent.runtime.shadow.stats import Z_ONE_SIDED_95, wilson_bounds

# proxied: no adapter yet, the remote answers. shadow: the remote answers, the adapter is compared
# in the background. live: the adapter answers what its gate allows. demoted: was live, drifted;
# behaves as shadow until it earns promotion again.
StateName = Literal["proxied", "shadow", "live", "demoted"]
STATE_NAMES: tuple[StateName, ...] = ("proxied", "shadow", "live", "demoted")


class TaskState(BaseModel):
    task: str
    adapter: str | None = None
    state: StateName = "proxied"
    reason: str = "no adapter yet"
    changed_at: str | None = Field(None, description="When it entered this state; None: never stored.")
    gate: Gate | None = Field(None, description="live: which requests the adapter may answer.")

    @property
    def answers_locally(self) -> bool:
        return self.state == "live"


class Transition(BaseModel):
    seq: int | None = None
    task: str
    adapter: str | None
    from_state: str | None
    to_state: str
    reason: str
    at: str


class PairRecord(BaseModel):
    """One request answered by both sides, scored with the task's metric."""

    seq: int | None = None
    trace_id: str
    task: str
    adapter: str | None = None
    created_at: str = Field(default_factory=utcnow)
    kind: str
    agreed: bool | None = Field(description="None: the pair could not be judged (text, unparsable remote).")
    score: float = 0.0
    local_output: dict[str, Any] | None = Field(None, description="The local assistant message.")
    remote_output: dict[str, Any] | None = Field(None, description="The remote assistant message.")
    features: list[float] = Field(default_factory=list, description="The gate's features of the answer.")
    local_ms: float | None = None
    remote_ms: float | None = None
    error: str | None = Field(None, description="Why the local side gave no answer (counts as disagreeing).")


class PairStats(BaseModel):
    """Agreement of a task's adapter with the remote, overall and over the recent window."""

    task: str
    adapter: str | None
    n: int = Field(description="Judged pairs since the task entered its state.")
    agreed: int
    rate: float | None
    lower: float = Field(description="Wilson lower bound of the rate (one-sided 95 %).")
    upper: float = Field(description="Wilson upper bound of the rate.")
    recent_n: int = Field(description="Pairs in the recent window (at most the task's drift_window).")
    recent_agreed: int
    recent_upper: float = Field(description="Wilson upper bound over the recent window.")

    @property
    def recent_rate(self) -> float | None:
        return self.recent_agreed / self.recent_n if self.recent_n else None

    @classmethod
    def of(cls, task: str, adapter: str | None, verdicts: list[bool], window: int) -> PairStats:
        """The tally of ``verdicts`` (oldest first); the recent window is the last ``window``."""
        n, agreed = len(verdicts), sum(verdicts)
        recent = verdicts[-window:] if window > 0 else []
        lower, upper = wilson_bounds(agreed, n, Z_ONE_SIDED_95)
        return cls(
            task=task,
            adapter=adapter,
            n=n,
            agreed=agreed,
            rate=agreed / n if n else None,
            lower=lower,
            upper=upper,
            recent_n=len(recent),
            recent_agreed=sum(recent),
            recent_upper=wilson_bounds(sum(recent), len(recent), Z_ONE_SIDED_95)[1],
        )


class TaskStateView(TaskState):
    """A task's state with the tally that decides its next move (``GET /v1/admin/task-states``)."""

    stats: PairStats | None = Field(None, description="None while the task has no adapter.")
