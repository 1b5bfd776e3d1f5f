"""The report as Markdown: the headline, one table row per task, and unicode sparklines of the
calls answered locally over time (the TUI draws the same series as a plot)."""

from __future__ import annotations

from slm_agent.runtime.report.model import Bucket, ConversionReport, TaskConversion, dollars, percent

BARS = "▁▂▃▄▅▆▇█"
ZERO = "·"  # no calls at all, told apart from a few
SPARK_WIDTH = 48  # longer series are summed into this many points, so a year still fits a line


def sparkline(values: list[int], width: int = SPARK_WIDTH) -> str:
    """One character per value (or per group of values past ``width``), scaled to the largest."""
    if len(values) > width:
        size = -(-len(values) // width)
        values = [sum(values[i : i + size]) for i in range(0, len(values), size)]
    top = max(values, default=0)
    if top <= 0:
        return ZERO * len(values)
    return "".join(ZERO if v <= 0 else BARS[min(len(BARS) - 1, (v * len(BARS) - 1) // top)] for v in values)


def milliseconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def count(value: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def agreement_cell(row: TaskConversion) -> str:
    if row.agreement is None:
        return "–"
    return f"{percent(row.agreement)} (≥ {percent(row.agreement_lower)}, {row.agreed}/{row.pairs})"


def task_label(row: TaskConversion) -> str:
    return "(no task)" if row.task is None else f"`{row.task}`"


def render_markdown(report: ConversionReport) -> str:
    lines = [
        "# Conversion report",
        "",
        f"**{report.headline}**",
        "",
        f"{report.since} → {report.until} · {report.calls} calls · {report.local} answered locally",
        "",
        "| task | state | share of calls | answered locally | agreement (lower bound, pairs) "
        "| p50 local | p50 remote | tokens saved | cost saved | local calls by "
        f"{report.granularity} |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in report.tasks:
        lines.append(
            f"| {task_label(row)} | {row.state} | {percent(row.share)} | {percent(row.local_share)} "
            f"| {agreement_cell(row)} | {milliseconds(row.local_p50_ms)} | {milliseconds(row.remote_p50_ms)} "
            f"| {count(row.tokens_saved)} | {dollars(row.cost_saved_usd)} "
            f"| `{sparkline([b.local for b in row.buckets])}` |"
        )
    lines += ["", *_over_time(report.buckets, report.granularity), ""]
    priced = sorted({r.price.source for r in report.tasks if r.local})
    if priced:
        lines.append(f"Cost saved prices local tokens at the remote's {' / '.join(priced)} price.")
    return "\n".join(lines) + "\n"


def _over_time(buckets: list[Bucket], grain: str) -> list[str]:
    if not buckets:
        return []
    first, last = buckets[0].start[:16].replace("T", " "), buckets[-1].start[:16].replace("T", " ")
    return [
        f"Calls answered locally, by {grain} ({first} … {last} UTC):",
        "",
        "```",
        f"local  {sparkline([b.local for b in buckets])}  (most {max(b.local for b in buckets)})",
        f"all    {sparkline([b.calls for b in buckets])}  (most {max(b.calls for b in buckets)})",
        "```",
    ]
