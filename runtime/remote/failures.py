"""What went wrong with one attempt at a remote call, and whether another attempt may help.

A failure is retryable (429, 5xx, network) or not (other 4xx: the request or the key is wrong),
and counts toward the provider's circuit breaker only when the provider is at fault (5xx,
timeouts, network), not for our mistakes or its rate limit.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from slm_agent.errors import RemoteError

__all__ = ["Failure", "failure_from_exc", "failure_from_status", "retry_after"]


@dataclass
class Failure:
    error: RemoteError
    retryable: bool
    provider_fault: bool  # counts toward the breaker: 5xx, timeouts, network; not 4xx or 429
    retry_after_s: float | None = None


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds a ``Retry-After`` header asks us to wait (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, (parsed - datetime.now(UTC)).total_seconds()) if parsed else None


def failure_from_status(provider: str, status: int, headers: httpx.Headers, body: bytes) -> Failure:
    try:
        detail = json.loads(body).get("error", {})
        message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    text = f"remote provider {provider!r} answered HTTP {status}: {message or 'no message'}"
    if status == 429:
        return Failure(RemoteError(text, code="remote_rate_limited"), True, False, retry_after(headers))
    if status >= 500:
        return Failure(RemoteError(text, code="remote_server_error"), True, True, retry_after(headers))
    # 4xx: the request (or our key) is wrong; sending it again will not help.
    return Failure(RemoteError(text + " (check the provider's settings and the request)"), False, False)


def failure_from_exc(provider: str, exc: httpx.HTTPError) -> Failure:
    if isinstance(exc, httpx.TimeoutException):
        error = RemoteError(
            f"remote provider {provider!r} timed out ({type(exc).__name__})", code="remote_timeout"
        )
    else:
        error = RemoteError(f"cannot reach remote provider {provider!r}: {type(exc).__name__}: {exc}")
    return Failure(error, True, True)
