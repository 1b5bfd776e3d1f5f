"""``slm-agent config | tasks | traces``: settings, task files and the trace store from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from slm_agent.console import console
from slm_agent.errors import SlmAgentError
from slm_agent.runtime.config import Settings, config_path, load_settings, value_sources
from slm_agent.runtime.tasks import TaskRegistry
from slm_agent.runtime.traces import TraceStore


def _fail(exc: SlmAgentError) -> click.ClickException:
    return click.ClickException(exc.message)


# -- config ----------------------------------------------------------------------------------------
@click.group()
def config() -> None:
    """The daemon's effective settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (secrets masked).")
def config_show(as_json: bool) -> None:
    """Print every setting, its value and where it came from (default, file, env).

    \b
    Example usage:
      slm-agent config show
      SLM_AGENT_PORT=9000 slm-agent config show --json
    """
    settings = load_settings()
    sources = value_sources(settings)
    values = settings.model_dump(mode="json")
    if settings.token:
        values["token"] = "********"
    if as_json:
        click.echo(json.dumps({k: {"value": v, "source": sources[k]} for k, v in values.items()}, indent=2))
        return
    table = Table("setting", "value", "source", "description", title=f"config file: {config_path()}")
    for name, value in values.items():
        table.add_row(name, json.dumps(value), sources[name], Settings.model_fields[name].description or "")
    console().print(table)


# -- tasks -----------------------------------------------------------------------------------------
def _registry() -> TaskRegistry:
    return TaskRegistry(load_settings().tasks_dir)


@click.group()
def tasks() -> None:
    """Tasks: the subtasks an agent delegates to the local model."""


@tasks.command("list")
def tasks_list() -> None:
    """List tasks with their kind, adapter and routing policy.

    \b
    Example usage:
      slm-agent tasks list
    """
    table = Table("name", "kind", "routing", "adapter", "source", "description")
    for task in _registry().list():
        table.add_row(task.name, task.kind, task.routing, task.adapter or "", task.source, task.description)
    console().print(table)


@tasks.command("show")
@click.argument("name")
def tasks_show(name: str) -> None:
    """Print a task's full definition as JSON.

    \b
    Example usage:
      slm-agent tasks show extract
    """
    try:
        task = _registry().get(name)
    except SlmAgentError as exc:
        raise _fail(exc) from exc
    click.echo(json.dumps(task.model_dump(mode="json", exclude_none=True), indent=2))


@tasks.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Replace a task of the same name.")
def tasks_add(file: Path, replace: bool) -> None:
    """Validate a task TOML file and install it in the tasks dir.

    \b
    Example usage:
      slm-agent tasks add ./summarize.toml
    """
    try:
        task = _registry().add_file(file, replace=replace)
    except SlmAgentError as exc:
        raise _fail(exc) from exc
    console().print(
        f"added task [bold]{task.name}[/] ({task.kind}, routing={task.routing}); restart the daemon to serve it"
    )


@tasks.command("rm")
@click.argument("name")
def tasks_rm(name: str) -> None:
    """Remove a task file from the tasks dir.

    \b
    Example usage:
      slm-agent tasks rm summarize
    """
    try:
        path = _registry().remove(name)
    except SlmAgentError as exc:
        raise _fail(exc) from exc
    console().print(f"removed {path}")


# -- traces ----------------------------------------------------------------------------------------
def _traces(db: Path | None) -> TraceStore:
    path = db or load_settings().db_path
    if not path.exists():
        raise click.ClickException(f"no trace database at {path}: start slm-agentd or pass --db")
    return TraceStore(path)


db_option = click.option(
    "--db", type=click.Path(dir_okay=False, path_type=Path), help="Trace database (default: configured)."
)


@click.group()
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
    try:
        trace = store.get(trace_id)
    except SlmAgentError as exc:
        raise _fail(exc) from exc
    body: dict[str, Any] = trace.model_dump(mode="json")
    body["feedback"] = [f.model_dump(mode="json") for f in store.feedback_for(trace_id)]
    click.echo(json.dumps(body, indent=2, ensure_ascii=False))


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
    click.echo(_traces(db).stats().model_dump_json(indent=2))
