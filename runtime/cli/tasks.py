"""``slm-agent tasks``: list, show, add and remove the task files the daemon serves."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from slm_agent.commands import CommandGroup, print_json
from slm_agent.console import console
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.runtime.config import load_settings


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
