"""``slm-agent tasks``: list, show, add and remove the task files the daemon serves; promote or
demote a task's adapter on the running daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import httpx
from rich.table import Table

from slm_agent.commands import CommandGroup, print_json
from slm_agent.console import console
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.errors import AuthenticationError, NotFoundError, SlmAgentError, UnavailableError
from slm_agent.runtime.config import load_settings
from slm_agent.runtime.shadow.records import TaskState


def _registry() -> TaskRegistry:
    return TaskRegistry(load_settings().tasks_dir)


@click.group(cls=CommandGroup)
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
    print_json(_registry().get(name).model_dump(mode="json", exclude_none=True))


@tasks.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Replace a task of the same name.")
def tasks_add(file: Path, replace: bool) -> None:
    """Validate a task TOML file and install it in the tasks dir.

    \b
    Example usage:
      slm-agent tasks add ./summarize.toml
    """
    task = _registry().add_file(file, replace=replace)
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
    console().print(f"removed {_registry().remove(name)}")


def _ask_daemon(path: str) -> dict[str, Any]:
    """POST to the running daemon at the configured host and port, with the configured token."""
    settings = load_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    token = settings.token.get_secret_value() if settings.token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(url + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise UnavailableError(
            f"slm-agentd is not running at {url} ({exc.__class__.__name__}); start it with `slm-agentd` "
            "(task states live in the running daemon)"
        ) from None
    if response.status_code < 400:
        body: dict[str, Any] = response.json()
        return body
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    if response.status_code == 401:
        raise AuthenticationError(f"slm-agentd at {url} refused the token: {message}")
    if response.status_code == 404:
        raise NotFoundError(message)
    raise SlmAgentError(f"slm-agentd at {url} answered {response.status_code}: {message}")


def _report(state: TaskState) -> None:
    console().print(
        f"task [bold]{state.task}[/] is {state.state} on adapter {state.adapter} ({state.reason})"
    )


@tasks.command("promote")
@click.argument("name")
def tasks_promote(name: str) -> None:
    """Send a task live on the running daemon: its adapter answers every matched call.

    A manual override of shadow mode (reason "manual"): no agreement is required and no gate
    applies. Automatic demotion still watches the task's sampled pairs.

    \b
    Example usage:
      slm-agent tasks promote triage
    """
    _report(TaskState.model_validate(_ask_daemon(f"/v1/admin/tasks/{name}/promote")))


@tasks.command("demote")
@click.argument("name")
def tasks_demote(name: str) -> None:
    """Take a task off live on the running daemon: the remote answers its calls again.

    The adapter keeps being compared with the remote in the background, and goes live again
    once its agreement earns it.

    \b
    Example usage:
      slm-agent tasks demote triage
    """
    _report(TaskState.model_validate(_ask_daemon(f"/v1/admin/tasks/{name}/demote")))
