"""A chat completion chunk stream (local or a remote's, as SSE bytes) as the Responses API's
stream events, in the order and shape the ``openai`` SDK accumulates into a final response.

    response.created, response.in_progress
    per output item: output_item.added, then
      text:  content_part.added, output_text.delta..., output_text.done, content_part.done
      call:  function_call_arguments.delta..., function_call_arguments.done
    output_item.done
    response.completed (response.incomplete when cut at max_output_tokens; error + response.failed)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from slm_agent.contracts.responses_api import FunctionCall, OutputMessage, OutputText, ResponseObject
from slm_agent.runtime.responses_api.convert import finished


async def chat_chunks(stream: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON of each ``data:`` event, however the bytes were split; ``[DONE]`` ends it.

    The source is still read to its end after ``[DONE]``: a local answer's stream left open there
    is closed later as if its client had gone, and traced a second time as abandoned (499)."""
    buffer = b""
    done = False
    async for piece in stream:
        buffer += piece
        while not done and b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.decode().splitlines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                yield json.loads(payload)


class _Events:
    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def response_events(
    chunks: AsyncIterator[bytes], base: ResponseObject, on_finished: Callable[[ResponseObject], None]
) -> AsyncIterator[bytes]:
    """Translate as the chunks arrive; ``on_finished`` gets the final response (to store it)
    before the last event is sent."""
    event = _Events()
    yield event("response.created", response=base.model_dump())
    yield event("response.in_progress", response=base.model_dump())
    output: list[OutputMessage | FunctionCall] = []
    message: OutputMessage | None = None
    calls: dict[int, FunctionCall] = {}
    finish: str | None = None
    usage: dict[str, Any] | None = None

    def index_of(item: OutputMessage | FunctionCall) -> int:
        return next(i for i, o in enumerate(output) if o is item)

    def close_message() -> list[bytes]:
        assert message is not None
        i, part = index_of(message), message.content[0]
        message.status = "incomplete" if finish == "length" else "completed"
        ids = {"item_id": message.id, "output_index": i}
        return [
            event("response.output_text.done", **ids, content_index=0, text=part.text, logprobs=[]),
            event("response.content_part.done", **ids, content_index=0, part=part.model_dump()),
            event("response.output_item.done", output_index=i, item=message.model_dump()),
        ]

    async for chunk in chat_chunks(chunks):
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            yield event(
                "error", code=error.get("code"), message=error.get("message", ""), param=error.get("param")
            )
            failed = base.model_copy(
                update={
                    "status": "failed",
                    "output": output,
                    "error": {
                        "code": error.get("code") or "server_error",
                        "message": error.get("message", ""),
                    },
                }
            )
            yield event("response.failed", response=failed.model_dump())
            return
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            finish = choice.get("finish_reason") or finish
            if delta.get("content"):
                if message is None:
                    message = OutputMessage(status="in_progress", content=[])
                    output.append(message)
                    i = len(output) - 1
                    yield event("response.output_item.added", output_index=i, item=message.model_dump())
                    message.content.append(OutputText(text=""))
                    yield event(
                        "response.content_part.added",
                        item_id=message.id,
                        output_index=i,
                        content_index=0,
                        part=message.content[0].model_dump(),
                    )
                message.content[0].text += delta["content"]
                yield event(
                    "response.output_text.delta",
                    item_id=message.id,
                    output_index=index_of(message),
                    content_index=0,
                    delta=delta["content"],
                    logprobs=[],
                )
            for piece in delta.get("tool_calls") or []:
                fn = piece.get("function") or {}
                call = calls.get(piece.get("index", 0))
                if call is None:
                    call = FunctionCall(
                        call_id=piece.get("id") or "",
                        name=fn.get("name") or "",
                        arguments="",
                        status="in_progress",
                    )
                    calls[piece.get("index", 0)] = call
                    output.append(call)
                    yield event(
                        "response.output_item.added", output_index=len(output) - 1, item=call.model_dump()
                    )
                if fn.get("arguments"):
                    call.arguments += fn["arguments"]
                    yield event(
                        "response.function_call_arguments.delta",
                        item_id=call.id,
                        output_index=index_of(call),
                        delta=fn["arguments"],
                    )
    if message is not None:
        for data in close_message():
            yield data
    for call in calls.values():
        i = index_of(call)
        call.status = "completed"
        yield event(
            "response.function_call_arguments.done", item_id=call.id, output_index=i, arguments=call.arguments
        )
        yield event("response.output_item.done", output_index=i, item=call.model_dump())
    if message is None and not calls:  # an empty answer is still one (empty) message, as in a body
        message = OutputMessage(status="in_progress", content=[OutputText(text="")])
        output.append(message)
        yield event(
            "response.output_item.added", output_index=0, item={**message.model_dump(), "content": []}
        )
        yield event(
            "response.content_part.added",
            item_id=message.id,
            output_index=0,
            content_index=0,
            part=message.content[0].model_dump(),
        )
        for data in close_message():
            yield data
    final = finished(base, output, finish, usage)
    on_finished(final)
    kind = "response.incomplete" if final.status == "incomplete" else "response.completed"
    yield event(kind, response=final.model_dump())
