"""Where a request is answered: on the device or by a remote LLM, and why.

The decision is made twice at most. ``decide`` runs before generation on ``RequestFeatures`` (what
the request is, what policy says, whether a remote is reachable). ``review`` runs after a local
answer, with what ``validate_local_answer`` and ``confidence`` found, and may escalate it.

``Router`` is the seam: ``RuleRouter`` implements it with the rules below; a learned router (an
ONNX classifier over the same features) can replace it without touching the callers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

__all__ = [
    "RequestFeatures",
    "RouteDecision",
    "Router",
    "RuleRouter",
    "confidence",
    "is_planning_request",
]

RouteReason = Literal["policy", "proxy", "planning", "validation", "confidence", "offline"]


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


# -- planning --------------------------------------------------------------------------------------

_PLANNING = re.compile(
    r"\b(?:planner|planning|make a plan|create a plan|(?:write|draft|produce|outline) (?:a |the )?plan"
    r"|plan (?:out |the |your )?(?:steps|tasks|approach|actions)|step[- ]by[- ]step plan|next steps?"
    r"|decompose|break (?:it|this|the (?:task|problem|goal)) (?:down|into)|sub-?tasks|multi-step)\b",
    re.IGNORECASE,
)
MANY_TOOLS = 5


def is_planning_request(
    messages: Sequence[dict[str, Any]],
    task: str | None = None,
    *,
    task_is_planner: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> bool:
    """Whether a request asks for planning, which the small local model does badly.

    Signs: the task is marked planner; the system/developer prompt talks about plans and steps;
    or the agent offers many tools and no local task covers the request (an open-ended agent turn).
    """
    if task_is_planner:
        return True
    for message in messages:
        if message.get("role") not in ("system", "developer"):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str) and _PLANNING.search(content):
            return True
    return task is None and len(tools or ()) >= MANY_TOOLS
