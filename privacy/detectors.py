"""What counts as personal data or a secret, and where it is in a text: the kinds, their cheap
checks, and one scan over all of them.

Candidates whose shape alone is not proof (cards, IBANs, phones, IPs, opaque tokens) go through a
cheap check (Luhn, mod-97, digit counts, ``ipaddress``, entropy) so ordinary numbers, dates and
words are left alone.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_KINDS", "SECRET_SHAPE", "Kind", "find_spans"]

# -- the kinds ------------------------------------------------------------------------------------
# Python's regex engine has no fast scan for a character class, so one big alternation costs more
# than a few small passes: each kind is its own pattern, led by a literal or a narrow class where
# possible, skipped entirely when a cheap test (``"@" in text``) rules it out, and its boundary
# rules are checked in Python only on the rare candidate.


@dataclass(frozen=True)
class Kind:
    """One kind of value to hide: where candidates are, and what makes one real."""

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


# Credentials known by their prefix: the one list. The sync scrubber (``scrub.py``) removes
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
DEFAULT_KINDS: tuple[Kind, ...] = (
    Kind("secret", SECRET_SHAPE),
    # The token only; "Bearer " stays so the remote model still sees what it was.
    Kind("secret", re.compile(r"(?<=earer )[A-Za-z0-9._~+/\-]{16,}=*"), None, _has("earer ")),
    Kind("email", _EMAIL, None, _has("@")),
    Kind(
        "iban",
        re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"),
        _check_iban,
    ),
    Kind("card", re.compile(r"\d(?:[ -]?\d){12,18}(?![\d.,]?\d)"), _check_card, numeric=True),
    Kind("ip", re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\.?\d)"), _check_ipv4, numeric=True),
    Kind("ip", _IPV6, _check_ipv6),
    Kind(
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
    Kind("secret", re.compile(r"[A-Za-z0-9_\-+/]{24,}={0,2}(?![\w+/=-])"), _check_token),
)


def find_spans(kinds: tuple[Kind, ...], text: str) -> list[tuple[int, int, int]]:
    """Non-overlapping (start, end, kind index) spans, leftmost first, priority on ties."""
    spans: list[tuple[int, int, int]] = []
    runs: list[tuple[int, int]] | None = None
    for priority, kind in enumerate(kinds):
        if kind.gate is not None and not kind.gate(text):
            continue
        pattern = kind.pattern
        if not isinstance(pattern, re.Pattern):
            # The finders scan the whole text; only regex kinds are numeric.
            candidates = pattern.finditer(text)
        elif kind.numeric:
            if runs is None:
                runs = [
                    m.span() for m in _NUMERIC_RUN.finditer(text) if m.end() - m.start() >= _MIN_NUMERIC_RUN
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
