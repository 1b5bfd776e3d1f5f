"""The report's period: ``--since`` as a date, a timestamp or a duration back from now, and the
hour or day buckets its plot is drawn in."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from slm_agent.errors import BadRequestError
from slm_agent.runtime.report.model import Granularity

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
BUCKET_S: dict[Granularity, int] = {"hour": 3600, "day": 86400}
# Up to three days plot by the hour (at most 72 points), longer periods by the day.
HOURLY_UP_TO = timedelta(days=3)
# A century of days: a longer period is a typo (since=0001-01-01) that would cost seconds of CPU.
MAX_BUCKETS = 36_525


def parse_since(text: str, now: datetime) -> datetime:
    """``7d``, ``12h``, ``30m``, ``2w`` back from ``now``; or an ISO date/time (UTC unless it says)."""
    match = _DURATION.match(text)
    if match:
        try:
            return now - float(match.group(1)) * _UNITS[match.group(2)]
        except OverflowError:
            raise BadRequestError(f"since {text!r} reaches back before the year 1", param="since") from None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequestError(
            f"since must be an ISO date or time (2025-06-01, 2025-06-01T09:00Z) or a duration "
            f"(30m, 12h, 7d, 2w), not {text!r}",
            param="since",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def granularity(since: datetime, until: datetime) -> Granularity:
    return "hour" if until - since <= HOURLY_UP_TO else "day"


def bucket_starts(since: datetime, until: datetime, grain: Granularity) -> list[float]:
    """Epoch starts of the buckets covering [since, until), aligned to whole UTC hours or days."""
    width = BUCKET_S[grain]
    first = math.floor(since.timestamp() / width) * width
    count = max(1, math.ceil((until.timestamp() - first) / width))
    if count > MAX_BUCKETS:
        raise BadRequestError(
            f"the period from {since.date()} to {until.date()} is over a century: narrow since or until",
            param="since",
        )
    return [first + i * width for i in range(count)]
