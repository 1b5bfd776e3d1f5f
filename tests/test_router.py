"""Routing decisions, one per reason, and the checks that feed escalation."""

from __future__ import annotations

from typing import Any

import pytest

from slm_agent.contracts.schemas import validate_local_answer
from slm_agent.runtime.routing.router import (
    RequestFeatures,
    RouteDecision,
    Router,
    RuleRouter,
    confidence,
    is_planning_request,
)


def features(**overrides: Any) -> RequestFeatures:
    base: dict[str, Any] = {
        "model": "extract-invoice",
        "served_locally": True,
        "task": "extract-invoice",
        "task_routing": "auto",
        "route_header": None,
        "is_planner": False,
        "has_tools": False,
        "n_tools": 0,
        "matching_local_task": True,
        "prompt_tokens": 120,
        "remote_available": True,
    }
    return RequestFeatures(**{**base, **overrides})


@pytest.fixture
def router() -> RuleRouter:
    return RuleRouter(min_mean_logprob=-1.5, min_token_logprob=-8.0)


def test_rule_router_satisfies_the_protocol(router: RuleRouter) -> None:
    r: Router = router
    assert isinstance(r.decide(features()), RouteDecision)


@pytest.mark.parametrize(
    ("overrides", "route", "reason"),
    [
        ({}, "local", "policy"),
        ({"route_header": "remote"}, "remote", "policy"),
        ({"route_header": "local", "is_planner": True}, "local", "policy"),
        ({"task_routing": "remote"}, "remote", "policy"),
        ({"task_routing": "local", "is_planner": True}, "local", "policy"),
        (
            {"model": "gpt-4o", "served_locally": False, "task": None, "matching_local_task": False},
            "remote",
            "proxy",
        ),
        ({"is_planner": True}, "remote", "planning"),
        ({"is_planner": True, "remote_available": False}, "local", "offline"),
        ({"route_header": "remote", "remote_available": False}, "local", "offline"),
        (
            {
                "model": "gpt-4o",
                "served_locally": False,
                "task": None,
                "matching_local_task": False,
                "remote_available": False,
            },
            "local",
            "offline",
        ),
    ],
)
def test_decide(router: RuleRouter, overrides: dict[str, Any], route: str, reason: str) -> None:
    decision = router.decide(features(**overrides))
    assert (decision.route, decision.reason) == (route, reason), decision.detail
    assert decision.detail


def test_unknown_model_with_a_matching_task_stays_local(router: RuleRouter) -> None:
    decision = router.decide(features(model="gpt-4o", served_locally=False, matching_local_task=True))
    assert decision.route == "local"


def test_review_escalates_on_validation_failure(router: RuleRouter) -> None:
    d = router.review(features(), failure="invalid JSON: x", mean_logprob=-0.2, min_logprob=-1.0)
    assert d is not None and (d.route, d.reason, d.detail) == ("remote", "validation", "invalid JSON: x")


def test_review_escalates_on_low_confidence(router: RuleRouter) -> None:
    d = router.review(features(), failure=None, mean_logprob=-2.3, min_logprob=-4.0)
    assert d is not None and (d.route, d.reason) == ("remote", "confidence")
    assert d.score == pytest.approx(0.1002588, rel=1e-4)
    d = router.review(features(), failure=None, mean_logprob=-0.3, min_logprob=-11.0)
    assert d is not None and d.reason == "confidence"


def test_review_keeps_good_or_pinned_answers(router: RuleRouter) -> None:
    assert router.review(features(), failure=None, mean_logprob=-0.3, min_logprob=-2.0) is None
    assert (
        router.review(
            features(task_routing="local"), failure="empty answer", mean_logprob=None, min_logprob=None
        )
        is None
    )
    assert (
        router.review(
            features(route_header="local"), failure="empty answer", mean_logprob=None, min_logprob=None
        )
        is None
    )
    assert (
        router.review(
            features(remote_available=False), failure="empty answer", mean_logprob=None, min_logprob=None
        )
        is None
    )


# -- validate_local_answer -------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}, "currency": {"type": "string", "enum": ["EUR", "USD"]}},
    "required": ["total", "currency"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
            },
        },
    }
]


def test_valid_answers_pass() -> None:
    assert validate_local_answer("Paris.", "stop") is None
    assert validate_local_answer('{"total": 12.5, "currency": "EUR"}', "stop", schema=SCHEMA) is None
    call = {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}
    assert validate_local_answer(None, "tool_calls", tools=TOOLS, tool_call=call) is None
    openai_item = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    assert validate_local_answer("", "tool_calls", tools=TOOLS, tool_call=openai_item) is None


@pytest.mark.parametrize(
    ("text", "finish", "kwargs", "expected"),
    [
        ("", "stop", {}, "empty answer"),
        ("   \n", "stop", {}, "empty answer"),
        ('{"total": 1', "length", {"schema": SCHEMA}, "truncated"),
        ('{"total": 1', "stop", {"schema": SCHEMA}, "invalid JSON"),
        (
            '{"total": "12", "currency": "EUR"}',
            "stop",
            {"schema": SCHEMA},
            "total: '12' is not of type 'number'",
        ),
        ('{"total": 12}', "stop", {"schema": SCHEMA}, "'currency' is a required property"),
        (
            None,
            "tool_calls",
            {"tools": TOOLS, "tool_call": {"name": "get_wether", "arguments": "{}"}},
            "unknown tool",
        ),
        (
            None,
            "tool_calls",
            {"tools": TOOLS, "tool_call": {"name": "get_weather", "arguments": "{city"}},
            "invalid JSON",
        ),
        (
            None,
            "tool_calls",
            {
                "tools": TOOLS,
                "tool_call": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 0}'},
            },
            "days: 0 is less than the minimum of 1",
        ),
        (
            None,
            "tool_calls",
            {"tools": TOOLS, "tool_call": {"name": "get_weather", "arguments": "{}"}},
            "'city' is a required",
        ),
    ],
)
def test_invalid_answers_say_why(
    text: str | None, finish: str, kwargs: dict[str, Any], expected: str
) -> None:
    reason = validate_local_answer(text, finish, **kwargs)
    assert reason is not None and expected in reason, reason


def test_confidence() -> None:
    assert confidence([-0.1, -0.5, -2.4]) == (pytest.approx(-1.0), -2.4)
    assert confidence([]) == (0.0, 0.0)


# -- planning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "kwargs", "expected"),
    [
        ([{"role": "system", "content": "You are a planner. Break the task into subtasks."}], {}, True),
        ([{"role": "system", "content": "First make a plan, then act step by step."}], {}, True),
        ([{"role": "developer", "content": [{"type": "text", "text": "Decompose the goal."}]}], {}, True),
        ([{"role": "system", "content": "Extract the invoice total as JSON."}], {"task": "extract"}, False),
        ([{"role": "user", "content": "What is your planning process?"}], {}, False),  # users don't count
        ([{"role": "system", "content": "Our data plan costs $10."}], {}, False),
        ([{"role": "system", "content": "Help."}], {"task_is_planner": True}, True),
        ([{"role": "system", "content": "Help."}], {"tools": [{}] * 6}, True),
        ([{"role": "system", "content": "Help."}], {"tools": [{}] * 6, "task": "route-ticket"}, False),
        ([{"role": "system", "content": "Help."}], {"tools": [{}] * 2}, False),
    ],
)
def test_is_planning_request(messages: list[dict[str, Any]], kwargs: dict[str, Any], expected: bool) -> None:
    assert is_planning_request(messages, **kwargs) is expected
