"""The request path, without HTTP: resolve the target, build the prompt, run the engine, shape the
answer, write the trace. The HTTP layer only parses, streams and maps errors.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from slm_agent.errors import BadRequestError, NotFoundError, SchemaError, SlmAgentError, StorageFullError
from slm_agent.models.manifest import ModelManifest, PromptFormat
from slm_agent.models.store import ModelStore
from slm_agent.runtime import grammars
from slm_agent.runtime.api_types import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    TaskRequest,
    TaskResponse,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from slm_agent.runtime.config import Settings
from slm_agent.runtime.engine import Engine, GenerationRequest, GenerationResult
from slm_agent.runtime.tasks import Task, TaskRegistry
from slm_agent.runtime.traces import TraceRecord, TraceStore

log = logging.getLogger(__name__)

TASK_PREFIX = "task:"


@dataclass
class CallContext:
    """Who is calling, from request headers."""

    client: str | None = None
    session_id: str | None = None
    agent: str | None = None
    task_header: str | None = None
    deadline_s: float | None = None
    route: Literal["local", "remote"] | None = None  # the X-SLM-Route override


@dataclass
class Target:
    model_id: str
    task: Task | None
    adapter: str | None
    adapter_scale: float
    prompt_format: PromptFormat


@dataclass
class Job:
    """A prepared request: what the engine runs, and what the trace and answer need afterwards."""

    endpoint: str
    target: Target
    gen: GenerationRequest
    trace: TraceRecord
    output_kind: str  # text | json | label | tool_call
    tools: list[dict[str, Any]] | None = None
    started: float = field(default_factory=time.perf_counter)


class Service:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        base: ModelManifest,
        engine: Engine,
        tasks: TaskRegistry,
        traces: TraceStore,
    ) -> None:
        self.settings = settings
        self.store = store
        self.base = base
        self.engine = engine
        self.tasks = tasks
        self.traces = traces

    # -- catalogue -------------------------------------------------------------------------------
    def model_cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.base.name, kind="base", description="base model")]
        for manifest in self.store.list():
            if manifest.kind == "lora-adapter" and manifest.base == self.base.name:
                cards.append(
                    ModelCard(id=manifest.name, kind="adapter", loaded=manifest.name in self.engine.adapters)
                )
        for task in self.tasks.list():
            cards.append(ModelCard(id=TASK_PREFIX + task.name, kind="task", description=task.description))
        return cards

    def resolve(self, model_id: str, ctx: CallContext) -> Target:
        fmt = self.base.prompt_format or PromptFormat()
        task_name = ctx.task_header or (
            model_id[len(TASK_PREFIX) :] if model_id.startswith(TASK_PREFIX) else None
        )
        if task_name:
            task = self.tasks.get(task_name)
            return Target(model_id, task, task.adapter, task.adapter_scale, task.prompt_format or fmt)
        if model_id == self.base.name:
            return Target(model_id, None, None, 1.0, fmt)
        if model_id in self.engine.adapters:
            return Target(model_id, None, model_id, 1.0, fmt)
        known = ", ".join(c.id for c in self.model_cards())
        raise NotFoundError(f"the model {model_id!r} does not exist here; available: {known}", param="model")

    # -- building jobs ---------------------------------------------------------------------------
    def _trace(
        self, endpoint: str, target: Target, ctx: CallContext, request: Any, params: dict[str, Any]
    ) -> TraceRecord:
        return TraceRecord(
            endpoint=endpoint,
            client=ctx.client,
            session_id=ctx.session_id,
            agent=ctx.agent,
            task=target.task.name if target.task else None,
            model=target.model_id,
            base_model=self.base.name,
            adapter=target.adapter,
            route="local",
            route_reason="policy",
            request=request,
            params={k: v for k, v in params.items() if v is not None},
        )

    def _deadline(self, ctx: CallContext) -> float:
        return time.monotonic() + (ctx.deadline_s or self.settings.request_timeout_s)

    def chat_job(self, req: ChatCompletionRequest, ctx: CallContext) -> Job:
        target = self.resolve(req.model, ctx)
        task = target.task
        tools = req.tools
        wants_tool = bool(tools) and req.tool_choice != "none"
        forced = _forced_tool(req.tool_choice)
        if task is None and wants_tool:
            task = self.tasks.get("tool_call")
        stop = req.stop_list()
        grammar = None
        if task is not None:
            task_tools = tools or task.tools or None
            prefix, body, task_stop, grammar = task_prompt(
                task, _last_user_text(req.messages), task_tools, target.prompt_format, forced
            )
            kind, stop, defaults = task.kind, stop or task_stop, task.sampling
        else:
            prefix, body = render_chat(req.messages, target.prompt_format)
            kind, task_tools, defaults = "text", None, None
            stop = stop or target.prompt_format.stop
        if req.response_format and req.response_format.type != "text" and kind == "text":
            kind = "json"
            if req.response_format.type == "json_schema":
                schema = (req.response_format.json_schema or {}).get("schema")
                if schema is None:
                    raise SchemaError(
                        "response_format json_schema needs json_schema.schema", param="response_format"
                    )
                grammar = grammars.schema_grammar(schema)
            else:
                grammar = grammars.json_object_grammar()
            stop = req.stop_list()
        gen = GenerationRequest(
            prefix=prefix,
            body=body,
            adapter=target.adapter,
            adapter_scale=_first(req.adapter_scale, target.adapter_scale),
            max_tokens=req.token_limit() or (defaults.max_tokens if defaults else self.settings.max_tokens),
            temperature=_first(req.temperature, defaults.temperature if defaults else None, 0.7),
            top_p=_first(req.top_p, defaults.top_p if defaults else None, 1.0),
            stop=stop,
            seed=req.seed,
            grammar=grammar,
            logprobs=bool(req.logprobs) or bool(task and task.confidence_threshold is not None),
            deadline=self._deadline(ctx),
        )
        params = req.model_dump(exclude={"messages", "tools", "model"}, exclude_none=True)
        trace = self._trace(
            "chat.completions", target, ctx, [m.model_dump(exclude_none=True) for m in req.messages], params
        )
        trace.task = task.name if task else None
        trace.tools = tools
        trace.stream = req.stream
        self.engine.prepare(gen)
        return Job("chat.completions", target, gen, trace, kind, task_tools)

    def completion_job(self, req: CompletionRequest, ctx: CallContext) -> Job:
        target = self.resolve(req.model, ctx)
        gen = GenerationRequest(
            prefix=req.prompt,
            body="",
            adapter=target.adapter,
            adapter_scale=_first(req.adapter_scale, target.adapter_scale),
            max_tokens=req.token_limit() or self.settings.max_tokens,
            temperature=_first(req.temperature, 0.7),
            top_p=_first(req.top_p, 1.0),
            stop=req.stop_list(),
            seed=req.seed,
            logprobs=bool(req.logprobs),
            deadline=self._deadline(ctx),
        )
        params = req.model_dump(exclude={"prompt", "model"}, exclude_none=True)
        trace = self._trace("completions", target, ctx, req.prompt, params)
        trace.stream = req.stream
        self.engine.prepare(gen)
        return Job("completions", target, gen, trace, "text")

    def task_job(self, name: str, req: TaskRequest, ctx: CallContext) -> Job:
        task = self.tasks.get(name)
        fmt = task.prompt_format or self.base.prompt_format or PromptFormat()
        target = Target(TASK_PREFIX + name, task, task.adapter, task.adapter_scale, fmt)
        value = req.input if isinstance(req.input, str) else json.dumps(req.input, ensure_ascii=False)
        tools = req.tools or task.tools or None
        prefix, body, stop, grammar = task_prompt(task, value, tools, fmt, None)
        gen = GenerationRequest(
            prefix=prefix,
            body=body,
            adapter=task.adapter,
            adapter_scale=task.adapter_scale,
            max_tokens=req.max_tokens or task.sampling.max_tokens,
            temperature=_first(req.temperature, task.sampling.temperature),
            top_p=task.sampling.top_p,
            stop=stop,
            seed=req.seed,
            grammar=grammar,
            logprobs=task.confidence_threshold is not None,
            deadline=self._deadline(ctx),
        )
        trace = self._trace(
            "tasks", target, ctx, req.input, {"max_tokens": req.max_tokens, "temperature": req.temperature}
        )
        trace.tools = tools
        self.engine.prepare(gen)
        return Job("tasks", target, gen, trace, task.kind, tools)

    # -- finishing jobs --------------------------------------------------------------------------
    def parse_output(self, job: Job, result: GenerationResult) -> tuple[Any, list[ToolCall] | None]:
        """The typed output of a finished job; a SchemaError when the answer breaks its contract."""
        text = result.text.strip()
        if job.output_kind == "text":
            return result.text, None
        if job.output_kind == "label":
            return text, None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            why = "it was cut off at max_tokens" if result.finish_reason == "length" else str(exc)
            raise SchemaError(f"the model's answer is not valid JSON ({why}): {text[:200]!r}") from exc
        if job.output_kind == "tool_call":
            call = ToolCall(
                function=ToolCallFunction(
                    name=value["name"], arguments=json.dumps(value.get("arguments", {}))
                )
            )
            return value, [call]
        return value, None

    def chat_output(self, job: Job, result: GenerationResult) -> tuple[Any, list[ToolCall] | None]:
        """Like parse_output, but an answer cut off at max_tokens is returned as text, as OpenAI does."""
        if result.finish_reason == "length" and job.output_kind != "text":
            return None, None
        return self.parse_output(job, result)

    def chat_response(self, job: Job, result: GenerationResult) -> ChatCompletion:
        output, tool_calls = self.chat_output(job, result)
        if tool_calls:
            message = AssistantMessage(content=None, tool_calls=tool_calls)
            finish = "tool_calls"
        else:
            content = result.text.strip() if job.output_kind != "text" else result.text
            message = AssistantMessage(content=content)
            finish = "length" if result.finish_reason == "length" else "stop"
        response = ChatCompletion(
            id=job.trace.id,
            model=job.target.model_id,
            choices=[ChatChoice(message=message, finish_reason=finish, logprobs=_logprobs(result, job))],
            usage=usage(result),
        )
        self.record(job, result, response_text=message.content, output=output, tool_calls=tool_calls)
        return response

    def completion_response(self, job: Job, result: GenerationResult) -> Completion:
        response = Completion(
            id=job.trace.id,
            model=job.target.model_id,
            choices=[CompletionChoice(text=result.text, finish_reason=_finish(result))],
            usage=usage(result),
        )
        self.record(job, result, response_text=result.text)
        return response

    def task_response(self, job: Job, result: GenerationResult) -> TaskResponse:
        output, tool_calls = self.parse_output(job, result)
        self.record(job, result, response_text=result.text.strip(), output=output, tool_calls=tool_calls)
        return TaskResponse(
            id=job.trace.id,
            task=job.trace.task or "",
            output=output,
            text=result.text.strip(),
            finish_reason=_finish(result),
            adapter=job.target.adapter,
            usage=usage(result),
            latency_ms=round(result.total_ms, 2),
        )

    def record(
        self,
        job: Job,
        result: GenerationResult | None,
        *,
        response_text: str | None = None,
        output: Any = None,
        tool_calls: list[ToolCall] | None = None,
        error: SlmAgentError | None = None,
        status: int | None = None,
    ) -> TraceRecord:
        """Commit the job's trace. Called once per job, before the last byte goes to the client."""
        trace = job.trace
        trace.response = response_text
        trace.output = output
        trace.tool_calls = [c.model_dump() for c in tool_calls] if tool_calls else None
        if result is not None:
            trace.finish_reason = result.finish_reason
            trace.prompt_tokens = result.prompt_tokens
            trace.completion_tokens = result.completion_tokens
            trace.cached_tokens = result.cached_tokens
            trace.queue_ms = round(result.queue_ms, 3)
            trace.ttft_ms = round(result.ttft_ms, 3) if result.ttft_ms is not None else None
            trace.tokens_per_s = round(result.tokens_per_s, 2) if result.tokens_per_s else None
        trace.latency_ms = round((time.perf_counter() - job.started) * 1000, 3)
        if status is not None:
            trace.status = status
        if error is not None:
            trace.error = error.message
            trace.status = error.status_code
            if self.record_error(trace):
                error.trace_id = trace.id
            return trace
        return self.traces.insert(trace)

    def record_error(self, trace: TraceRecord) -> bool:
        """Trace a failed request. With the disk full the client must still see its own error."""
        try:
            self.traces.insert(trace)
        except StorageFullError as exc:
            log.warning("failed request %s not traced: %s", trace.id, exc.message)
            return False
        return True

    def record_failure(
        self, endpoint: str, ctx: CallContext, model: str | None, request: Any, error: SlmAgentError
    ) -> None:
        """Trace a request that failed before it could run (unknown model, prompt too long...)."""
        self.record_error(
            TraceRecord(
                endpoint=endpoint,
                client=ctx.client,
                session_id=ctx.session_id,
                agent=ctx.agent,
                model=model,
                base_model=self.base.name,
                route="local",
                request=request,
                status=error.status_code,
                error=error.message,
            )
        )


