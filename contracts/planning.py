"""Planning requests: open-ended agent turns the small local model does badly.

The router sends them to the remote, and task discovery never proposes them: both read this one rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from slm_agent.contracts.signature import message_text

_PLANNING = re.compile(
    r"\b(?:planner|planning|make a plan|create a plan|(?:write|draft|produce|outline) (?:a |the )?plan"
    r"|plan (?:out |the |your )?(?:steps|tasks|approach|actions)|step[- ]by[- ]step plan|next steps?"
    r"|decompose|break (?:it|this|the (?:task|problem|goal)) (?:down|into)|sub-?tasks|multi-step)\b",
    re.IGNORECASE,
)
MANY_TOOLS = 5


def asks_for_planning(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the system/developer prompt talks about plans and steps."""
    return any(
        message.get("role") in ("system", "developer") and _PLANNING.search(message_text(message))
        for message in messages
    )


def is_planning_request(
    messages: Sequence[Mapping[str, Any]],
    task: str | None = None,
    *,
    task_is_planner: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> bool:
    """Whether a request asks for planning.

    Signs: the task is marked planner; the system/developer prompt talks about plans and steps;
    or the agent offers many tools and no local task covers the request (an open-ended agent turn).
    """
    if task_is_planner or asks_for_planning(messages):
        return True
    return task is None and len(tools or ()) >= MANY_TOOLS
