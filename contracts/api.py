"""Request and response bodies of the HTTP API, with OpenAI's field names."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from slm_agent.contracts.clock import new_id

# Seeds, sequence numbers: what SQLite and the engine can hold.
INT64_MAX = 2**63 - 1


def invalid_unicode_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in ``value`` that is not valid Unicode.

    JSON may escape a lone surrogate ("\\ud800"); such text cannot be encoded for the tokenizer,
    the trace store or the answer, so a request carrying one is refused up front, naming the field.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and invalid_unicode_field(key) is not None:
                return path or "body"
            found = invalid_unicode_field(item, where)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = invalid_unicode_field(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


class RequestBody(BaseModel):
    """A body a client sends: its text must be valid Unicode, checked once over the raw JSON."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        field = invalid_unicode_field(data)
        if field is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "text that is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text",
                {"field": field},
            )
        return data


class _Lenient(BaseModel):
    # OpenAI clients send fields we do not act on (user, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="allow")


class _LenientRequest(RequestBody, _Lenient):
    """A top-level body: lenient about extra fields, strict about its text (checked once, here)."""


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


class SamplingFields(_LenientRequest):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported: one engine, one answer.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="OpenAI's range; only the sampled token's is returned."
    )
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
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = Field(
        True,
        description="OpenAI's: several tool calls in one answer (the default), or at most one. A model "
        "whose call syntax holds one call answers with one either way.",
    )
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _tool_choice_has_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return self
        if not self.tools:
            raise PydanticCustomError(
                "tool_choice_without_tools",
                "tool_choice asks for a tool call but the request has no tools; send tools or drop tool_choice",
                {"field": "tool_choice"},
            )
        if isinstance(choice, dict):
            names = {(t.get("function") or {}).get("name") for t in self.tools}
            wanted = (choice.get("function") or {}).get("name")
            if wanted not in names:
                raise PydanticCustomError(
                    "tool_choice_unknown_tool",
                    "tool_choice names a function that is not among the request's tools",
                    {"field": "tool_choice"},
                )
        return self


class CompletionRequest(SamplingFields):
    prompt: str


class TaskRequest(_LenientRequest):
    """The task API: input in, typed output out."""

    input: str | dict[str, Any] = Field(description="The text (or JSON object) the task works on.")
    tools: list[dict[str, Any]] | None = Field(None, description="tool_call tasks: the tools to choose from.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)


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
    kind: Literal["base", "adapter", "task", "embedding"]
    loaded: bool = True
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoad(RequestBody):
    name: str = Field(description="Adapter name in the model store.")


class TaskPolicy(RequestBody):
    routing: Literal["local", "remote", "auto"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every 4xx and 5xx of the API answers with this body."""

    error: ErrorBody


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``, in JSON and in SSE alike."""
    return ErrorResponse(
        error=ErrorBody(message=message, type=error_type, param=param, code=code)
    ).model_dump()


class Health(BaseModel):
    """``GET /healthz``: 200 once the model serves, 503 (same body) while starting, loading or failed.
    A daemon still building its services knows only its status."""

    status: Literal["starting", "loading", "ok", "failed"]
    model: str | None = None
    adapters: list[str] | None = None
    queue_depth: int | None = None
    error: str | None = Field(None, description="Why the model failed to load.")


class AdapterLoaded(BaseModel):
    name: str
    loaded: Literal[True] = True
    tasks: list[str] = Field(description="Tasks now served by this adapter.")
    adapters: list[str] = Field(description="Every adapter loaded now.")


class AdapterUnloaded(BaseModel):
    name: str
    loaded: Literal[False] = False
    unbound: list[str] = Field(description="Tasks that fell back to the base model or the remote.")
    adapters: list[str] = Field(description="Every adapter still loaded.")


class RunStarted(BaseModel):
    """``POST /v1/agent/runs`` without ``wait``: the run goes on; follow it at ``events``."""

    id: str
    status: Literal["running"] = "running"
    events: str = Field(description="The run's server-sent events URL.")
