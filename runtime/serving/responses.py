"""Shaping a finished local job into what the client gets: OpenAI bodies, task responses, stream
chunks. Builders only shape; the recorder writes the trace.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from slm_agent.contracts.api import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    TaskResponse,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from slm_agent.errors import SchemaError
from slm_agent.privacy.redactor import restore
from slm_agent.runtime.engine import GenerationResult
from slm_agent.runtime.serving import templates
from slm_agent.runtime.serving.context import Job
from slm_agent.runtime.serving.recorder import LocalAnswer
from slm_agent.runtime.serving.sse import DONE, sse
from slm_agent.runtime.serving.tool_calls import CallDelta, call_id, read_calls


def finish_reason(finish: str | None) -> str:
    """OpenAI's finish_reason for an engine's or a remote's: only a cut-off answer is ``length``."""
    return "length" if finish == "length" else "stop"


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details={"cached_tokens": result.cached_tokens},
    )


def parse_output(job: Job, result: GenerationResult) -> tuple[Any, list[ToolCall] | None]:
    """The typed output of a finished job; a SchemaError when the answer breaks its contract.
    A tool_call answer's output is its call ``{"name": ..., "arguments": {...}}``, or the list of
    them when it made several."""
    text = result.text.strip()
    if job.output_kind == "text":
        return result.text, None
    if job.output_kind == "label":
        return text, None
    if job.output_kind == "tool_text":  # a templated model's answer: text, or calls in its own syntax
        found = templates.tool_calls(result.text, job.tools)[: None if job.parallel_tool_calls else 1]
        calls = [_numbered(job, i, c.function) for i, c in enumerate(found)]
        return ([c.function.model_dump() for c in calls], calls) if calls else (result.text, None)
    if job.output_kind == "tool_call":
        read = read_calls(result.text)
        calls = [_numbered(job, i, ToolCallFunction(name=n, arguments=a)) for i, (n, a, _) in enumerate(read)]
        values = [value for _, _, value in read]
        return (values[0] if len(values) == 1 else values), calls
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        why = "it was cut off at max_tokens" if result.finish_reason == "length" else str(exc)
        raise SchemaError(f"the model's answer is not valid JSON ({why}): {text[:200]!r}") from exc
    return value, None


def _numbered(job: Job, index: int, function: ToolCallFunction) -> ToolCall:
    return ToolCall(id=call_id(job.trace.id, index), function=function)


def chat_answer(job: Job, result: GenerationResult) -> LocalAnswer:
    """A chat answer: like parse_output, but one cut off at max_tokens is returned as text, as
    OpenAI does."""
    if job.placeholders:
        result = dataclasses.replace(result, text=restore(result.text, job.placeholders))
    if result.finish_reason == "length" and job.output_kind != "text":
        output, tool_calls = None, None
    else:
        output, tool_calls = parse_output(job, result)
    if tool_calls:
        return LocalAnswer(None, output, tool_calls)
    return LocalAnswer(result.text.strip() if job.output_kind != "text" else result.text, output, None)


def assistant_message(answer: LocalAnswer) -> dict[str, Any]:
    """A local answer as the OpenAI assistant message the agent gets (and the remote's is compared to)."""
    calls = [c.model_dump() for c in answer.tool_calls] if answer.tool_calls else None
    return {"role": "assistant", "content": None if calls else answer.text, "tool_calls": calls}


def chat_completion(job: Job, result: GenerationResult, answer: LocalAnswer) -> ChatCompletion:
    if answer.tool_calls:
        message = AssistantMessage(content=None, tool_calls=answer.tool_calls)
        finish = "tool_calls"
    else:
        message = AssistantMessage(content=answer.text)
        finish = finish_reason(result.finish_reason)
    return ChatCompletion(
        id=job.trace.id,
        model=job.target.model_id,
        choices=[ChatChoice(message=message, finish_reason=finish, logprobs=_logprobs(result, job))],
        usage=usage(result),
    )


def completion(job: Job, result: GenerationResult) -> Completion:
    return Completion(
        id=job.trace.id,
        model=job.target.model_id,
        choices=[CompletionChoice(text=result.text, finish_reason=finish_reason(result.finish_reason))],
        usage=usage(result),
    )


def task_answer(job: Job, result: GenerationResult) -> LocalAnswer:
    output, tool_calls = parse_output(job, result)
    return LocalAnswer(result.text.strip(), output, tool_calls)


def task_response(job: Job, result: GenerationResult, answer: LocalAnswer) -> TaskResponse:
    return TaskResponse(
        id=job.trace.id,
        task=job.trace.task or "",
        output=answer.output,
        text=result.text.strip(),
        finish_reason=finish_reason(result.finish_reason),
        adapter=job.target.adapter,
        usage=usage(result),
        latency_ms=round(result.total_ms, 2),
    )


def _logprobs(result: GenerationResult, job: Job) -> dict[str, Any] | None:
    if not result.token_logprobs or not job.gen.logprobs:
        return None
    return {"content": [{"logprob": lp} for lp in result.token_logprobs]}


class Chunks:
    """OpenAI stream chunks of one answer: ``chat.completion.chunk`` deltas or ``text_completion``
    pieces, all with the same id, model and creation time."""

    def __init__(self, response_id: str, model: str, *, chat: bool, created: int | None = None) -> None:
        self.chat = chat
        self.base = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created if created is not None else int(time.time()),
            "model": model,
        }

    def chunk(self, delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = (
            {"index": 0, "delta": delta, "finish_reason": finish}
            if self.chat
            else {"index": 0, "text": delta, "finish_reason": finish}
        )
        return {**self.base, "choices": [choice]}

    def role(self) -> bytes:
        return sse(self.chunk({"role": "assistant", "content": ""}))

    def text(self, text: str) -> bytes:
        return sse(self.chunk({"content": text} if self.chat else text))

    def tool_call(self, delta: CallDelta, ident: str) -> Iterator[bytes]:
        """A piece of one call as OpenAI streams it: the call's first chunk has its id, type, name
        and empty arguments; the next ones carry only pieces of its arguments."""
        if delta.name is not None:
            function = {"name": delta.name, "arguments": ""}
            first = {"index": delta.index, "id": ident, "type": "function", "function": function}
            yield sse(self.chunk({"tool_calls": [first]}))
        if delta.arguments:
            piece = {"index": delta.index, "function": {"arguments": delta.arguments}}
            yield sse(self.chunk({"tool_calls": [piece]}))

    def finished_tool_calls(self, calls: list[dict[str, Any]]) -> Iterator[bytes]:
        """Calls known only once the answer was finished: each call's arguments in one piece."""
        for index, call in enumerate(calls):
            function = call["function"]
            yield from self.tool_call(CallDelta(index, function["name"], function["arguments"]), call["id"])

    def finish(self, finish: str) -> bytes:
        return sse(self.chunk({} if self.chat else "", finish))

    def usage(self, value: Usage) -> bytes:
        return sse({**self.chunk({} if self.chat else ""), "choices": [], "usage": value.model_dump()})


async def replay_as_stream(response: dict[str, Any]) -> AsyncIterator[bytes]:
    """A finished (reviewed) chat answer sent as stream chunks: it could not be streamed live
    because it might still have been replaced by the remote's."""
    choice = response["choices"][0]
    message = choice["message"]
    chunks = Chunks(response["id"], response["model"], chat=True, created=response["created"])
    yield chunks.role()
    if message.get("tool_calls"):
        for data in chunks.finished_tool_calls(message["tool_calls"]):
            yield data
    elif message.get("content"):
        yield chunks.text(message["content"])
    yield chunks.finish(choice["finish_reason"])
    yield DONE
