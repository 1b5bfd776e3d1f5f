"""The assistant message a stream of chat-completion chunks adds up to.

A proxied stream is passed to the agent chunk by chunk; its trace (and the shadow pair made from
it) needs the whole answer: the text, and the tool calls whose ids, names and argument fragments
arrive spread over many deltas, keyed by their ``index``.
"""

from __future__ import annotations

from typing import Any


class AssembledMessage:
    """Feed it every chunk of choice 0; read ``message`` once the stream has ended."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text.append(delta["content"])
            for part in delta.get("tool_calls") or []:
                self._add_call(part)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _add_call(self, part: dict[str, Any]) -> None:
        call = self._calls.setdefault(
            part.get("index", len(self._calls)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if part.get("id"):
            call["id"] = part["id"]
        function = part.get("function") or {}
        # A name arrives whole in one delta (OpenAI, llama.cpp); some servers repeat it: keep one.
        if function.get("name") and not call["function"]["name"]:
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        return [self._calls[i] for i in sorted(self._calls)] or None

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message as a non-streaming response would have carried it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message
