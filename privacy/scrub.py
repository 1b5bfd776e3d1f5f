"""What leaves the device is clean: secrets scrubbed, then personal data redacted, row by row.

Credentials are found by key name (``api_key``, ``Authorization``), by ``name=value`` shape and by
the prefixes of known key formats; those prefixes are the redactor's
(:data:`slm_agent.privacy.detectors.SECRET_SHAPE`), so the two can never disagree on what a key is.
"""

from __future__ import annotations

import re
from typing import Any

from slm_agent.privacy.detectors import SECRET_SHAPE
from slm_agent.privacy.redactor import Redactor

_SECRET = "[SECRET]"
_SECRET_KEYS = re.compile(
    r"^(authorization|proxy-authorization|x-api-key|api[-_]?key|apikey|access[-_]?token|refresh[-_]?token|"
    r"id[-_]?token|token|secret|client[-_]?secret|password|passwd|cookie|set-cookie|private[-_]?key)$",
    re.IGNORECASE,
)
# (pattern, keeps its first group): a key or header name stays readable, its value goes.
_SECRET_PATTERNS: list[tuple[re.Pattern[str], bool]] = [
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL
        ),
        False,
    ),
    (re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*)[^\r\n\"']+"), True),
    (re.compile(r"(?i)\b((?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}"), True),
    (
        re.compile(
            r"(?i)\b((?:api[-_ ]?key|access[-_ ]?key|secret(?:[-_ ]?key)?|password|passwd|token)"
            r"[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',;]{4,}"
        ),
        True,
    ),
    (SECRET_SHAPE, False),
]


# One pass to find out whether any pattern can match: most strings hold no secret at all.
_ANY_SECRET = re.compile(
    "|".join(
        f"(?i:{p.pattern.removeprefix('(?i)')})" if p.pattern.startswith("(?i)") else f"(?:{p.pattern})"
        for p, _ in _SECRET_PATTERNS
    ),
    re.DOTALL,
)


def scrub_secrets(value: Any) -> Any:
    """Replace credentials anywhere in a JSON-like value: by key name, and by shape in text."""
    if isinstance(value, str):
        if not _ANY_SECRET.search(value):
            return value
        for pattern, keeps_name in _SECRET_PATTERNS:
            value = pattern.sub(
                (lambda m: m.group(1) + _SECRET) if keeps_name else (lambda m: _SECRET), value
            )
        return value
    if isinstance(value, dict):
        return {
            k: (
                _SECRET
                if isinstance(k, str) and _SECRET_KEYS.match(k) and v is not None
                else scrub_secrets(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


# Identifiers and times carry no personal data and must survive unchanged (they are the join keys).
_KEEP_FIELDS = {"id", "seq", "trace_id", "created_at"}


class Sanitizer:
    """Secret scrubber then redactor (personal data) over every field; the mapping is dropped."""

    def __init__(self) -> None:
        self._redactor = Redactor()

    def clean(self, row: dict[str, Any], counts: dict[str, int] | None = None) -> dict[str, Any]:
        """The row scrubbed; ``counts`` (when given) gains the values replaced, by kind."""
        # One mapping per row: the same e-mail in request and response gets the same placeholder,
        # which training needs; the mapping itself dies with this call.
        mapping: dict[str, str] = {}
        out: dict[str, Any] = {}
        for name, value in row.items():
            if name in _KEEP_FIELDS or value is None or isinstance(value, bool | int | float):
                out[name] = value
                continue
            value = scrub_secrets(value)
            if isinstance(value, str):
                redaction = self._redactor.redact(value, mapping)
                value, found = redaction.text, redaction.counts
            else:
                value, _, found = self._redactor.redact_json(value, mapping)
            if counts is not None:
                for kind, n in found.items():
                    counts[kind] = counts.get(kind, 0) + n
            out[name] = value
        return out
