"""Where a request is answered: on the device or by a remote LLM, and why.

The decision is made twice at most. ``decide`` runs before generation on ``RequestFeatures`` (what
the request is, what policy says, whether a remote is reachable). ``review`` runs after a local
answer, with what ``validate_local_answer`` and ``confidence`` found, and may escalate it.

``Router`` is the seam: ``RuleRouter`` implements it with the rules below; a learned router (an
ONNX classifier over the same features) can replace it without touching the callers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from slm_agent.contracts.planning import is_planning_request

__all__ = [
    "RequestFeatures",
    "RouteDecision",
    "Router",
    "RuleRouter",
    "confidence",
    "is_planning_request",
]

# promoted: a matched task's adapter answers for the remote (shadow mode earned it); gate: that
# task is live, but this request's answer was predicted to disagree, so the remote answers it.
RouteReason = Literal[
    "policy", "proxy", "planning", "validation", "confidence", "offline", "promoted", "gate", "busy"
]


class RequestFeatures(BaseModel):
    model: str = Field(description="Model id the agent asked for.")
    served_locally: bool = Field(description="The id names the local base model, an adapter or a task.")
    task: str | None = Field(None, description="The matched local task, if any.")
    task_routing: Literal["local", "remote", "auto"] | None = Field(
        None, description="The task's routing policy."
    )
    route_header: Literal["local", "remote"] | None = Field(
        None, description="The agent's per-request override."
    )
    is_planner: bool = Field(False, description="is_planning_request() said so.")
    has_tools: bool = False
    n_tools: int = 0
    matching_local_task: bool = Field(False, description="A local task covers this request.")
    prompt_tokens: int | None = None
    remote_available: bool = Field(False, description="A remote provider would take the call now.")


class RouteDecision(BaseModel):
    route: Literal["local", "remote"]
    reason: RouteReason
    score: float | None = Field(None, description="The learned router's probability, or the confidence.")
    detail: str = Field("", description="One line for traces and the TUI.")


class Router(Protocol):
    def decide(self, f: RequestFeatures) -> RouteDecision: ...

    def review(
        self,
        f: RequestFeatures,
        *,
        failure: str | None,
        mean_logprob: float | None,
        min_logprob: float | None,
    ) -> RouteDecision | None:
        """After a local answer: a decision to escalate it, or None to keep it."""
        ...


class RuleRouter:
    """The rules of issue 4, first match wins:

    1. the agent's ``X-Slm-Route`` header;  2. the task's routing policy ("local"/"remote");
    3. a model id nothing local serves is proxied;  4. planning goes remote;
    5. everything else is tried locally and may be escalated by ``review`` (validation, confidence).
    Any remote route falls back to local ("offline") when the remote is unavailable.
    """

    def __init__(self, *, min_mean_logprob: float = -1.5, min_token_logprob: float = -8.0) -> None:
        self.min_mean_logprob = min_mean_logprob
        self.min_token_logprob = min_token_logprob

    def decide(self, f: RequestFeatures) -> RouteDecision:
        if f.route_header is not None:
            return (
                self._remote(f, "policy", "X-Slm-Route header")
                if f.route_header == "remote"
                else _local("policy", "X-Slm-Route header")
            )
        if f.task_routing == "local":
            return _local("policy", f"task {f.task!r} routes local")
        if f.task_routing == "remote":
            return self._remote(f, "policy", f"task {f.task!r} routes remote")
        if not f.served_locally and not f.matching_local_task:
            return self._remote(f, "proxy", f"model {f.model!r} is not served locally")
        if f.is_planner:
            return self._remote(f, "planning", "planning request")
        return _local("policy", f"task {f.task!r} tried locally" if f.task else "tried locally")

    def review(
        self,
        f: RequestFeatures,
        *,
        failure: str | None,
        mean_logprob: float | None,
        min_logprob: float | None,
    ) -> RouteDecision | None:
        # Pinned to local by the agent or the task: the local answer stands, even a poor one.
        if f.route_header == "local" or f.task_routing == "local" or not f.remote_available:
            return None
        if failure is not None:
            return RouteDecision(route="remote", reason="validation", detail=failure)
        if mean_logprob is not None and mean_logprob < self.min_mean_logprob:
            return RouteDecision(
                route="remote",
                reason="confidence",
                score=math.exp(mean_logprob),
                detail=f"mean token logprob {mean_logprob:.2f} < {self.min_mean_logprob}",
            )
        if min_logprob is not None and min_logprob < self.min_token_logprob:
            return RouteDecision(
                route="remote",
                reason="confidence",
                score=math.exp(min_logprob),
                detail=f"a token's logprob {min_logprob:.2f} < {self.min_token_logprob}",
            )
        return None

    @staticmethod
    def _remote(f: RequestFeatures, reason: RouteReason, detail: str) -> RouteDecision:
        if not f.remote_available:
            return _local(
                "offline", f"{detail}, but no remote is available (offline, breaker open or budget spent)"
            )
        return RouteDecision(route="remote", reason=reason, detail=detail)


def _local(reason: RouteReason, detail: str) -> RouteDecision:
    return RouteDecision(route="local", reason=reason, detail=detail)


def confidence(token_logprobs: Sequence[float]) -> tuple[float, float]:
    """(mean, min) token logprob of an answer; (0.0, 0.0) for no tokens, which the empty-answer
    check catches instead."""
    if not token_logprobs:
        return 0.0, 0.0
    return sum(token_logprobs) / len(token_logprobs), min(token_logprobs)
