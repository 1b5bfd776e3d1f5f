"""PII redaction before text leaves the device, and restoration of the answer that comes back.

One combined regex finds every candidate in a single pass; candidates whose shape alone is not
proof (cards, IBANs, phones, IPs, opaque tokens) go through a cheap check (Luhn, mod-97, digit
counts, ``ipaddress``, entropy) so ordinary numbers, dates and words are left alone.

Placeholders look like ``<EMAIL_1>``. Passing the same ``mapping`` to several calls keeps them
stable across the messages of one request: the same value always gets the same placeholder.
The mapping holds the originals, so it lives only in memory for that request.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["DEFAULT_KINDS", "SECRET_SHAPE", "Redaction", "Redactor", "StreamRestorer"]


class Redaction(BaseModel):
    text: str = Field(description="The text with every detected value replaced by a placeholder.")
    mapping: dict[str, str] = Field(description="Placeholder -> original value; never persisted or synced.")
    counts: dict[str, int] = Field(description="Kind -> number of values replaced in this text.")


# -- the kinds ------------------------------------------------------------------------------------
# Python's regex engine has no fast scan for a character class, so one big alternation costs more
# than a few small passes: each kind is its own pattern, led by a literal or a narrow class where
# possible, skipped entirely when a cheap test (``"@" in text``) rules it out, and its boundary
# rules are checked in Python only on the rare candidate.


@dataclass(frozen=True)
class _Kind:
    name: str
    pattern: re.Pattern[str] | _EmailFinder | _Ipv6Finder
    # (text, start, end) -> accepted end, or None to drop the candidate.
    check: Callable[[str, int, int], int | None] | None = None
    gate: Callable[[str], bool] | None = None
    # Numeric kinds (cards, IPv4, phones) are only looked for inside runs of digits and separators.
    numeric: bool = False


def _not_after(chars: str) -> Callable[[str, int], bool]:
    bad = frozenset(chars)
    return lambda text, start: start == 0 or text[start - 1] not in bad


_WORDISH = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
_WORD_SET = frozenset(_WORDISH)
_DIGITS = re.compile(r"\d")
# Digits with the separators phones, cards and IPs use; a space only when more digits follow.
_NUMERIC_RUN = re.compile(r"[+(]?\d(?:[\d().\-/]| (?=[\d(+]))*")
_MIN_NUMERIC_RUN = 7  # "1.2.3.4"
_DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")
_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d+)>")
# The longest tail of a placeholder that a stream may have cut in two.
_PARTIAL_PLACEHOLDER = re.compile(r"<[A-Z0-9_]{0,40}$")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes (Visa, Mastercard, Amex, Diners, JCB, Discover, UnionPay): a Luhn-valid order
# number that starts with none of them is not a card.
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[0-9]|6[0-9]")
_card_boundary = _not_after(_WORDISH + ".,-")


def _check_card(text: str, start: int, end: int) -> int | None:
    if not _card_boundary(text, start):
        return None
    digits = text[start:end].replace(" ", "").replace("-", "")
    ok = 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) is not None and _luhn(digits)
    return end if ok else None


_IBAN_LETTERS = {ord(ch): str(10 + i) for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}


def _iban_ok(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = (compact[4:] + compact[:4]).translate(_IBAN_LETTERS)
    return rearranged.isdigit() and int(rearranged) % 97 == 1


_iban_boundary = _not_after(_WORDISH)


def _check_iban(text: str, start: int, end: int) -> int | None:
    """The end of the longest valid IBAN at ``start``, shedding trailing groups a greedy match may
    have swallowed (an uppercase word right after the IBAN)."""
    if not _iban_boundary(text, start):
        return None
    candidate = text[start:end]
    while True:
        if _iban_ok(candidate.replace(" ", "")):
            return start + len(candidate)
        cut = candidate.rfind(" ")
        if cut <= 4:
            return None
        candidate = candidate[:cut]


_ipv4_boundary = _not_after(_WORDISH + ".")


def _check_ipv4(text: str, start: int, end: int) -> int | None:
    if not _ipv4_boundary(text, start):
        return None
    if any(int(octet) > 255 or (len(octet) > 1 and octet[0] == "0") for octet in text[start:end].split(".")):
        return None
    return end


_ipv6_boundary = _not_after(_WORDISH + ":.")


def _check_ipv6(text: str, start: int, end: int) -> int | None:
    value = text[start:end]
    # "::1", "a::b" (C++ scopes, Rust paths) are too short to be worth hiding or to be addresses.
    if not _ipv6_boundary(text, start) or sum(ch in _HEX for ch in value) < 4:
        return None
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return None
    return end


_phone_boundary = _not_after(_WORDISH + "+/.-")


def _check_phone(text: str, start: int, end: int) -> int | None:
    if not _phone_boundary(text, start) or (end < len(text) and text[end] in _WORD_SET):
        return None
    if start >= 2 and text[start - 1] == " " and text[start - 2].isdigit():
        return None  # the tail of a bigger spaced-out number ("8 000 000 000")
    value = text[start:end]
    n = len(_DIGITS.findall(value))
    if value[0] == "+":
        return end if 8 <= n <= 15 else None
    if _DATE.fullmatch(value):
        return None
    return end if 9 <= n <= 12 else None


# Credentials known by their prefix: the one list. The sync scrubber (``runtime/scrub.py``) removes
# exactly these, so the two cannot drift; the boundaries live in the pattern so its ``sub`` keeps them.
SECRET_SHAPE = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    r"sk-[A-Za-z0-9_\-]{16,}"  # OpenAI, Anthropic (sk-proj-, sk-ant-)
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|A(?:KIA|SIA)[0-9A-Z]{16}"  # AWS access key id
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
    r")(?![A-Za-z0-9_-])"
)


_token_boundary = _not_after(_WORDISH + "+/=.-")


def _check_token(text: str, start: int, end: int) -> int | None:
    value = text[start:end]
    if not _token_boundary(text, start) or value.count("/") > 2:
        return None  # inside something longer, or a path
    has_digit = has_upper = has_lower = False
    for ch in value:
        if ch.isdigit():
            has_digit = True
        elif ch.isupper():
            has_upper = True
        elif ch.islower():
            has_lower = True
    # Pure hex (commit SHAs, UUIDs) and lowercase words are everyday text, not keys.
    if not (has_digit and has_upper and has_lower):
        return None
    n = len(value)
    entropy = -sum(c / n * math.log2(c / n) for c in Counter(value).values())
    return end if entropy >= 3.5 else None


_EMAIL_LOCAL = frozenset(_WORDISH + ".%+-")
_EMAIL_REST = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])"
)


class _EmailFinder:
    """Emails found from their "@" outwards: scanning every word for a local part is the slowest
    thing a regex can do here, and "@" is rare."""

    pattern = "@"

    def finditer(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        at = text.find("@")
        while at > 0:
            start = at
            while start > 0 and at - start < 64 and text[start - 1] in _EMAIL_LOCAL:
                start -= 1
            while start < at and not text[start].isalnum():
                start += 1
            m = _EMAIL_REST.match(text, at)
            if m and start < at:
                spans.append((start, m.end()))
                at = text.find("@", m.end())
            else:
                at = text.find("@", at + 1)
        return spans


_EMAIL = _EmailFinder()

_HEX = frozenset("0123456789abcdefABCDEF")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f:]")
_IPV6_SHAPE = re.compile(r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


class _Ipv6Finder:
    """IPv6 candidates found from a colon outwards (a literal the regex engine scans for fast);
    ``ipaddress`` then decides."""

    pattern = ":"

    def finditer(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        hint = _IPV6_HINT.search(text)
        while hint is not None:
            start = hint.start()
            while start > 0 and hint.start() - start < 4 and text[start - 1] in _HEX:
                start -= 1
            m = _IPV6_SHAPE.match(text, start)
            if m and m.end() > hint.end():
                spans.append(m.span())
                hint = _IPV6_HINT.search(text, m.end())
            else:
                hint = _IPV6_HINT.search(text, hint.start() + 1)
        return spans


_IPV6 = _Ipv6Finder()


def _has(chars: str) -> Callable[[str], bool]:
    return lambda text: chars in text


def _has_match(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern)
    return lambda text: compiled.search(text) is not None


# Priority order: where two candidates start at the same place, the earlier kind wins.
DEFAULT_KINDS: tuple[_Kind, ...] = (
    _Kind("secret", SECRET_SHAPE),
    # The token only; "Bearer " stays so the remote model still sees what it was.
    _Kind("secret", re.compile(r"(?<=earer )[A-Za-z0-9._~+/\-]{16,}=*"), None, _has("earer ")),
    _Kind("email", _EMAIL, None, _has("@")),
    _Kind(
        "iban",
        re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"),
        _check_iban,
    ),
    _Kind("card", re.compile(r"\d(?:[ -]?\d){12,18}(?![\d.,]?\d)"), _check_card, numeric=True),
    _Kind("ip", re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\.?\d)"), _check_ipv4, numeric=True),
    _Kind("ip", _IPV6, _check_ipv6),
    _Kind(
        "phone",
        re.compile(
            r"\+[1-9]\d{0,2}(?:[ .\-]?\(?\d{1,4}\)?){2,6}(?!\w)"
            r"|(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?!\w)"
            r"|\(?0[1-9]\d{0,3}\)?(?:[ .\-/]\d{2,4}){1,4}(?!\w)"
        ),
        _check_phone,
        numeric=True,
    ),
    # Opaque tokens with no known prefix: long runs of mixed letters and digits, judged by entropy.
    _Kind("secret", re.compile(r"[A-Za-z0-9_\-+/]{24,}={0,2}(?![\w+/=-])"), _check_token),
)


class Redactor:
    """Finds PII and secrets in text and swaps them for stable placeholders.

    ``extra_patterns`` maps a kind (``"employee_id"``) to a regex; those come first in priority
    and need no check.
    """

    def __init__(self, extra_patterns: dict[str, str] | None = None) -> None:
        extra = [_Kind(kind, re.compile(p)) for kind, p in (extra_patterns or {}).items()]
        self._kinds: tuple[_Kind, ...] = (*extra, *DEFAULT_KINDS)
        self._labels = [re.sub(r"[^A-Z0-9]+", "_", k.name.upper()).strip("_") or "PII" for k in self._kinds]

    # -- public API ------------------------------------------------------------------------------

    def redact(self, text: str, mapping: dict[str, str] | None = None) -> Redaction:
        mapping = {} if mapping is None else mapping
        counts: dict[str, int] = {}
        out = self._redact_into(text, _MappingState(mapping), counts)
        return Redaction(text=out, mapping=mapping, counts=counts)

    def restore(self, text: str, mapping: dict[str, str]) -> str:
        if not mapping or "<" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

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
        """Non-overlapping (start, end, kind index) spans, leftmost first, priority on ties."""
        spans: list[tuple[int, int, int]] = []
        runs: list[tuple[int, int]] | None = None
        for priority, kind in enumerate(self._kinds):
            if kind.gate is not None and not kind.gate(text):
                continue
            pattern = kind.pattern
            if not isinstance(pattern, re.Pattern):
                # The finders scan the whole text; only regex kinds are numeric.
                candidates = pattern.finditer(text)
            elif kind.numeric:
                if runs is None:
                    runs = [
                        m.span()
                        for m in _NUMERIC_RUN.finditer(text)
                        if m.end() - m.start() >= _MIN_NUMERIC_RUN
                    ]
                candidates = [m.span() for s, e in runs for m in pattern.finditer(text, s, e)]
            else:
                candidates = [m.span() for m in pattern.finditer(text)]
            check = kind.check
            for start, end in candidates:
                if check is not None:
                    checked = check(text, start, end)
                    if checked is None:
                        continue
                    end = checked
                spans.append((start, priority, end))
        if not spans:
            return []
        spans.sort()
        out: list[tuple[int, int, int]] = []
        taken = 0
        for start, priority, end in spans:
            if start >= taken:
                out.append((start, end, priority))
                taken = end
        return out

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
