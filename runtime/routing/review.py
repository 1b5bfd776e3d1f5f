"""The second look at a local answer of an ``auto`` task: does it keep the task's contract, is the
model confident enough, and would a remote take it if not.
"""

from __future__ import annotations

from typing import Any

from slm_agent.contracts.schemas import validate_local_answer
from slm_agent.contracts.tasks import Task
from slm_agent.errors import SchemaError
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.routing.router import RequestFeatures, RouteDecision, RuleRouter, confidence
from slm_agent.runtime.serving.context import Job
from slm_agent.runtime.serving.tool_calls import read_calls


def local_failure(task: Task, job: Job, result: GenerationResult) -> str | None:
    """Why a local answer breaks the task's contract (validate_local_answer), or None."""
    text = result.text.strip()
    if job.output_kind == "tool_call" and result.finish_reason != "length":
        try:
            calls = read_calls(text)
        except SchemaError as exc:
            return exc.message
        failures = (
            validate_local_answer(text, result.finish_reason, tools=job.tools, tool_call=call)
            for _, _, call in calls
        )
        return next((failure for failure in failures if failure is not None), None)
    schema = task.output_schema if job.output_kind == "json" else None
    failure = validate_local_answer(text, result.finish_reason, schema=schema)
    if failure is None and job.output_kind == "label" and text not in task.labels:
        return f"label {text!r} is not one of {task.labels}"
    return failure


def review(
    features: RequestFeatures,
    task: Task,
    job: Job,
    result: GenerationResult,
    *,
    default_min_logprob: float,
    remote_available: bool,
) -> tuple[RouteDecision | None, dict[str, Any]]:
    """Whether to escalate a local answer, and the local attempt as the trace keeps it."""
    failure = local_failure(task, job, result)
    mean = low = None
    if task.confidence_threshold is not None and result.token_logprobs:
        mean, low = confidence(result.token_logprobs)
    router = RuleRouter(min_mean_logprob=task.confidence_threshold or default_min_logprob)
    features = features.model_copy(update={"remote_available": remote_available})
    decision = router.review(features, failure=failure, mean_logprob=mean, min_logprob=None)
    if decision is None and not remote_available:
        online = features.model_copy(update={"remote_available": True})
        would = router.review(online, failure=failure, mean_logprob=mean, min_logprob=None)
        if would is not None:  # it would have escalated: say why it did not
            detail = f"{would.reason}: {would.detail}; no remote is available, the local answer stands"
            decision = RouteDecision(route="local", reason="offline", detail=detail)
    attempt = {
        "route": "local",
        "adapter": job.target.adapter,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "failure": failure,
        "mean_logprob": round(mean, 4) if mean is not None else None,
        "min_logprob": round(low, 4) if low is not None else None,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "latency_ms": round(result.total_ms, 3),
    }
    return decision, attempt
