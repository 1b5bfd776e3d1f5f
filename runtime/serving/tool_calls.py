"""Reading tool calls out of a grammar-held answer, as its text comes and once it is finished.

The answer is what ``grammars.tool_call_grammar`` and ``grammars.task_grammar`` admit: one call
``{"name": ..., "arguments": {...}}``, several calls one per line after the task's output label,
or a JSON array of calls. A call's arguments are the text the model wrote (not re-serialized), so
the pieces streamed while it is generated add up to the arguments of the finished answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slm_agent.errors import SchemaError


def call_id(trace_id: str, index: int) -> str:
    """The id of a local answer's ``index``-th call: derived from its trace, so the streamed
    chunks, the finished answer and the trace all name a call alike."""
    return f"call_{trace_id.removeprefix('tr_')}_{index}"


def read_calls(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """A finished answer's calls: see ``CallReader.calls``."""
    reader = CallReader()
    reader.feed(text)
    return reader.calls()


@dataclass
class CallDelta:
    """What a stream chunk carries of one call: its name on the call's first delta, then pieces
    of its arguments."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class _Call:
    start: int
    end: int | None = None
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    args_kind: str = ""  # "{", "[", '"' or "" (a bare number, true, false, null)
    named: bool = False  # its first delta (the name) went out
    sent: int = 0  # how much of its arguments went out


class CallReader:
    """A JSON scanner that follows only what a call stream needs: where each call object opens
    and closes, its ``name`` string, and where its ``arguments`` value starts and ends."""

    def __init__(self) -> None:
        self.text = ""
        self._calls: list[_Call] = []
        self._depth = 0  # containers open before the next character
        self._call_depth = 0  # the depth calls open at: 1 inside a top-level array
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._expect_key = True
        self._key: str | None = None

    def feed(self, text: str) -> list[CallDelta]:
        """Scan ``text`` (the answer's next piece); the deltas it completes, in call order."""
        start = len(self.text)
        self.text += text
        for i in range(start, len(self.text)):
            self._scan(i, self.text[i])
        return self._deltas()

    def calls(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The finished answer's calls as (name, arguments text, the call as JSON); a SchemaError
        when the answer is not a sequence of whole calls."""
        head = self.text[: self._calls[0].start] if self._calls else self.text
        if not self._calls or head.strip() not in ("", "["):
            raise SchemaError(f"the model's answer is not a tool call: {self.text.strip()[:200]!r}")
        found = []
        for call in self._calls:
            span = self.text[call.start : call.end] if call.end is not None else self.text[call.start :]
            try:
                value = json.loads(span)
            except json.JSONDecodeError as exc:
                raise SchemaError(f"the model's answer is not valid JSON ({exc}): {span[:200]!r}") from exc
            if not isinstance(value, dict) or not isinstance(value.get("name"), str) or call.args_end is None:
                raise SchemaError(f"the model's call has no name and arguments: {span[:200]!r}")
            assert call.args_start is not None  # an end implies a start
            found.append((value["name"], self.text[call.args_start : call.args_end], value))
        return found

    # -- scanning ----------------------------------------------------------------------------------
    def _scan(self, i: int, c: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                self._string_closed(i)
            return
        at_call = self._depth == self._call_depth + 1  # directly inside a call object
        if c == '"':
            self._in_string, self._string_start = True, i
            if at_call and not self._expect_key:
                self._value_opens(i, c)
        elif c in "{[":
            if self._depth == 0 and c == "[":
                self._call_depth = 1
            elif self._depth == self._call_depth and c == "{":
                self._calls.append(_Call(start=i))
                self._expect_key, self._key = True, None
            elif at_call and not self._expect_key:
                self._value_opens(i, c)
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == self._call_depth + 1 and not self._expect_key:
                self._value_closes(i + 1)  # a container value of the call closed
            elif self._depth == self._call_depth and c == "}" and self._calls:
                self._primitive_closes(i)
                self._calls[-1].end = i + 1
        elif at_call and c == ":":
            self._expect_key = False
        elif at_call and c == ",":
            self._primitive_closes(i)
            self._expect_key, self._key = True, None
        elif at_call and not self._expect_key and not c.isspace():
            self._value_opens(i, "")

    def _string_closed(self, i: int) -> None:
        if self._depth != self._call_depth + 1 or not self._calls:
            return
        text = json.loads(self.text[self._string_start : i + 1])
        if self._expect_key:
            self._key = text
            return
        call = self._calls[-1]
        if self._key == "name" and call.name is None:
            call.name = text
        self._value_closes(i + 1)

    def _value_opens(self, i: int, kind: str) -> None:
        call = self._calls[-1]
        if self._key == "arguments" and call.args_start is None:
            call.args_start, call.args_kind = i, kind

    def _value_closes(self, end: int) -> None:
        call = self._calls[-1]
        if self._key == "arguments" and call.args_start is not None and call.args_end is None:
            call.args_end = end

    def _primitive_closes(self, i: int) -> None:
        """A bare number, true, false or null ends at the ``,`` or ``}`` after it."""
        call = self._calls[-1] if self._calls else None
        if (
            call is not None
            and call.args_kind == ""
            and call.args_start is not None
            and call.args_end is None
        ):
            call.args_end = len(self.text[:i].rstrip())

    def _deltas(self) -> list[CallDelta]:
        deltas = []
        for index, call in enumerate(self._calls):
            if call.name is None:
                continue  # its arguments wait for its name (a grammar may put them first)
            delta = CallDelta(index)
            if not call.named:
                call.named, delta.name = True, call.name
            if call.args_start is not None and (call.args_kind or call.args_end is not None):
                upto = call.args_end if call.args_end is not None else len(self.text)
                delta.arguments = self.text[call.args_start + call.sent : upto]
                call.sent = upto - call.args_start
            if delta.name is not None or delta.arguments:
                deltas.append(delta)
        return deltas
