"""``slm-agent traces``: list, show, export, summarise and prune the daemon's trace store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from slm_agent.commands import CommandGroup, print_json
from slm_agent.console import console
from slm_agent.permissions import open_private
from slm_agent.progress import rich_progress
from slm_agent.runtime.config import load_settings
from slm_agent.runtime.store.retention import prune, synced_up_to, vacuum
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
        # Created owner-only: an export holds every prompt the database does.
        with os.fdopen(open_private(output), "w") as fh:
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
        with os.fdopen(open_private(output), "wb") as sink:
            pq.write_table(pa.Table.from_pylist(records), sink)
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


@traces.command("prune")
@db_option
@click.option(
    "--older-than-days", type=click.FloatRange(min=0, min_open=True), help="Override traces.retention_days."
)
@click.option("--max-db-mb", type=click.FloatRange(min=0, min_open=True), help="Override traces.max_db_mb.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def traces_prune(
    db: Path | None, older_than_days: float | None, max_db_mb: float | None, dry_run: bool
) -> None:
    """Delete traces past the retention period or the database size limit.

    Traces the configured sync target has not acknowledged are kept, whatever their age.
    The daemon prunes by itself when traces.retention_days or traces.max_db_mb is set.

    \b
    Example usage:
      slm-agent traces prune --dry-run
      slm-agent traces prune --older-than-days 30
      slm-agent traces prune --max-db-mb 500
    """
    settings = load_settings()
    policy = settings.traces.model_copy(
        update={
            k: v for k, v in (("retention_days", older_than_days), ("max_db_mb", max_db_mb)) if v is not None
        }
    )
    if not (policy.retention_days or policy.max_db_mb):
        raise click.UsageError(
            "nothing to prune by: pass --older-than-days or --max-db-mb, or set traces.retention_days "
            "or traces.max_db_mb in the config"
        )
    store = _traces(db)
    with rich_progress("pruning traces", unit="items") as progress:
        result = prune(
            store, policy, synced_up_to(store, settings.sync), dry_run=dry_run, on_progress=progress
        )
    if dry_run:
        console().print(
            f"would delete {result.traces} traces ({result.by_age} past retention, {result.by_size} over "
            f"the size limit); the database holds {result.used_mb_before:.1f} MiB"
        )
    else:
        if result.traces:
            vacuum(store)  # the file shrinks only once freed pages go back to the disk
        console().print(
            f"deleted {result.traces} traces ({result.by_age} past retention, {result.by_size} over the "
            f"size limit) and {result.feedback} feedback rows; the database held "
            f"{result.used_mb_before:.1f} MiB, now {result.used_mb_after:.1f} MiB"
        )
    if result.kept_unsynced:
        console().print(
            f"kept {result.kept_unsynced} traces that {settings.sync.target or 'the sync target'} "
            "has not acknowledged yet: run `slm-agent sync push` first"
        )
