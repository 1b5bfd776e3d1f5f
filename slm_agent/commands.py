"""What every ``slm-agent`` command group shares: errors mapped to click once, ``--json`` output.

A group declared with ``@click.group(cls=CommandGroup)`` turns any :class:`SlmAgentError` raised
by its commands into a ``ClickException`` carrying the error's message (exit 1, ``Error: ...``);
commands raise the library's errors and never map them by hand. A command that is also run on its
own (outside its group) is declared with ``cls=Command`` for the same mapping.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from slm_agent.console import console
from slm_agent.errors import SlmAgentError

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _library_errors() -> Iterator[None]:
    try:
        yield
    except SlmAgentError as exc:
        raise click.ClickException(exc.message) from exc


class Command(click.Command):
    """A click command whose library errors become one-line CLI errors."""

    def invoke(self, ctx: click.Context) -> Any:
        with _library_errors():
            return super().invoke(ctx)


class CommandGroup(click.Group):
    """A click group whose commands' library errors become one-line CLI errors."""

    # Groups nested with ``@group.group()`` are CommandGroups too, so they map errors when run alone.
    group_class = type

    def invoke(self, ctx: click.Context) -> Any:
        with _library_errors():
            return super().invoke(ctx)


def json_option(help: str = "Print JSON instead of a table.") -> Callable[[F], F]:
    """The ``--json`` flag, passed to the command as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any, indent: int | None = 2) -> None:
    """Machine-readable output on stdout: pydantic models and lists of them as plain JSON.

    ``indent=None`` prints one line, for the commands whose output always was one line.
    """
    click.echo(json.dumps(to_jsonable(value), indent=indent, ensure_ascii=False, default=str))


def emit(value: Any, as_json: bool, render: Callable[[], None] | str) -> None:
    """``--json`` prints ``value``; otherwise ``render`` draws it (or the string is printed)."""
    if as_json:
        print_json(value)
    elif isinstance(render, str):
        console().print(render)
    else:
        render()
