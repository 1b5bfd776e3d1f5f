"""``slm-agent config``: the daemon's effective settings and where each came from."""

from __future__ import annotations

import json

import click
from rich.table import Table

from slm_agent.commands import CommandGroup, json_option, print_json
from slm_agent.console import console
from slm_agent.runtime.config import Settings, config_path, load_settings, value_sources


@click.group(cls=CommandGroup)
def config() -> None:
    """The daemon's effective settings."""


@config.command("show")
@json_option(help="Print as JSON (secrets masked).")
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
        print_json({k: {"value": v, "source": sources[k]} for k, v in values.items()})
        return
    table = Table("setting", "value", "source", "description", title=f"config file: {config_path()}")
    for name, value in values.items():
        table.add_row(name, json.dumps(value), sources[name], Settings.model_fields[name].description or "")
    console().print(table)
