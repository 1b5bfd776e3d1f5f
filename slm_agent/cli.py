"""``slm-agent``: one command group per job; each command is a thin call into the library."""

from __future__ import annotations

import importlib

import click

from slm_agent import __version__

# group name -> "module:attribute"; imported only when used, so `slm-agent --help` stays fast.
GROUPS = {
    "models": "slm_agent.runtime.cli.models:models",
    "config": "slm_agent.runtime.cli.config:config",
    "tasks": "slm_agent.runtime.cli.tasks:tasks",
    "traces": "slm_agent.runtime.cli.traces:traces",
    "report": "slm_agent.runtime.cli.report:report",
    "sync": "slm_agent.runtime.cli.sync:sync",
    "collector": "slm_agent.collector.cli:collector",
    "tui": "slm_agent.tui.cli:tui",
    "train": "slm_agent.train.cli:train",
    "quantize": "slm_agent.quantize.cli:quantize",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(GROUPS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = GROUPS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(
    cls=LazyGroup,
    epilog="""\b
Example usage:
  slm-agent models list
  slm-agent tasks show extract
  slm-agent traces list --limit 5
  slm-agent config show""",
)
@click.version_option(__version__, prog_name="slm-agent")
def main() -> None:
    """slm-agent: small local models for agent subtasks (the daemon is slm-agentd)."""


if __name__ == "__main__":
    main()
