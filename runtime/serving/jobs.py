"""Turning a request into a job for the local engine: resolve the target (base, adapter or task),
build the prompt, grammar and sampling. Plain Python; nothing here runs the engine or writes a trace.
"""

from __future__ import annotations

import json
import time
from typing import Any

from slm_agent.contracts.api import ChatCompletionRequest, CompletionRequest, ModelCard, TaskRequest
from slm_agent.contracts.prompts import chat_stop, chat_task_prompt, last_user_text, render_chat, task_prompt
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import Task, TaskRegistry
from slm_agent.errors import NotFoundError, SchemaError
from slm_agent.models.manifest import ModelManifest, PromptFormat
from slm_agent.models.store import ModelStore
from slm_agent.privacy.redactor import Redactor
from slm_agent.runtime.config import Settings
from slm_agent.runtime.engine import Engine, GenerationRequest, grammars
from slm_agent.runtime.serving import templates
from slm_agent.runtime.serving.adapters import AdapterCache
from slm_agent.runtime.serving.context import TASK_PREFIX, CallContext, Job, Target, new_trace


class JobBuilder:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        base: ModelManifest,
        engine: Engine,
        tasks: TaskRegistry,
        adapters: AdapterCache,
    ) -> None:
        self.settings = settings
        self.store = store
        self.base = base
        self.engine = engine
        self.tasks = tasks
        self.adapters = adapters
        self._redactor = Redactor()

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
        # An adapter the store holds (so /v1/models lists it) loads on its first request; this
        # runs on a request thread, never on the event loop.
        lease = self.adapters.acquire(model_id)
        if lease is not None:
            return Target(model_id, None, model_id, 1.0, fmt, lease=lease)
        known = ", ".join(c.id for c in self.model_cards())
        raise NotFoundError(f"the model {model_id!r} does not exist here; available: {known}", param="model")

    # -- building jobs ---------------------------------------------------------------------------
    def _trace(
        self, endpoint: str, target: Target, ctx: CallContext, request: Any, params: dict[str, Any]
    ) -> TraceRecord:
        return new_trace(
            endpoint,
            ctx,
            self.base.name,
            task=target.task.name if target.task else None,
            model=target.model_id,
            adapter=target.adapter,
            route="local",
            route_reason="policy",
            request=request,
            params={k: v for k, v in params.items() if v is not None},
        )

    def _capped(self, max_tokens: int) -> int:
        """The server's cap on one answer; ``Engine.prepare`` then cuts it to the context left, so
        ``max_tokens: 1e9`` ends with ``length``, never holding the engine until the deadline."""
        return min(max_tokens, self.settings.max_tokens_cap)

    def _deadline(self, ctx: CallContext) -> float:
        return time.monotonic() + (ctx.deadline_s or self.settings.request_timeout_s)

    def chat_job(self, req: ChatCompletionRequest, ctx: CallContext) -> Job:
        target = self.resolve(req.model, ctx)
        task = target.task
        tools = req.tools
        forced, parallel = _forced_tool(req.tool_choice), req.parallel_tool_calls
        template = target.prompt_format.chat_template
        wants_tool = bool(tools) and req.tool_choice != "none"
        if wants_tool and template is None and req.tool_choice in (None, "auto") and _answers_a_result(req):
            # A base with no tool format of its own (the bundled one) cannot weigh calling again
            # against answering: measured, it either calls the same tool forever or never calls.
            # Its turn after a tool result is the agent loop's final answer, in text.
            wants_tool = False
        if task is None and wants_tool and template is None:
            task = self.tasks.get("tool_call")
        stop = req.stop_list()
        grammar = None
        if task is not None:
            task_tools = tools or task.tools or None
            if task.form == "chat":  # the agent's own conversation is the input
                prefix, body, task_stop = chat_task_prompt(
                    task, req.messages, task_tools, target.prompt_format
                )
            else:
                prefix, body, task_stop = task_prompt(
                    task, last_user_text(req.messages), task_tools, target.prompt_format
                )
            grammar = grammars.task_grammar(task, task_tools, forced, parallel=parallel)
            kind, stop, defaults = task.kind, stop or task_stop, task.sampling
        elif template is not None:
            # The model's own format: its tools block in, its own call syntax read out of the answer.
            task_tools = tools if wants_tool else None
            prefix, body = templates.render(template, req.messages, task_tools)
            kind, defaults = ("tool_text" if task_tools else "text"), None
            stop = [*stop, *templates.stop_strings(template)]
            if task_tools and (forced or req.tool_choice == "required"):
                # A call it must make is held to the tools' schemas, answered as the bare JSON call
                # (a JSON list of calls when parallel).
                grammar = grammars.tool_call_grammar(task_tools, forced, parallel=parallel)
                kind = "tool_call"
        else:
            prefix, body = render_chat(req.messages, target.prompt_format)
            kind, task_tools, defaults = "text", None, None
            stop = stop or chat_stop(target.prompt_format)
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
            max_tokens=self._capped(
                req.token_limit() or (defaults.max_tokens if defaults else self.settings.max_tokens)
            ),
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
        return Job("chat.completions", target, gen, trace, kind, task_tools, parallel_tool_calls=parallel)

    def chat_task_job(
        self, req: ChatCompletionRequest, task: Task, trace: TraceRecord, ctx: CallContext
    ) -> Job:
        """An agent's own request answered by the chat-shaped task it matched, on the task's adapter:
        the prompt is the agent's conversation and tools, the answer is held to the task's contract.
        The answer carries the model id the agent asked for."""
        fmt = task.prompt_format or self.base.prompt_format or PromptFormat()
        target = Target(req.model, task, task.adapter, task.adapter_scale, fmt)
        tools = req.tools or task.tools or None
        # Its adapter was trained on traces redacted before they left the device: prompt it with
        # the same placeholders (one mapping per request, as sync uses) and restore the answer.
        placeholders: dict[str, str] = {}
        messages = [
            m.model_copy(update={"content": self._redactor.redact(m.text(), placeholders).text})
            for m in req.messages
        ]
        prefix, body, stop = chat_task_prompt(task, messages, tools, fmt)
        gen = GenerationRequest(
            prefix=prefix,
            body=body,
            adapter=task.adapter,
            adapter_scale=task.adapter_scale,
            max_tokens=task.sampling.max_tokens,
            temperature=task.sampling.temperature,
            top_p=task.sampling.top_p,
            stop=stop,
            grammar=grammars.task_grammar(task, tools, _forced_tool(req.tool_choice)),
            logprobs=True,  # the per-request gate reads the answer's token log-probabilities
            deadline=self._deadline(ctx),
        )
        self.engine.prepare(gen)
        job = Job("chat.completions", target, gen, trace, task.kind, tools)
        job.placeholders = placeholders
        return job

    def completion_job(self, req: CompletionRequest, ctx: CallContext) -> Job:
        target = self.resolve(req.model, ctx)
        gen = GenerationRequest(
            prefix=req.prompt,
            body="",
            adapter=target.adapter,
            adapter_scale=_first(req.adapter_scale, target.adapter_scale),
            max_tokens=self._capped(req.token_limit() or self.settings.max_tokens),
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
        prefix, body, stop = task_prompt(task, value, tools, fmt)
        grammar = grammars.task_grammar(task, tools)
        gen = GenerationRequest(
            prefix=prefix,
            body=body,
            adapter=task.adapter,
            adapter_scale=task.adapter_scale,
            max_tokens=self._capped(req.max_tokens or task.sampling.max_tokens),
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


def _answers_a_result(req: ChatCompletionRequest) -> bool:
    """Whether this turn follows a tool's result (the agent loop's call came back)."""
    return bool(req.messages) and req.messages[-1].role == "tool"


def _forced_tool(choice: str | dict[str, Any] | None) -> str | None:
    if isinstance(choice, dict):
        return (choice.get("function") or {}).get("name")
    return None


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    return 0.0
