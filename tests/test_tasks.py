"""Task files: built-ins, overrides, add/rm, clear errors for bad definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from slm_agent import locations
from slm_agent.cli import main as cli
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.errors import BadRequestError, ConflictError, NotFoundError

SUMMARIZE = """
description = "One-line summary"
kind = "text"
routing = "auto"
instructions = "Summarize in one line."
[[examples]]
input = "The meeting moved from Monday to Tuesday because the room was booked."
output = "Meeting moved to Tuesday."
"""


def test_builtin_tasks_ship_with_the_package() -> None:
    registry = TaskRegistry(locations.tasks_dir())
    tasks = {t.name: t for t in registry.list()}
    assert {"extract", "classify", "tool_call"} <= set(tasks)
    assert tasks["extract"].kind == "json" and tasks["extract"].output_schema
    assert tasks["classify"].labels and tasks["tool_call"].kind == "tool_call"
    assert "Message: I was charged twice" in tasks["classify"].prefix()


def test_add_override_and_remove(tmp_path: Path) -> None:
    registry = TaskRegistry(locations.tasks_dir())
    source = tmp_path / "summarize.toml"
    source.write_text(SUMMARIZE)
    task = registry.add_file(source)
    assert task.name == "summarize" and task.routing == "auto"
    with pytest.raises(ConflictError, match="already exists"):
        registry.add_file(source)
    override = tmp_path / "classify.toml"
    override.write_text('kind = "label"\nlabels = ["spam", "ham"]\n')
    registry.add_file(override)
    assert registry.get("classify").labels == ["spam", "ham"]
    registry.remove("classify")
    assert "billing" in registry.get("classify").labels  # the built-in is back
    with pytest.raises(BadRequestError, match="built in"):
        registry.remove("extract")
    with pytest.raises(NotFoundError, match="unknown task 'nope'"):
        registry.get("nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('kind = "json"\n', "has no output_schema"),
        ('kind = "label"\nlabels = ["one"]\n', "fewer than two labels"),
        ('routing = "sometimes"\n', "routing"),
        ("kind = [broken\n", "cannot read task file"),
    ],
)
def test_bad_task_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(BadRequestError, match=message):
        TaskRegistry(locations.tasks_dir()).add_file(path)


def test_tasks_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    source = tmp_path / "summarize.toml"
    source.write_text(SUMMARIZE)
    assert runner.invoke(cli, ["tasks", "add", str(source)]).exit_code == 0
    listed = runner.invoke(cli, ["tasks", "list"]).output
    assert "summarize" in listed and "extract" in listed
    shown = runner.invoke(cli, ["tasks", "show", "summarize"])
    assert '"routing": "auto"' in shown.output
    assert runner.invoke(cli, ["tasks", "rm", "summarize"]).exit_code == 0
    missing = runner.invoke(cli, ["tasks", "show", "summarize"])
    assert missing.exit_code == 1 and "unknown task" in missing.output


def test_trained_adapters_bind_to_tasks_unless_a_task_file_pins_one(tmp_path):
    (tmp_path / "pinned.toml").write_text('kind = "text"\nadapter = "mine"\n')
    registry = TaskRegistry(tmp_path)
    assert registry.bind_adapter("extract", "extract-v1").adapter == "extract-v1"  # type: ignore[union-attr]
    assert registry.bind_adapter("extract", "extract-v2").adapter == "extract-v2"  # type: ignore[union-attr]
    assert registry.bind_adapter("pinned", "pinned-v1") is None and registry.get("pinned").adapter == "mine"
    assert registry.bind_adapter("nope", "x") is None
    registry.reload()  # a binding outlives a reload of the task files
    assert registry.get("extract").adapter == "extract-v2"
