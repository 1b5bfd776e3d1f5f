"""Agent runs: the remote LLM plans, the steps run where they fit, the remote writes the answer.

A run, in plain Python (the HTTP routes in ``http/routes/agents.py`` only start it and stream it):

1. **plan** (remote): a JSON list of steps, each ``{"task": name, "input": ...}`` or
   ``{"tool": name, "arguments": {...}}``, over the local tasks and the client's tools.
2. **steps**, in order, at most ``max_steps``:
   - a task the daemon has runs through the normal request path (its routing policy, adapter,
     validation and confidence review); if it fails locally it is retried remotely once;
   - a task the daemon does not have is asked of the remote LLM as one chat turn;
   - a **tool step is not executed**: the daemon cannot run the agent's tools. It is recorded as a
     span with status ``pending_tool`` and returned in the run's ``pending_tool_calls`` (OpenAI
     ``tool_calls`` shape), for the agent to execute; later steps see "(pending tool call NAME)".
   A step's input may say ``{previous}``, replaced by the previous step's output; a task step
   with no input gets the previous output (the goal for the first step).
3. **final** (remote): the answer, from the goal, the step results and the pending tool calls.

Limits per run: ``max_steps`` (the plan is cut), ``max_seconds`` (the run is stopped, status
error) and ``max_cost_usd`` (checked before each remote call; remote spend of local steps that
escalated counts too). Every span is saved to the ``spans`` table and published as an event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from slm_agent.contracts.api import TaskRequest
from slm_agent.contracts.clock import new_id, utcnow
from slm_agent.errors import BudgetExceededError, RunLimitError, SlmAgentError
from slm_agent.runtime.agents.feed import RunFeed
from slm_agent.runtime.agents.models import AgentRun, AgentRunRequest
from slm_agent.runtime.remote.tasks import strip_fences
from slm_agent.runtime.routing.escalation import Escalation
from slm_agent.runtime.serving.context import CallContext
from slm_agent.runtime.store.spans import Span, SpanStore

log = logging.getLogger(__name__)

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "task": {"type": "string"},
                    "input": {"type": "string"},
                    "tool": {"type": "string"},
                    "arguments": {"type": "object"},
                },
            },
        }
    },
    "required": ["steps"],
}


class AgentRunner:
    def __init__(
        self,
        escalation: Escalation,
        spans: SpanStore,
        publish: Callable[[str, dict[str, Any]], Any],
    ) -> None:
        self.escalation = escalation
        self.spans = spans
        self.publish = publish
        self.feeds: dict[str, RunFeed] = {}
        self._tasks: set[asyncio.Task[AgentRun]] = set()

    def start(self, req: AgentRunRequest, ctx: CallContext) -> str:
        """Start a run in the background; its id at once."""
        run_id = new_id("run")
        self.feeds[run_id] = RunFeed()
        task = asyncio.get_running_loop().create_task(self.run(run_id, req, ctx))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._done)
        return run_id

    def _done(self, task: asyncio.Task[AgentRun]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent run crashed", exc_info=task.exception())

    async def run(self, run_id: str, req: AgentRunRequest, ctx: CallContext) -> AgentRun:
        feed = self.feeds.setdefault(run_id, RunFeed())
        root = self._open(feed, Span(run_id=run_id, kind="run", name=req.goal[:120], input=req.model_dump()))
        state = _State(req, root)
        try:
            await asyncio.wait_for(self._steps(feed, state, ctx), timeout=req.max_seconds)
            root.status = "ok"
        except TimeoutError:
            root.status, root.error = "error", f"the run took longer than max_seconds={req.max_seconds}"
        except SlmAgentError as exc:
            root.status, root.error = "error", exc.message
        root.output = {
            "answer": state.answer,
            "pending_tool_calls": state.pending,
            "cost_usd": round(state.cost, 6),
            "steps": len(state.results),
        }
        self._close(feed, root, root.status, last=True)
        return AgentRun(
            id=run_id,
            status=root.status,
            goal=req.goal,
            answer=state.answer,
            pending_tool_calls=state.pending,
            cost_usd=state.cost,
            error=root.error,
            spans=self.spans.run(run_id),
        )

    async def _steps(self, feed: RunFeed, state: _State, ctx: CallContext) -> None:
        plan = await self._plan(feed, state, ctx)
        for number, step in enumerate(plan[: state.req.max_steps], start=1):
            if "tool" in step and step.get("tool"):
                self._tool_step(feed, state, number, step)
            else:
                await self._task_step(feed, state, number, step, ctx)
        state.answer = await self._final(feed, state, ctx)

    # -- plan, steps, final ----------------------------------------------------------------------------
    async def _plan(self, feed: RunFeed, state: _State, ctx: CallContext) -> list[dict[str, Any]]:
        tasks = "\n".join(
            f"- {t.name} ({t.kind}): {t.description}" for t in self.escalation.jobs.tasks.list()
        )
        tools = "\n".join(
            f"- {t.get('function', t).get('name')}: {t.get('function', t).get('description', '')}"
            for t in state.req.tools
        )
        system = (
            "You plan an agent's work. Answer with JSON: {\"steps\": [...]}, each step either "
            "{\"task\": NAME, \"input\": TEXT} or {\"tool\": NAME, \"arguments\": {...}}. "
            "Write {previous} in an input to use the previous step's result.\n"
            f"Tasks:\n{tasks or '- (none)'}\nTools:\n{tools or '- (none)'}"
        )  # fmt: skip
        body = {
            "model": "planner",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": state.req.goal}],
            "response_format": {"type": "json_object", "schema": PLAN_SCHEMA},
            "temperature": 0,
        }
        span = self._open(
            feed,
            state.child(
                kind="plan",
                route="remote",
                input=state.req.goal,
            ),
        )
        text = await self._remote(feed, state, span, body, ctx, "agent.plan", "planning")
        try:
            value = json.loads(strip_fences(text))
            steps = value.get("steps") if isinstance(value, dict) else value
            if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
                raise ValueError("not a list of step objects")
        except ValueError as exc:
            self._close(feed, span, "error", error=f"the plan is not a JSON list of steps: {exc}")
            raise RunLimitError(f"the remote's plan did not parse: {exc}") from exc
        span.output = steps
        self._close(feed, span, "ok")
        return steps

    def _tool_step(self, feed: RunFeed, state: _State, number: int, step: dict[str, Any]) -> None:
        arguments = _feed_previous(step.get("arguments") or {}, state.previous)
        call = {
            "id": new_id("call"),
            "type": "function",
            "function": {"name": step["tool"], "arguments": json.dumps(arguments)},
        }
        span = state.child(
            step=number,
            kind="tool",
            name=step["tool"],
            input=arguments,
            output=call,
        )
        self._open(feed, span)
        self._close(feed, span, "pending_tool")
        state.pending.append(call)
        state.results.append((step["tool"], f"(pending tool call {step['tool']})"))

    async def _task_step(
        self, feed: RunFeed, state: _State, number: int, step: dict[str, Any], ctx: CallContext
    ) -> None:
        name = str(step.get("task") or "step")
        value = _feed_previous(step.get("input") or state.previous, state.previous)
        value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        tasks = self.escalation.jobs.tasks
        if tasks.has(name):
            output = await self._local_task(feed, state, number, name, value, ctx)
        else:
            body = {
                "model": "step",
                "messages": [
                    {
                        "role": "system",
                        "content": f"You carry out one step of a plan towards this goal: {state.req.goal}",
                    },
                    {"role": "user", "content": f"Step: {name}\nInput: {value}"},
                ],
            }
            span = self._open(
                feed,
                state.child(
                    step=number,
                    kind="remote",
                    name=name,
                    route="remote",
                    input=value,
                ),
            )
            output = await self._remote(feed, state, span, body, ctx, "agent.step", "policy")
            span.output = output
            self._close(feed, span, "ok")
        state.results.append((name, output))

    async def _local_task(
        self, feed: RunFeed, state: _State, number: int, name: str, value: str, ctx: CallContext
    ) -> Any:
        """The task through the normal request path; a failure is retried remotely once."""
        tries: list[CallContext] = [ctx, CallContext(**{**ctx.__dict__, "route": "remote"})]
        for attempt, try_ctx in enumerate(tries):
            span = self._open(
                feed,
                state.child(
                    step=number,
                    kind="task",
                    name=name,
                    input=value,
                ),
            )
            self._check_cost(state)
            try:
                # Building the job tokenizes the prompt: off the event loop.
                routed = await asyncio.to_thread(
                    self.escalation.route_task, name, TaskRequest(input=value), try_ctx
                )
                span.trace_id = routed.trace.id
                outcome = await self.escalation.task(routed)
            except SlmAgentError as exc:
                span.route = span.route or ("remote" if attempt else "local")
                self._close(feed, span, "error", error=exc.message)
                if attempt or isinstance(exc, BudgetExceededError):
                    raise
                continue
            state.cost += outcome.trace.cost_usd or 0.0
            span.route, span.trace_id = outcome.trace.route, outcome.trace.id
            span.output = (outcome.body or {}).get("output")
            self._close(feed, span, "ok")
            return span.output
        raise AssertionError("unreachable")

    async def _final(self, feed: RunFeed, state: _State, ctx: CallContext) -> str:
        lines = [
            f"{i}. {name}: {json.dumps(out, ensure_ascii=False) if not isinstance(out, str) else out}"
            for i, (name, out) in enumerate(state.results, 1)
        ]
        pending = ", ".join(c["function"]["name"] for c in state.pending)
        body = {
            "model": "final",
            "messages": [
                {
                    "role": "system",
                    "content": "Write the final answer to the goal from the results of its steps.",
                },
                {
                    "role": "user",
                    "content": f"Goal: {state.req.goal}\nResults:\n"
                    + "\n".join(lines)
                    + (f"\nTool calls the agent still has to make: {pending}" if pending else ""),
                },
            ],
        }
        span = self._open(
            feed,
            state.child(kind="final", route="remote", input=lines),
        )
        text = await self._remote(feed, state, span, body, ctx, "agent.final", "planning")
        span.output = text
        self._close(feed, span, "ok")
        return text

    async def _remote(
        self,
        feed: RunFeed,
        state: _State,
        span: Span,
        body: dict[str, Any],
        ctx: CallContext,
        endpoint: str,
        reason: str,
    ) -> str:
        try:
            self._check_cost(state)
            result, trace = await self.escalation.remote_call(body, endpoint, ctx, reason)
        except SlmAgentError as exc:
            self._close(feed, span, "error", error=exc.message)
            raise
        span.trace_id = trace.id
        state.cost += result.cost_usd
        return trace.response or ""

    @staticmethod
    def _check_cost(state: _State) -> None:
        limit = state.req.max_cost_usd
        if limit is not None and state.cost >= limit:
            raise RunLimitError(f"the run spent ${state.cost:.4f} of its max_cost_usd=${limit}")

    # -- spans ------------------------------------------------------------------------------------------
    def _open(self, feed: RunFeed, span: Span) -> Span:
        self.spans.save(span)
        self._emit(feed, span)
        return span

    def _close(
        self, feed: RunFeed, span: Span, status: str, *, error: str | None = None, last: bool = False
    ) -> None:
        span.status = status  # type: ignore[assignment]
        span.error = error or span.error
        span.ended_at = utcnow()
        span.duration_ms = round((time.time() - _epoch(span.started_at)) * 1000, 3)
        self.spans.save(span)
        self._emit(feed, span, last=last)

    def _emit(self, feed: RunFeed, span: Span, *, last: bool = False) -> None:
        data = span.model_dump()
        feed.push("span", data, last=last)
        self.publish(
            "span",
            {
                k: data[k]
                for k in (
                    "id",
                    "run_id",
                    "parent_id",
                    "step",
                    "kind",
                    "name",
                    "route",
                    "status",
                    "trace_id",
                    "duration_ms",
                )
            },
        )


class _State:
    def __init__(self, req: AgentRunRequest, root: Span) -> None:
        self.req = req
        self.root = root
        self.results: list[tuple[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.cost = 0.0
        self.answer: str | None = None

    def child(self, **fields: Any) -> Span:
        """A span under this run's root."""
        return Span(run_id=self.root.run_id, parent_id=self.root.id, **fields)

    @property
    def previous(self) -> Any:
        return self.results[-1][1] if self.results else self.req.goal


def _feed_previous(value: Any, previous: Any) -> Any:
    """``{previous}`` in a step's input (or in its tool arguments' strings) -> the last output."""
    text = previous if isinstance(previous, str) else json.dumps(previous, ensure_ascii=False)
    if isinstance(value, str):
        return value.replace("{previous}", text)
    if isinstance(value, dict):
        return {k: _feed_previous(v, previous) for k, v in value.items()}
    if isinstance(value, list):
        return [_feed_previous(v, previous) for v in value]
    return value


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
