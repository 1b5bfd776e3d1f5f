"""``slm-agent train``: the training box, one command per step, plus ``loop`` for all of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from slm_agent.commands import CommandGroup, emit, json_option
from slm_agent.console import console
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.models.bundled import BUNDLED_NAME, ensure_bundled
from slm_agent.models.store import ModelStore
from slm_agent.progress import rich_progress
from slm_agent.runtime.config import load_settings
from slm_agent.train.box import TrainingBox
from slm_agent.train.discovery.discover_cli import discover
from slm_agent.train.loop import run_loop
from slm_agent.train.settings import LoraConfig, TrainSettings


def _box(**overrides: Any) -> TrainingBox:
    daemon = load_settings()
    tasks_dir = overrides.pop("tasks_dir", None) or daemon.tasks_dir
    settings = TrainSettings(**{k: v for k, v in overrides.items() if v is not None})
    store = ModelStore(daemon.store_dir)
    if settings.base == BUNDLED_NAME and not store.has(BUNDLED_NAME):
        with rich_progress("assembling bundled model") as progress:
            ensure_bundled(store, progress)
    return TrainingBox(settings, store, TaskRegistry(tasks_dir))


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--data", help="Collected traces: the collector's data dir or URL (default: the collector's)."
        ),
        click.option("--workdir", type=click.Path(path_type=Path), help="Datasets, runs and reports."),
        click.option("--base", help="Base model (store name) the adapters are trained on."),
        click.option(
            "--tasks-dir", type=click.Path(path_type=Path), help="Task TOML files (default: the daemon's)."
        ),
        click.option("--publish-dir", type=click.Path(path_type=Path), help="Where published adapters go."),
        json_option(help="Print the report as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(cls=CommandGroup)
def train() -> None:
    """Turn collected traces into better task adapters: dataset, lora, eval, publish (or loop)."""


train.add_command(discover)


@train.command()
@click.argument("task")
@_common
@click.option("--min-examples", type=int, help="Fewest labeled examples to accept.")
def dataset(task: str, as_json: bool, **opts: Any) -> None:
    """Build TASK's dataset: label, scrub, dedup, split, tokenize; writes Parquet + a card.

    \b
    Example usage:
      slm-agent train dataset extract
      slm-agent train dataset extract --data s3://bucket/traces --min-examples 200
    """
    box = _box(**opts)
    with rich_progress(f"building {task} dataset", unit="items") as progress:
        card = box.dataset(task, progress)
    folder = box.workspace(task).dataset
    emit(
        card,
        as_json,
        f"{card.examples} examples ({', '.join(f'{k} {v}' for k, v in card.by_split.items())}) "
        f"from {card.traces} traces → {folder}/card.md",
    )


@train.command()
@click.argument("task")
@_common
@click.option("--run", "run_id", help="Run id (resumes the run of that id if it exists).")
@click.option(
    "--hf",
    "hf_path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Train on the base's Hugging Face original instead of the dequantized GGUF.",
)
@click.option("--rank", type=int, help="LoRA rank (default 8).")
@click.option("--alpha", type=float, help="LoRA alpha (default 16).")
@click.option("--lr", "learning_rate", type=float, help="Learning rate (default 1e-3).")
@click.option("--epochs", type=float, help="Passes over the training split (default 3).")
@click.option("--max-steps", type=int, help="Stop after this many steps (overrides --epochs).")
@click.option("--batch-size", type=int, help="Examples per step (default 8).")
@click.option("--eval-every", type=int, help="Steps between val-loss checks and checkpoints.")
@click.option("--patience", type=int, help="Val checks without improvement before stopping.")
@click.option("--seed", type=int, help="Seed for initialisation and batch order (default 0).")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Default: GPU when torch sees one."
)
@click.option("--qlora", is_flag=True, default=None, help="4-bit base via bitsandbytes (GPU).")
def lora(task: str, as_json: bool, run_id: str | None, hf_path: Path | None, **opts: Any) -> None:
    """Fine-tune a LoRA adapter for TASK, convert it to GGUF and check parity with llama.cpp.

    \b
    Example usage:
      slm-agent train lora extract
      slm-agent train lora extract --max-steps 200 --lr 5e-4 --run nightly   # resumable
    """
    fields = set(LoraConfig.model_fields)
    config = LoraConfig(**{k: v for k, v in opts.items() if k in fields and v is not None})
    box = _box(**{k: v for k, v in opts.items() if k not in fields})
    with _step_progress(task) as on_step:
        report = box.lora(task, config, run=run_id, hf_path=hf_path, on_step=on_step)
    t = report.train
    emit(
        report,
        as_json,
        f"run {report.run}: {t.steps} steps, val loss {t.base_val_loss:.3f} → "
        f"{t.best_val_loss:.3f}, parity |Δ| {report.parity['difference']} → {report.adapter}",
    )


@contextmanager
def _step_progress(task: str) -> Iterator[Callable[[Any], None]]:
    with rich_progress(f"training {task}", unit="items") as progress:

        def on_step(step: Any) -> None:
            if step.val_loss is not None:
                console(stderr=True).log(
                    f"step {step.step}/{step.total}: loss {step.loss:.4f}, val {step.val_loss:.4f}"
                )
            progress(step.step, step.total)

        yield on_step


@train.command("eval")
@click.argument("task")
@_common
@click.option("--bar", type=float, default=0.9, show_default=True, help="Exact match a candidate must reach.")
def eval_(task: str, as_json: bool, bar: float, **opts: Any) -> None:
    """Score base, adapters, published adapter, other bases and the remote on TASK's test set.

    \b
    Example usage:
      slm-agent train eval extract
    """
    box = _box(**opts)
    with rich_progress(f"evaluating {task}", unit="items") as progress:
        report = box.evaluate(task, bar=bar, on_progress=progress)
    lines = [
        f"{c.name:<40} exact {c.metrics.exact_match:.3f}  f1 {c.metrics.f1:.3f}  valid {c.metrics.valid_rate:.3f}"
        for c in report.candidates
    ]
    emit(report, as_json, "\n".join([*lines, f"report: {box.workspace(task).eval / 'eval.md'}"]))


@train.command()
@click.argument("task")
@_common
@click.option("--run", "run_id", help="Publish this run (default: the best evaluated one).")
@click.option("--margin", type=float, help="Exact-match gain needed over base and the published adapter.")
def publish(task: str, as_json: bool, run_id: str | None, **opts: Any) -> None:
    """Publish TASK's adapter for devices, only if it beats base and the current one by the margin.

    \b
    Example usage:
      slm-agent train publish extract
    """
    box = _box(**opts)
    report = box.publish(task, run_id)
    emit(report, as_json, f"published {report.published.name} → {box.settings.publish_dir}")


@train.command()
@_common
@click.option("--task", "only", multiple=True, help="Only these tasks (repeatable).")
@click.option(
    "--min-new", "min_new_examples", type=int, help="New labeled examples needed to retrain a task."
)
@click.option("--max-steps", type=int, help="Training steps per task.")
def loop(as_json: bool, only: tuple[str, ...], max_steps: int | None, **opts: Any) -> None:
    """dataset → lora → eval → publish for every task with enough new data (for cron or a GPU box).

    \b
    Example usage:
      slm-agent train loop
      slm-agent train loop --task extract --min-new 50
    """
    config = LoraConfig(**({"max_steps": max_steps} if max_steps else {}))
    box = _box(**opts)
    report = run_loop(box, config, list(only) or None, log=lambda msg: console(stderr=True).log(msg))
    emit(
        report,
        as_json,
        "\n".join(f"{r.task}: {r.outcome} — {r.detail}" for r in report.tasks) or "no tasks with data",
    )
