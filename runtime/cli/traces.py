"""``slm-agent traces``: list, show, export and summarise the daemon's trace store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from slm_agent.commands import CommandGroup, print_json
from slm_agent.console import console
from slm_agent.runtime.config import load_settings
from slm_agent.runtime.store.traces import TraceStore


def _traces(db: Path | None) -> TraceStore:
    path = db or load_settings().db_path
    if not path.exists():
        raise click.ClickException(f"no trace database at {path}: start slm-agentd or pass --db")
    return TraceStore(path)


db_option = click.option(
    "--db", type=click.Path(dir_okay=False, path_type=Path), help="Trace database (default: configured)."
)


@click.group(cls=CommandGroup)
def traces() -> None:
    """The trace store: every request, response and metric the daemon logged."""


@traces.command("list")
@db_option
@click.option("--limit", default=20, show_default=True)
@click.option("--task")
@click.option("--route", type=click.Choice(["local", "remote"]))
@click.option("--errors", is_flag=True, help="Only failed requests.")
def traces_list(db: Path | None, limit: int, task: str | None, route: str | None, errors: bool) -> None:
    """Newest traces first.

    \b
    Example usage:
      slm-agent traces list --task extract --limit 5
      slm-agent traces list --errors
    """
    table = Table("id", "time", "endpoint", "task", "model", "route", "status", "tokens", "latency ms")
    for t in _traces(db).list(limit=limit, task=task, route=route, errors_only=errors):
        table.add_row(
            t.id,
            t.created_at,
            t.endpoint,
            t.task or "",
            t.model or "",
            t.route,
            str(t.status),
            str(t.completion_tokens or ""),
            f"{t.latency_ms:.0f}" if t.latency_ms else "",
        )
    console().print(table)


@traces.command("show")
@click.argument("trace_id")
@db_option
def traces_show(trace_id: str, db: Path | None) -> None:
    """Print one trace (and its feedback) as JSON.

    \b
    Example usage:
      slm-agent traces show tr_01a2146854c3ce9221b64d
    """
    store = _traces(db)
    body: dict[str, Any] = store.get(trace_id).model_dump(mode="json")
    body["feedback"] = store.feedback_for(trace_id)
    print_json(body)


@traces.command("export")
@db_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def traces_export(db: Path | None, fmt: str, output: Path) -> None:
    """Export every trace to JSON Lines or Parquet.

    \b
    Example usage:
      slm-agent traces export -o traces.jsonl
      slm-agent traces export --format parquet -o traces.parquet
    """
    store = _traces(db)
    rows = (t.model_dump(mode="json") for t in store.iter_all())
    if fmt == "jsonl":
        count = 0
        with output.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    else:
        # pyarrow is imported only for a Parquet export: every other command does without it.
        import pyarrow as pa
        import pyarrow.parquet as pq

        # JSON-valued columns stay JSON text so the schema is stable whatever the payloads.
        records = [
            {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()} for row in rows
        ]
        pq.write_table(pa.Table.from_pylist(records), output)
        count = len(records)
    console().print(f"exported {count} traces to {output}")


@traces.command("stats")
@db_option
def traces_stats(db: Path | None) -> None:
    """Counts, routes, tasks and latency percentiles.

    \b
    Example usage:
      slm-agent traces stats
    """
    print_json(_traces(db).stats())
