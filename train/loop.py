"""`train loop`: dataset → lora → eval → publish for every task whose data grew enough."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from slm_agent.errors import SlmAgentError
from slm_agent.train.box import TrainingBox
from slm_agent.train.data.collected import task_counts
from slm_agent.train.report import markdown_table, write_report
from slm_agent.train.settings import LoraConfig

Outcome = Literal["published", "not_better", "skipped", "failed"]


class TaskOutcome(BaseModel):
    task: str
    outcome: Outcome
    detail: str
    examples: int | None = None


class LoopReport(BaseModel):
    tasks: list[TaskOutcome] = Field(default_factory=list)


def run_loop(
    box: TrainingBox, config: LoraConfig, only: list[str] | None = None, log: Callable[[str], None] = print
) -> LoopReport:
    """One pass; a task's failure is reported and the loop goes on with the next task."""
    names = [n for n in (only or sorted(task_counts(box.settings.data))) if box.tasks.has(n)]
    report = LoopReport()
    for name in names:
        log(f"{name}: building dataset")
        report.tasks.append(_one(box, name, config, log))
    box.settings.workdir.mkdir(parents=True, exist_ok=True)
    rows = [[o.task, o.outcome, o.examples, o.detail] for o in report.tasks]
    write_report(
        box.settings.workdir,
        "loop",
        report,
        "# Training loop\n\n" + markdown_table(["task", "outcome", "examples", "detail"], rows) + "\n",
    )
    return report


def _one(box: TrainingBox, name: str, config: LoraConfig, log: Callable[[str], None]) -> TaskOutcome:
    ws = box.workspace(name)
    state_path = ws.folder / "loop.json"
    trained = json.loads(state_path.read_text())["examples"] if state_path.exists() else 0
    try:
        card = box.dataset(name)
        new = card.examples - trained
        if trained and new < box.settings.min_new_examples:
            return TaskOutcome(
                task=name,
                outcome="skipped",
                examples=card.examples,
                detail=f"{new} new examples since the last run (needs {box.settings.min_new_examples})",
            )
        log(f"{name}: training on {card.by_split['train']} examples")
        box.lora(name, config)
        log(f"{name}: evaluating")
        box.evaluate(name)
        state_path.write_text(json.dumps({"examples": card.examples, "dataset_sha256": card.dataset_sha256}))
        published = box.publish(name)
    except SlmAgentError as exc:
        outcome: Outcome = "not_better" if exc.code == "not_better" else "failed"
        return TaskOutcome(task=name, outcome=outcome, detail=exc.message)
    return TaskOutcome(
        task=name, outcome="published", examples=card.examples, detail=published.published.name
    )
