"""The training box's steps for one task, each a plain function the CLI and `train loop` share.

dataset -> lora (fine-tune, convert, parity) -> eval -> publish. Each step reads what the
previous one wrote in the task's workspace and writes a report (markdown + JSON) of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from slm_agent.contracts.tasks import Task, TaskRegistry
from slm_agent.contracts.wire import PublishedAdapter, scan_publish_dir
from slm_agent.errors import BadRequestError, ConflictError, NotFoundError
from slm_agent.models.manifest import ModelManifest
from slm_agent.models.store import ModelStore
from slm_agent.train.data.collected import read_traces
from slm_agent.train.data.dataset import DatasetCard, build_dataset, load_card, load_split, task_sha256
from slm_agent.train.data.tokenizer import ServingTokenizer
from slm_agent.train.evaluation.evaluate import (
    Candidate,
    EvalReport,
    eval_markdown,
    plot_report,
    run_candidates,
    select,
)
from slm_agent.train.report import markdown_table, plot_curve, write_report
from slm_agent.train.settings import LoraConfig, TrainSettings
from slm_agent.train.task_toml import shipped_task_file
from slm_agent.train.tuning.lora import StepReport, TrainResult
from slm_agent.train.workspace import Workspace

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class ParityFailed(BadRequestError):
    code = "parity_failed"


class LoraReport(BaseModel):
    task: str
    run: str
    base_model: str
    base_sha256: str
    train: TrainResult
    parity: dict[str, float | int | bool] = Field(description="PEFT vs llama.cpp val loss (quantize.parity).")
    adapter: str = Field(description="The converted GGUF adapter.")
    adapter_bytes: int


class PublishReport(BaseModel):
    task: str
    run: str
    published: PublishedAdapter
    beat: dict[str, float] = Field(description="Exact-match gain over each rival (base, published).")


class TrainingBox:
    def __init__(self, settings: TrainSettings, store: ModelStore, tasks: TaskRegistry) -> None:
        self.settings = settings
        self.store = store
        self.tasks = tasks

    # -- helpers ---------------------------------------------------------------------------------
    def workspace(self, task: str) -> Workspace:
        return Workspace(self.settings.workdir, task)

    def task(self, name: str) -> Task:
        return self.tasks.get(name)

    def base(self) -> ModelManifest:
        manifest = self.store.get(self.settings.base)
        if manifest.kind != "base":
            raise BadRequestError(f"{manifest.name!r} is a {manifest.kind}, not a base model", param="base")
        return manifest

    def base_path(self) -> Path:
        return self.store.path_of(self.base())

    def current_card(self, name: str) -> DatasetCard:
        """The task's dataset card, refused when the task's prompt or contract changed since."""
        card = load_card(self.workspace(name).dataset)
        if card.task_sha256 != task_sha256(self.task(name)):
            raise ConflictError(
                f"task {name!r} changed since its dataset was built (prompts would not match what the "
                f"daemon serves): run `slm-agent train dataset {name}` again"
            )
        return card

    # -- steps -----------------------------------------------------------------------------------
    def dataset(self, name: str, on_progress: ProgressFn | None = None) -> DatasetCard:
        task = self.task(name)
        traces = read_traces(self.settings.data, task.name)
        return build_dataset(
            task,
            traces,
            ServingTokenizer(self.base_path()),
            self.workspace(name).dataset,
            base_model=self.base().name,
            min_examples=self.settings.min_examples,
            val_fraction=self.settings.val_fraction,
            test_fraction=self.settings.test_fraction,
            near_duplicate=self.settings.near_duplicate,
            max_tokens=self.settings.max_tokens,
            prompt_format=self.base().prompt_format,
            on_progress=on_progress,
        )

    def lora(
        self,
        name: str,
        config: LoraConfig,
        *,
        run: str | None = None,
        hf_path: Path | None = None,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> LoraReport:
        """Fine-tune, convert to GGUF and check parity; a failed parity leaves no adapter.gguf."""
        from slm_agent.train.tuning.base import require_training_stack

        require_training_stack()
        from slm_agent.quantize.lora_gguf import convert_peft_adapter
        from slm_agent.quantize.parity import check_parity
        from slm_agent.train.tuning import lora
        from slm_agent.train.tuning.base import load_base, pick_device

        ws = self.workspace(name)
        card = self.current_card(name)
        train_set, val_set = load_split(ws.dataset, "train"), load_split(ws.dataset, "val")
        base = self.base()
        run_id = run or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = ws.run(run_id)
        device = pick_device(config.device)
        model = load_base(
            self.base_path(),
            base.sha256,
            self.settings.base_cache,
            hf_path=hf_path,
            qlora=config.qlora,
            device=device,
        )
        result, _ = lora.train(
            model,
            train_set,
            val_set,
            run_dir,
            config,
            dataset_sha256=card.dataset_sha256,
            device=device,
            on_step=on_step,
        )
        # Parity is measured on the adapter that ships (the best checkpoint) and on the same
        # examples its val loss came from.
        held = lora.eval_set(train_set, val_set, config)
        candidate = run_dir / ".adapter.unchecked.gguf"
        converted = convert_peft_adapter(run_dir / "peft", self.base_path(), candidate)
        parity = check_parity(
            self.base_path(),
            candidate,
            [(e.prompt_ids, e.answer_ids) for e in held],
            result.best_val_loss,
            self.settings.parity_tolerance,
            result.base_val_loss,
        )
        report = LoraReport(
            task=name,
            run=run_id,
            base_model=base.name,
            base_sha256=base.sha256,
            train=result,
            parity=parity.model_dump(),
            adapter=str(run_dir / "adapter.gguf"),
            adapter_bytes=converted.size,
        )
        self._lora_report(run_dir, report)
        if not parity.passed:
            candidate.unlink(missing_ok=True)
            raise ParityFailed(
                f"the converted adapter does not match PEFT: val loss {parity.llama_loss:.4f} in llama.cpp vs "
                f"{parity.peft_loss:.4f} in PEFT (tolerance {parity.tolerance}); it was not kept. "
                f"See {run_dir / 'lora.md'}"
            )
        candidate.replace(run_dir / "adapter.gguf")
        return report

    def _lora_report(self, run_dir: Path, report: LoraReport) -> None:
        history = report.train.history
        plot = None
        if history:
            plot = plot_curve(
                run_dir / "loss.png",
                {
                    "train loss": [(h["step"], h["loss"]) for h in history],
                    "val loss": [(h["step"], h["val_loss"]) for h in history],
                },
                f"{report.task}: LoRA run {report.run}",
                "step",
                "answer loss (nats/token)",
            )
        t, p = report.train, report.parity
        rows = [
            ["steps", f"{t.steps} of {t.total_steps}" + (" (stopped early)" if t.stopped_early else "")],
            ["best step", t.best_step],
            ["val loss: base → adapter", f"{t.base_val_loss:.4f} → {t.best_val_loss:.4f}"],
            ["seconds per step", t.seconds_per_step],
            ["trainable parameters", t.trainable_params],
            ["device", t.device],
            [
                "parity: PEFT vs llama.cpp val loss",
                f"{p['peft_loss']} vs {p['llama_loss']} (|Δ| {p['difference']} ≤ {p['tolerance']}: {'pass' if p['passed'] else 'FAIL'})",
            ],
            ["adapter", f"{report.adapter} ({report.adapter_bytes / 1e6:.1f} MB)"],
        ]
        md = f"# LoRA run {report.run} for {report.task}\n\n" + markdown_table(["", ""], rows) + "\n"
        if plot:
            md += "\n![loss](loss.png)\n"
        write_report(run_dir, "lora", report, md)

    def candidates(self, name: str) -> list[Candidate]:
        base = self.base()
        base_path = self.store.path_of(base)
        fmt = base.prompt_format
        found = [
            Candidate(
                name=base.name, kind="base", model_path=base_path, prompt_format=fmt, size_bytes=base.size
            )
        ]
        ws = self.workspace(name)
        current = self.published(name)
        runs = sorted(ws.runs.glob("*/adapter.gguf")) if ws.runs.is_dir() else []
        for path in runs[-3:]:
            run_name = f"{name}-{path.parent.name}"
            if current is None or current.name != run_name:  # a published run is scored as "published"
                found.append(
                    Candidate(
                        name=run_name,
                        kind="adapter",
                        model_path=base_path,
                        adapter_path=path,
                        prompt_format=fmt,
                        size_bytes=base.size + path.stat().st_size,
                    )
                )
        if current is not None:
            path = self.settings.publish_dir / current.name / current.file
            found.append(
                Candidate(
                    name=current.name,
                    kind="published",
                    model_path=base_path,
                    adapter_path=path,
                    prompt_format=fmt,
                    size_bytes=base.size + current.size,
                )
            )
        for other in self.store.list("base"):
            if other.name != base.name:
                found.append(
                    Candidate(
                        name=other.name,
                        kind="other_base",
                        model_path=self.store.path_of(other),
                        prompt_format=other.prompt_format,
                        size_bytes=other.size,
                    )
                )
        found.append(Candidate(name="remote", kind="remote"))
        return found

    def evaluate(self, name: str, *, bar: float = 0.9, on_progress: ProgressFn | None = None) -> EvalReport:
        task = self.task(name)
        ws = self.workspace(name)
        card = self.current_card(name)
        test = load_split(ws.dataset, "test")
        started = time.perf_counter()
        results = run_candidates(task, test, self.candidates(name), on_progress=on_progress)
        report = EvalReport(
            task=name,
            dataset_sha256=card.dataset_sha256,
            examples=len(test),
            bar=bar,
            candidates=results,
            selected=select(results, bar),
            seconds=round(time.perf_counter() - started, 2),
        )
        ws.eval.mkdir(parents=True, exist_ok=True)
        plot_report(report, ws.eval / "eval.png")
        write_report(ws.eval, "eval", report, eval_markdown(report, "eval.png"))
        return report

    def _task_files(self, name: str) -> dict[str, str] | None:
        """A chat-shaped task was discovered here: the device learns its definition with the adapter."""
        task = self.task(name)
        return {name: shipped_task_file(task)} if task.form == "chat" else None

    def published(self, name: str) -> PublishedAdapter | None:
        mine = [a for a in scan_publish_dir(self.settings.publish_dir) if name in a.tasks]
        return max(mine, key=lambda a: a.created_at) if mine else None

    def publish(self, name: str, run: str | None = None) -> PublishReport:
        """Publish the run's adapter if it beats the base and the published adapter by the margin."""
        from slm_agent.collector.publish import publish_adapter

        ws = self.workspace(name)
        path = ws.eval / "eval.json"
        if not path.exists():
            raise NotFoundError(f"task {name!r} has no eval report: run `slm-agent train eval {name}` first")
        report = EvalReport.model_validate_json(path.read_text())
        card = self.current_card(name)
        if report.dataset_sha256 != card.dataset_sha256:
            raise ConflictError(
                f"the eval report predates the current dataset of {name!r}: run `train eval` again"
            )
        adapters = [c for c in report.candidates if c.kind == "adapter"]
        if run is not None:
            adapters = [c for c in adapters if c.name == f"{name}-{run}"]
        if not adapters:
            raise NotFoundError(
                f"no evaluated adapter {'for run ' + run if run else ''} of {name!r}: run `train lora` and `train eval`"
            )
        best = max(adapters, key=lambda c: (c.metrics.exact_match, c.metrics.f1))
        run_id = best.name.removeprefix(f"{name}-")
        rivals = [c for c in report.candidates if c.kind in ("base", "published")]
        gains = {c.name: round(best.metrics.exact_match - c.metrics.exact_match, 4) for c in rivals}
        short = {k: v for k, v in gains.items() if v < self.settings.margin}
        if short:
            why = ", ".join(f"{k} by {v:+.3f}" for k, v in short.items())
            raise BadRequestError(
                f"{best.name} does not beat its rivals by the margin {self.settings.margin} on exact match "
                f"({why}); nothing was published",
                code="not_better",
            )
        lora_path = ws.run(run_id) / "lora.json"
        if not lora_path.exists():
            raise NotFoundError(
                f"run {run_id} of {name!r} has no lora report: train it with `train lora --run {run_id}`"
            )
        lora_report = LoraReport.model_validate_json(lora_path.read_text())
        metrics = {
            "exact_match": best.metrics.exact_match,
            "f1": best.metrics.f1,
            "valid_rate": best.metrics.valid_rate,
            "test_examples": float(best.metrics.n),
        }
        published = publish_adapter(
            ws.run(run_id) / "adapter.gguf",
            self.settings.publish_dir,
            name=best.name,
            tasks=[name],
            base_sha256=lora_report.base_sha256,
            metrics=metrics,
            dataset_sha256=card.dataset_sha256,
            training=lora_report.train.config.model_dump(),
            task_files=self._task_files(name),
        )
        result = PublishReport(task=name, run=run_id, published=published, beat=gains)
        rows = [[k, f"{v:+.3f}"] for k, v in gains.items()]
        md = (
            f"# Published {published.name}\n\nTask `{name}`, run `{run_id}`, exact match "
            f"{best.metrics.exact_match:.3f} on {best.metrics.n} held-out examples.\n\n"
            + markdown_table(["rival", "exact-match gain"], rows)
            + f"\n\nIn {self.settings.publish_dir / published.name}; devices get it with `slm-agent sync pull`.\n"
        )
        write_report(ws.run(run_id), "publish", result, md)
        return result
