"""An agent run at the API boundary: what a client asks for, and the run it gets back."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from slm_agent.contracts.api import RequestBody
from slm_agent.runtime.store.spans import Span


class AgentRunRequest(RequestBody):
    # Limits are strict numbers: lax parsing would read "max_cost_usd": false as a $0 budget.
    goal: str = Field(min_length=1, description="What the run must achieve.")
    tools: list[dict[str, Any]] = Field(default_factory=list, description="The agent's tools (OpenAI shape).")
    max_steps: int = Field(
        8, ge=1, le=64, strict=True, description="Steps run at most; a longer plan is cut."
    )
    max_seconds: float = Field(
        300.0, gt=0, le=86_400, strict=True, description="Wall-clock limit of the whole run."
    )
    max_cost_usd: float | None = Field(
        None, ge=0, strict=True, allow_inf_nan=False, description="Remote spend limit of the run."
    )


class AgentRun(BaseModel):
    id: str
    status: str
    goal: str
    answer: str | None = None
    pending_tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    cost_usd: float = 0.0
    error: str | None = None
    spans: list[Span] = Field(default_factory=list)
