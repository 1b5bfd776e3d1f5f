"""A scripted remote that answers the generated agent (``agent_sim.py``) correctly from known ground
truth, which no real server can do on demand: the loop's test needs a remote whose answers are
right by construction, and one whose answers change on cue (``drift``) so demotion can be shown.

It speaks OpenAI's ``/v1/chat/completions`` (plain and streamed, usage filled in) from uvicorn in a
background thread on a free loopback port. Each answer is recomputed from the request alone by the
generator's own rules (``agent_sim.ground_truth``); planning requests get a fixed multi-line plan.

    with Teacher() as teacher:
        client = openai.OpenAI(base_url=teacher.url, api_key="unused")
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import uvicorn
from agent_sim import ARTISTS, CITIES, LABELS, PLANNING, ROOMS, ground_truth
from faultserver import _chunk, _completion, _usage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PLAN = (
    "1. Clarify the goal, the deadline and the budget.\n"
    "2. List the tasks and the order they depend on.\n"
    "3. Put a date and an owner on each task.\n"
    "4. Do the riskiest task first and check progress every few days.\n"
    "5. Review the result and note what to change next time."
)
UNKNOWN = "I cannot help with that request."
_VOCAB = {"city": CITIES, "artist": ARTISTS, "room": ROOMS}
_PIECE = 8  # characters per streamed chunk: several chunks per answer, as a real stream has


def _shift(slot: str, value: Any) -> Any:
    """A drifted argument: the next value of its vocabulary (a number grows by 5)."""
    if isinstance(value, int):
        return value + 5
    vocab = _VOCAB.get(slot, ())
    return vocab[(vocab.index(value) + 1) % len(vocab)] if value in vocab else f"{value} (updated)"


def _drifted(subtask: str, expected: dict[str, Any]) -> dict[str, Any]:
    """The same request answered differently, as a remote model update might: shifted tool
    arguments, an upper-cased contact name, the next label."""
    if subtask == "pick_tool":
        calls = [
            {**c, "arguments": {k: _shift(k, v) for k, v in c["arguments"].items()}}
            for c in expected["tool_calls"]
        ]
        return {"tool_calls": calls}
    if subtask == "extract_contact":
        contact = json.loads(expected["content"])
        return {"content": json.dumps({**contact, "name": contact["name"].upper()})}
    if subtask == "classify_ticket":
        return {"content": LABELS[(LABELS.index(expected["content"]) + 1) % len(LABELS)]}
    return expected


def _call_id(name: str, arguments: str) -> str:
    return "call_" + hashlib.sha256(f"{name}:{arguments}".encode()).hexdigest()[:24]


def teacher_answer(body: dict[str, Any], *, drift: bool = False) -> dict[str, Any]:
    """The assistant message the teacher sends for ``body`` (drifted answers when ``drift``)."""
    found = ground_truth(body)
    if found is None:
        return {"role": "assistant", "content": UNKNOWN}
    subtask, expected = found
    if drift:
        expected = _drifted(subtask, expected)
    if "tool_calls" in expected:
        calls = []
        for call in expected["tool_calls"]:
            arguments = json.dumps(call["arguments"])
            calls.append(
                {
                    "id": _call_id(call["name"], arguments),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": arguments},
                }
            )
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": PLAN if subtask == PLANNING else expected["content"]}


def _text_of(message: dict[str, Any]) -> str:
    """What the answer's completion tokens are counted on."""
    calls = message.get("tool_calls") or []
    return message.get("content") or " ".join(c["function"]["arguments"] for c in calls)


def completion(body: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed chat.completion carrying ``message``."""
    out = _completion(body, _text_of(message))
    out["id"] = "chatcmpl-teacher"
    out["choices"][0].update(
        message=message, finish_reason="tool_calls" if message.get("tool_calls") else "stop"
    )
    return out


def _event(body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {**_chunk(body, "", finish), "id": "chatcmpl-teacher", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


def _pieces(text: str) -> list[str]:
    return [text[i : i + _PIECE] for i in range(0, len(text), _PIECE)]


def chunks(body: dict[str, Any], message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The streamed form of ``message``: role, then content or tool-call pieces, then the finish
    reason and, when asked for, usage (OpenAI's chunk order)."""
    calls = message.get("tool_calls") or []
    yield _event(body, {"role": "assistant", "content": None if calls else ""}, None)
    for index, call in enumerate(calls):
        fn = call["function"]
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": fn["name"], "arguments": ""},
        }
        yield _event(body, {"tool_calls": [head]}, None)
        for piece in _pieces(fn["arguments"]):
            yield _event(body, {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None)
    for piece in _pieces(message.get("content") or ""):
        yield _event(body, {"content": piece}, None)
    yield _event(body, {}, "tool_calls" if calls else "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**_event(body, {}, None), "choices": [], "usage": _usage(body, _text_of(message))}


def _sse(body: dict[str, Any], message: dict[str, Any]) -> Iterator[str]:
    for event in chunks(body, message):
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


class Teacher:
    """The scripted remote as a context manager; ``calls`` counts requests per subtask ("unknown"
    for requests that are not the agent's), ``requests`` keeps every body as received (what a
    redacting proxy let through). ``latency_s`` delays each answer, as a real remote's network and
    generation time would, so local and remote latencies compare as they would in use."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.latency_s = latency_s
        self.url = ""
        self._drift = False
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="teacher", daemon=True)

    def drift(self, on: bool = True) -> None:
        """From now on, answer the subtasks differently (or, with ``on=False``, correctly again)."""
        self._drift = on

    def __enter__(self) -> Teacher:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the teacher's server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        found = ground_truth(body)
        self.calls[found[0] if found else "unknown"] += 1
        message = teacher_answer(body, drift=self._drift)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if body.get("stream"):
            return StreamingResponse(_sse(body, message), media_type="text/event-stream")
        return JSONResponse(completion(body, message))
