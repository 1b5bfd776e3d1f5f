"""Responses request -> chat completion request, and chat completion -> response object."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from slm_agent.contracts.api import ChatCompletionRequest, ResponseFormat
from slm_agent.contracts.responses_api import (
    FunctionCall,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputMessage,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
)
from slm_agent.errors import BadRequestError

ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


def conversation(req: ResponseRequest, previous: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The items this response answers: the previous response's conversation and output, then
    this request's input (the previous instructions are not carried over, as OpenAI does)."""
    if isinstance(req.input, str):
        new: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": req.input}]
    else:
        new = [item.model_dump(exclude_none=True) for item in req.input]
    return [*(previous or []), *new]


def chat_request(req: ResponseRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    for item in ITEMS.validate_python(items):
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": _content(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            # Parallel calls (and a text preamble) are one assistant turn in chat's shape.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _content(item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    if not messages:
        raise BadRequestError("input is empty: send a text or input items", param="input")
    fields = {
        "model": req.model,
        "messages": messages,
        "tools": [_chat_tool(t.model_dump(exclude_none=True)) for t in req.tools] if req.tools else None,
        "tool_choice": _chat_tool_choice(req),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req),
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": req.stream or None,
        "stream_options": {"include_usage": True} if req.stream else None,
    }
    # Only what was asked is set: a proxied request passes on the fields set, and a remote may
    # refuse an explicit null.
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        # Chat's own rules (a tool_choice needs tools) hold here too: the client's error, not ours.
        first = exc.errors()[0]
        field = (first.get("ctx") or {}).get("field")
        raise BadRequestError(f"{field + ': ' if field else ''}{first['msg']}", param=field) from None


def started(req: ResponseRequest) -> ResponseObject:
    """The response before any output: what ``response.created`` carries, and what a finished one
    echoes of its request."""
    return ResponseObject(
        status="in_progress",
        model=req.model,
        instructions=req.instructions,
        tools=req.tools or [],
        tool_choice=req.tool_choice or "auto",
        parallel_tool_calls=req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        temperature=req.temperature,
        top_p=req.top_p,
        max_output_tokens=req.max_output_tokens,
        previous_response_id=req.previous_response_id,
        metadata=req.metadata or {},
        text=req.text.model_dump(exclude_none=True)
        if req.text and req.text.format
        else {"format": {"type": "text"}},
        store=req.store,
    )


def finished(
    base: ResponseObject,
    output: list[OutputMessage | FunctionCall],
    finish: str | None,
    usage: dict[str, Any] | None,
) -> ResponseObject:
    cut = finish == "length"
    return base.model_copy(
        update={
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": output,
            "usage": response_usage(usage),
        }
    )


def from_chat(base: ResponseObject, completion: dict[str, Any]) -> ResponseObject:
    """A chat completion body (local or a remote's) as a response object."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    output: list[OutputMessage | FunctionCall] = []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        status = "incomplete" if finish == "length" else "completed"
        output.append(OutputMessage(status=status, content=[OutputText(text=message.get("content") or "")]))
    for call in calls:
        fn = call.get("function") or {}
        output.append(
            FunctionCall(call_id=call["id"], name=fn.get("name", ""), arguments=fn.get("arguments") or "")
        )
    return finished(base, output, finish, completion.get("usage"))


def response_usage(usage: dict[str, Any] | None) -> ResponseUsage | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return ResponseUsage(
        input_tokens=prompt,
        input_tokens_details={"cached_tokens": cached},
        output_tokens=completion,
        total_tokens=prompt + completion,
    )


def _content(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Responses content parts as chat's: text parts joined into one string, images as image_url."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image" and part.get("image_url"):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise BadRequestError(
                f"content part type {kind!r} is not supported here: send input_text (or input_image by URL)",
                param="input",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _chat_tool_choice(req: ResponseRequest) -> str | dict[str, Any] | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(req: ResponseRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text else None
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return ResponseFormat(type="json_schema", json_schema=schema)
    raise BadRequestError(f"text.format type {fmt.get('type')!r} is not supported", param="text.format")
