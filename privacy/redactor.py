"""PII redaction before text leaves the device, and restoration of the answer that comes back.

Placeholders look like ``<EMAIL_1>``. Passing the same ``mapping`` to several calls keeps them
stable across the messages of one request: the same value always gets the same placeholder.
The mapping holds the originals, so it lives only in memory for that request. What is found is
``detectors.py``'s business.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field

from slm_agent.privacy.detectors import DEFAULT_KINDS, Kind, find_spans

__all__ = ["Redaction", "Redactor", "StreamRestorer"]

_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d+)>")
# The longest tail of a placeholder that a stream may have cut in two.
_PARTIAL_PLACEHOLDER = re.compile(r"<[A-Z0-9_]{0,40}$")


class Redaction(BaseModel):
    text: str = Field(description="The text with every detected value replaced by a placeholder.")
    mapping: dict[str, str] = Field(description="Placeholder -> original value; never persisted or synced.")
    counts: dict[str, int] = Field(description="Kind -> number of values replaced in this text.")


class Redactor:
    """Finds PII and secrets in text and swaps them for stable placeholders.

    ``extra_patterns`` maps a kind (``"employee_id"``) to a regex; those come first in priority
    and need no check.
    """

    def __init__(self, extra_patterns: dict[str, str] | None = None) -> None:
        extra = [Kind(kind, re.compile(p)) for kind, p in (extra_patterns or {}).items()]
        self._kinds: tuple[Kind, ...] = (*extra, *DEFAULT_KINDS)
        self._labels = [re.sub(r"[^A-Z0-9]+", "_", k.name.upper()).strip("_") or "PII" for k in self._kinds]

    # -- public API ------------------------------------------------------------------------------

    def redact(self, text: str, mapping: dict[str, str] | None = None) -> Redaction:
        mapping = {} if mapping is None else mapping
        counts: dict[str, int] = {}
        out = self._redact_into(text, _MappingState(mapping), counts)
        return Redaction(text=out, mapping=mapping, counts=counts)

    def restore(self, text: str, mapping: dict[str, str]) -> str:
        return restore(text, mapping)

    def redact_json(
        self, value: Any, mapping: dict[str, str] | None = None
    ) -> tuple[Any, dict[str, str], dict[str, int]]:
        """Redact every string value in nested dicts/lists; keys are structure and stay as they are."""
        mapping = {} if mapping is None else mapping
        counts: dict[str, int] = {}
        state = _MappingState(mapping)

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return self._redact_into(v, state, counts)
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [walk(x) for x in v]
            return v

        return walk(value), mapping, counts

    def find(self, text: str) -> list[tuple[int, int, int]]:
        """Non-overlapping (start, end, kind index) spans of this redactor's kinds in ``text``."""
        return find_spans(self._kinds, text)

    # -- internals -------------------------------------------------------------------------------

    def _redact_into(self, text: str, state: _MappingState, counts: dict[str, int]) -> str:
        spans = self.find(text)
        if not spans:
            return text
        parts: list[str] = []
        last = 0
        for start, end, index in spans:
            parts.append(text[last:start])
            parts.append(state.placeholder(self._labels[index], text[start:end]))
            name = self._kinds[index].name
            counts[name] = counts.get(name, 0) + 1
            last = end
        parts.append(text[last:])
        return "".join(parts)


class _MappingState:
    """Reverse lookup and next number per label over a caller's mapping, built once per call."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping
        self.by_value = {v: k for k, v in mapping.items()}
        self.next_n: dict[str, int] = {}
        for key in mapping:
            m = _PLACEHOLDER.fullmatch(key)
            if m:
                label, n = m.group(1), int(m.group(2))
                self.next_n[label] = max(self.next_n.get(label, 1), n + 1)

    def placeholder(self, label: str, value: str) -> str:
        existing = self.by_value.get(value)
        if existing is not None:
            return existing
        n = self.next_n.get(label, 1)
        self.next_n[label] = n + 1
        key = f"<{label}_{n}>"
        self.mapping[key] = value
        self.by_value[value] = key
        return key


class StreamRestorer:
    """Restores placeholders in streamed text, where a chunk may end halfway through one.

    ``feed`` returns what can be shown now and holds back a trailing ``<EMAIL`` until the next
    chunk completes or refutes it; ``flush`` returns whatever is left at the end.
    """

    def __init__(self, redactor: Redactor, mapping: dict[str, str]) -> None:
        self._redactor = redactor
        self._mapping = mapping
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        self._held = ""
        m = _PARTIAL_PLACEHOLDER.search(text)
        if m:
            self._held = text[m.start() :]
            text = text[: m.start()]
        return self._redactor.restore(text, self._mapping)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self._redactor.restore(text, self._mapping)


def restore(text: str, mapping: dict[str, str]) -> str:
    """Put the originals back for the placeholders ``mapping`` knows; others stay as they are."""
    if not mapping or "<" not in text:
        return text
    return _PLACEHOLDER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)
