"""Every CLI command has help with an example, the README documents each group, CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from slm_agent.cli import GROUPS
from slm_agent.cli import main as cli
from slm_agent.runtime.daemon import main as daemon_main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def commands() -> list[tuple[str, click.Command]]:
    found = []
    ctx = click.Context(cli)
    for name in GROUPS:
        group = cli.get_command(ctx, name)
        assert group is not None
        if isinstance(group, click.Group):
            found += [(f"{name} {sub}", cmd) for sub, cmd in group.commands.items()]
        else:
            found.append((name, group))
    return found


@pytest.mark.parametrize(("name", "command"), commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_command_has_help_with_example(name: str, command: click.Command) -> None:
    text = (command.help or "") + (command.epilog or "")
    assert command.help, f"`slm-agent {name}` has no help"
    assert "Example usage" in text, f"`slm-agent {name}` has no example"


def test_readme_mentions_every_group_and_the_daemon() -> None:
    for name in GROUPS:
        assert f"slm-agent {name}" in README, f"README.md does not mention `slm-agent {name}`"
    assert "slm-agentd" in README and "Example usage" in (daemon_main.epilog or "")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^python3 -m venv .*pytest$", ci, re.M)
    assert command, ".ci/run has no test command line"
    assert command.group(0) in README


def test_readme_config_examples_load() -> None:
    """The TOML snippets in README.md are valid settings and task files."""
    import tomllib

    from slm_agent.contracts.tasks import parse_task
    from slm_agent.runtime.config import Settings

    blocks = re.findall(r"```toml\n(.*?)```", README, re.S)
    remote = next(b for b in blocks if b.startswith("[remote]"))
    settings = Settings.model_validate(tomllib.loads(remote))
    assert settings.remote.providers[0].api_key_env == "OPENAI_API_KEY"
    task = next(b for b in blocks if "# summarize.toml" in b)
    assert parse_task({"name": "summarize", **tomllib.loads(task)}, "README").routing == "auto"
