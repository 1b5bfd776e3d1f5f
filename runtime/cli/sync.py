"""``slm-agent sync``: push traces to the training box, pull adapters back, show where sync stands."""

from __future__ import annotations

import os
import sys

import click

from slm_agent.commands import CommandGroup, json_option, print_json
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.models.store import ModelStore
from slm_agent.progress import rich_progress
from slm_agent.runtime.config import Settings, load_settings
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.pull import pull
from slm_agent.runtime.sync.push import push
from slm_agent.runtime.sync.state import all_states, backlog, read_state, store_ids
from slm_agent.runtime.sync.targets import is_url, normalize_target


def _excluded_tasks(settings: Settings) -> set[str]:
    """Tasks whose files say ``sync = false``: their traces never leave the device."""
    return {task.name for task in TaskRegistry(settings.tasks_dir).list() if not task.sync}


@click.group(cls=CommandGroup)
def sync() -> None:
    """Ship traces to the training box and bring trained adapters back."""


@sync.command("push")
@click.option("--to", "target", help="Collector URL or directory (default: [sync] target in the config).")
@click.option("--exclude-task", "exclude", multiple=True, help="Also keep this task's traces on the device.")
@click.option("--batch-size", type=int, help="Traces per batch.")
def push_cmd(target: str | None, exclude: tuple[str, ...], batch_size: int | None) -> None:
    """Send every trace and feedback row not yet acknowledged by the target.

    Traces are redacted and scrubbed of secrets first; tasks with `sync = false` are skipped.
    Safe to interrupt: the next push resumes where the last acknowledgement left off.

    Example usage:

    \b
        export SLM_AGENT_SYNC_TOKEN=slmdev_...
        slm-agent sync push --to https://trainbox:8780
        slm-agent sync push --to /mnt/usb/slm-sync
    """
    settings = load_settings()
    sync_settings = settings.sync
    if batch_size:
        sync_settings = sync_settings.model_copy(update={"batch_size": batch_size})
    store = TraceStore(settings.db_path)
    try:
        with rich_progress("pushing traces", unit="items") as on_progress:
            result = push(
                store,
                sync_settings,
                target,
                on_progress,
                excluded_tasks=_excluded_tasks(settings) | set(exclude),
            )
    finally:
        store.close()
    click.echo(
        f"pushed {result.traces} traces and {result.feedback} feedback rows in {result.batches} batches "
        f"to {result.target} ({result.seconds:.1f}s); skipped {result.skipped} opted-out traces"
        + (f"; {result.duplicates} batches were already there" if result.duplicates else "")
    )


@sync.command("pull")
@click.option(
    "--from", "source", help="Collector URL or folder of published adapters (default: [sync] target)."
)
@click.option("--no-load", is_flag=True, help="Install only; do not ask a running daemon to load them.")
def pull_cmd(source: str | None, no_load: bool) -> None:
    """Install published adapters that fit this device's base model, then hot-load them.

    Each file is checked (sha256, GGUF header, tensor shapes against the base model) before it
    enters the model store; a rejected adapter leaves the one in service untouched.

    Example usage:

    \b
        slm-agent sync pull --from https://trainbox:8780
        slm-agent sync pull --from /mnt/usb/adapters --no-load
    """
    settings = load_settings()
    source = source or settings.sync.target
    if not source:
        raise click.ClickException("no source: pass --from URL|DIR or set [sync] target in the config")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    token = settings.token.get_secret_value() if settings.token else None
    result = pull(
        source,
        settings.sync,
        ModelStore(settings.store_dir),
        settings.model,
        daemon_url=None if no_load else f"http://{host}:{settings.port}",
        daemon_token=token,
        tasks_dir=settings.tasks_dir,
    )
    for name in result.installed:
        click.echo(f"installed {name}")
    for name in result.tasks_installed:
        click.echo(f"installed task {name}")
    for name in result.unchanged:
        click.echo(f"up to date {name}")
    for name, why in result.rejected.items():
        click.echo(f"rejected {name}: {why}", err=True)
    if result.installed and not no_load:
        if result.daemon_running:
            click.echo(f"daemon loaded: {', '.join(result.loaded) or 'none'}")
        else:
            click.echo("slm-agentd is not running: the adapters load on its next start")
    if result.rejected:
        sys.exit(1)


@sync.command("status")
@json_option(help="Print JSON.")
def status_cmd(as_json: bool) -> None:
    """Show this device's id, each target's cursor and how many traces wait to be sent.

    Example usage:

    \b
        slm-agent sync status
        slm-agent sync status --json
    """
    settings = load_settings()
    store = TraceStore(settings.db_path)
    try:
        device_id, store_id = store_ids(store, settings.sync)
        states = all_states(store)
        if settings.sync.target and normalize_target(settings.sync.target) not in {s.target for s in states}:
            states.append(read_state(store, settings.sync.target))
        rows = [{**s.model_dump(), "waiting": backlog(store, s)} for s in states]
    finally:
        store.close()
    info = {
        "device_id": device_id,
        "store_id": store_id,
        "enabled": settings.sync.enabled,
        "target": settings.sync.target,
        "token": "set" if settings.sync.token_env and os.environ.get(settings.sync.token_env) else "not set",
        "targets": rows,
    }
    if as_json:
        print_json(info)
        return
    click.echo(f"device {device_id} (store {store_id}), background sync {'on' if info['enabled'] else 'off'}")
    if info["target"] and is_url(info["target"]):
        click.echo(f"token ({settings.sync.token_env}): {info['token']}")
    if not rows:
        click.echo("no sync target yet: set [sync] target or run `slm-agent sync push --to URL|DIR`")
    for row in rows:
        click.echo(
            f"{row['target']}: acknowledged up to trace {row['trace_seq']}, {row['waiting']} waiting; "
            f"last success {row['last_success_at'] or 'never'}"
            + (f"; last error: {row['last_error']}" if row["last_error"] else "")
        )
