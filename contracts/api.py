"""Request and response bodies of the HTTP API, with OpenAI's field names."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slm_agent.contracts.clock import new_id


class _Lenient(BaseModel):
    # OpenAI clients send fields we do not act on (user, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class SamplingFields(_Lenient):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported: one engine, one answer.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | None = None
    adapter_scale: float | None = Field(
        None,
        ge=0,
        le=4,
        description="slm-agent extension: LoRA scale for this request (default: the task's, or 1).",
    )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str


class TaskRequest(_Lenient):
    """The task API: input in, typed output out."""

    input: str | dict[str, Any] = Field(description="The text (or JSON object) the task works on.")
    tools: list[dict[str, Any]] | None = Field(None, description="tool_call tasks: the tools to choose from.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("call"))
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TaskResponse(BaseModel):
    id: str
    task: str
    output: Any = Field(description="Parsed output: a JSON value, a label, a tool call, or text.")
    text: str = Field(description="The raw answer text.")
    finish_reason: str
    route: str = "local"
    adapter: str | None = None
    usage: Usage
    latency_ms: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "slm-agent"
    kind: Literal["base", "adapter", "task"]
    loaded: bool = True
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoad(BaseModel):
    name: str = Field(description="Adapter name in the model store.")


class TaskPolicy(BaseModel):
    routing: Literal["local", "remote", "auto"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``, in JSON and in SSE alike."""
    return {"error": ErrorBody(message=message, type=error_type, param=param, code=code).model_dump()}
