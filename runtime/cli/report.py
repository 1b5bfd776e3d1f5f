"""``slm-agent report``: how much traffic the device answers, how well, and what it saved."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from slm_agent.commands import Command, json_option, print_json
from slm_agent.runtime.config import load_settings
from slm_agent.runtime.report import build_report, parse_since, render_markdown, settings_price
from slm_agent.runtime.store.queries import ReadOnlyDb


@click.command(cls=Command)
@click.option(
    "--since",
    metavar="WHEN",
    help="Period start: an ISO date or time (2025-06-01) or a duration back from now (7d, 12h). "
    "Default: the first trace.",
)
@json_option("Print the report as JSON instead of Markdown.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE, not stdout."
)
@click.option(
    "--db", type=click.Path(dir_okay=False, path_type=Path), help="Trace database (default: configured)."
)
def report(since: str | None, as_json: bool, output: Path | None, db: Path | None) -> None:
    """The conversion report: per task, share of calls, state, agreement with the remote, latency,
    tokens and cost saved, and calls answered locally over time.

    \b
    Example usage:
      slm-agent report
      slm-agent report --since 7d
      slm-agent report --since 2025-06-01 --json -o report.json
    """
    settings = load_settings()
    reader = ReadOnlyDb(db or settings.db_path)
    try:
        now = datetime.now(UTC)
        result = build_report(
            reader.conn,
            since=parse_since(since, now) if since else None,
            until=now,
            fallback_price=settings_price(settings.remote),
        )
    finally:
        reader.close()
    if output is None:
        if as_json:
            print_json(result)
        else:
            click.echo(render_markdown(result), nl=False)
        return
    text = result.model_dump_json(indent=2) + "\n" if as_json else render_markdown(result)
    output.write_text(text)
    click.echo(f"wrote the report to {output}: {result.headline}")
