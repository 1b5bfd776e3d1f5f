"""A scripted remote that runs a two-tool weather agent's loop from known ground truth: the agent
framework tests need a remote whose calls and final answer are right by construction, which no real
model gives on demand (the bundled 270M base cannot plan a two-step tool loop).

Each answer is recomputed from the chat request alone:

1. no tool result yet: call ``get_weather`` for the city the user named;
2. after its result (degrees Celsius): call ``to_fahrenheit`` with those degrees;
3. after that result: the final text, ``FINAL.format(...)`` of the city and both results.

It is the teacher's server (``teacher.Teacher``: uvicorn on a free loopback port, plain and
streamed chat completions, every request body kept), answering this script instead.

    with ToolRemote() as remote:
        provider("scripted", remote.url, [REMOTE_MODEL])
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from teacher import UNKNOWN, Teacher, _call_id, _sse, completion

REMOTE_MODEL = "gpt-4o"
CITIES = ("Paris", "Oslo", "Lima")
WEATHER_C = {"Paris": 18, "Oslo": -3, "Lima": 24}  # what the tests' get_weather returns
FINAL = "In {city} it is {celsius} °C, which is {fahrenheit} °F."


def fahrenheit(celsius: float) -> float:
    """What the tests' to_fahrenheit returns, rounded so the text is stable."""
    return round(celsius * 9 / 5 + 32, 1)


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    args = json.dumps(arguments)
    call = {"id": _call_id(name, args), "type": "function", "function": {"name": name, "arguments": args}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _results(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Tool name -> the output the agent sent back for it."""
    names = {
        call["id"]: call["function"]["name"]
        for m in messages
        if m.get("role") == "assistant"
        for call in m.get("tool_calls") or []
    }
    return {
        names.get(m.get("tool_call_id"), "?"): str(m.get("content"))
        for m in messages
        if m.get("role") == "tool"
    }


def script(body: dict[str, Any]) -> dict[str, Any]:
    """The assistant message for this point of the loop."""
    messages = body.get("messages") or []
    offered = {(t.get("function") or {}).get("name") for t in body.get("tools") or []}
    users = " ".join(str(m.get("content")) for m in messages if m.get("role") == "user")
    city = next((c for c in CITIES if c in users), None)
    if city is None or not {"get_weather", "to_fahrenheit"} <= offered:
        return {"role": "assistant", "content": UNKNOWN}
    results = _results(messages)
    if "get_weather" not in results:
        return _call("get_weather", {"city": city})
    celsius = float(results["get_weather"])
    if "to_fahrenheit" not in results:
        return _call("to_fahrenheit", {"celsius": celsius})
    text = FINAL.format(city=city, celsius=celsius, fahrenheit=results["to_fahrenheit"])
    return {"role": "assistant", "content": text}


class ToolRemote(Teacher):
    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        message = script(body)
        if body.get("stream"):
            return StreamingResponse(_sse(body, message), media_type="text/event-stream")
        return JSONResponse(completion(body, message))