def render_chat(messages: list[ChatMessage], fmt: PromptFormat) -> tuple[str, str]:
    """System turns form the cacheable prefix; the conversation and the answer cue the body."""
    prefix_parts: list[str] = []
    body_parts: list[str] = []
    for message in messages:
        text = message.text()
        if message.role in ("system", "developer") and not body_parts:
            prefix_parts.append(fmt.system.format(content=text))
        elif message.role == "assistant":
            if message.tool_calls:
                text = text or json.dumps([c.get("function") for c in message.tool_calls])
            body_parts.append(fmt.assistant.format(content=text))
        elif message.role == "tool":
            body_parts.append(fmt.user.format(content=f"[tool result] {text}"))
        else:
            body_parts.append(fmt.user.format(content=text))
    body_parts.append(fmt.generation_prefix)
    return "".join(prefix_parts), "".join(body_parts)


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details={"cached_tokens": result.cached_tokens},
    )


def task_prompt(
    task: Task, value: str, tools: list[dict[str, Any]] | None, fmt: PromptFormat, forced: str | None
) -> tuple[str, str, list[str], Any]:
    """A task's prompt (cached prefix, body), default stop strings and output grammar."""
    if task.kind == "tool_call" and not tools:
        raise BadRequestError(
            f"task {task.name!r} chooses among tools, but the request has none: send them in 'tools'",
            param="tools",
        )
    # Structured answers are one line; free text ends where the prompt format says.
    stop = ["\n"] if task.kind != "text" else fmt.stop
    return task.prefix(), task.body(value, tools), stop, _task_grammar(task, tools, forced)


def _task_grammar(task: Task, tools: list[dict[str, Any]] | None, forced: str | None) -> Any:
    if task.kind == "json" and task.output_schema:
        return grammars.schema_grammar(task.output_schema)
    if task.kind == "label":
        return grammars.label_grammar(task.labels)
    if task.kind == "tool_call" and tools:
        return grammars.tool_call_grammar(tools, forced)
    return None


def _forced_tool(choice: str | dict[str, Any] | None) -> str | None:
    if isinstance(choice, dict):
        return (choice.get("function") or {}).get("name")
    return None


def _last_user_text(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.text()
    raise BadRequestError("the request has no user message for the task to work on", param="messages")


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    return 0.0


def _logprobs(result: GenerationResult, job: Job) -> dict[str, Any] | None:
    if not result.token_logprobs or not job.gen.logprobs:
        return None
    return {"content": [{"logprob": lp} for lp in result.token_logprobs]}
