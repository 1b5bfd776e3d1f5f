"""`train eval TASK`: every candidate on the held-out test set, run as the daemon runs it.

Candidates: the base model, each trained adapter, the currently published adapter, every other
base model in the store (SLM selection: the smallest that meets the bar), and the remote
teacher's own answers where calls were escalated. Each local candidate goes through the daemon's
engine with the task's prompt, stop strings and grammar, so the numbers are what a device sees;
a chat-shaped task's prompt is the agent's own request (``train.data.chat.example_prompt``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from slm_agent.contracts.scoring import score_example
from slm_agent.contracts.tasks import Task
from slm_agent.models.manifest import PromptFormat
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest
from slm_agent.runtime.engine.grammars import task_grammar
from slm_agent.train.data.chat import example_prompt
from slm_agent.train.data.dataset import Example
from slm_agent.train.evaluation.metrics import TaskMetrics, aggregate
from slm_agent.train.report import markdown_table, plot_metrics

CandidateKind = Literal["base", "adapter", "published", "other_base", "remote"]


class Candidate(BaseModel):
    name: str
    kind: CandidateKind
    model_path: Path | None = None
    adapter_path: Path | None = None
    prompt_format: PromptFormat | None = Field(None, description="The base's format (free-text stops).")
    size_bytes: int = Field(0, description="Base file plus adapter file: what a device must hold.")


class CandidateResult(BaseModel):
    name: str
    kind: CandidateKind
    adapter: str | None = None
    metrics: TaskMetrics
    size_bytes: int
    load_s: float | None = None


class EvalReport(BaseModel):
    task: str
    dataset_sha256: str
    examples: int
    bar: float = Field(description="Exact match a candidate needs to count as good enough.")
    candidates: list[CandidateResult]
    selected: str | None = Field(None, description="The smallest local candidate that meets the bar.")
    seconds: float

    def get(self, name: str) -> CandidateResult | None:
        return next((c for c in self.candidates if c.name == name), None)


def run_candidates(
    task: Task,
    test: Sequence[Example],
    candidates: Sequence[Candidate],
    *,
    n_threads: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[CandidateResult]:
    """Local candidates through the engine (one engine per base file), the remote from the labels."""
    results: list[CandidateResult] = []
    local = [c for c in candidates if c.kind != "remote"]
    total, done = len(local) * len(test), 0
    by_base: dict[Path, list[Candidate]] = {}
    for cand in local:
        assert cand.model_path is not None
        by_base.setdefault(cand.model_path, []).append(cand)
    width = max((len(e.prompt_ids) + len(e.answer_ids) for e in test), default=0)
    for model_path, group in by_base.items():
        started = time.perf_counter()
        engine = Engine(
            EngineConfig(
                model_path=model_path,
                n_ctx=max(512, width + task.sampling.max_tokens + 64),
                n_threads=n_threads,
            )
        )
        engine.load()
        try:
            load_s = time.perf_counter() - started
            for cand in group:
                if cand.adapter_path is not None:
                    engine.load_adapter(cand.name, cand.adapter_path)
                scores, latencies = [], []
                for example in test:
                    fmt = task.prompt_format or cand.prompt_format or PromptFormat()
                    prefix, body, stop = example_prompt(task, example.input, example.tools, fmt)
                    grammar = task_grammar(task, example.tools)
                    req = engine.prepare(
                        GenerationRequest(
                            prefix=prefix,
                            body=body,
                            adapter=cand.name if cand.adapter_path else None,
                            max_tokens=task.sampling.max_tokens,
                            temperature=0.0,
                            stop=stop,
                            grammar=grammar,
                        )
                    )
                    result = engine.generate(req)
                    answer = None if result.finish_reason == "length" else result.text.strip()
                    scores.append(score_example(task, answer, example.label, example.tools))
                    latencies.append(result.total_ms)
                    done += 1
                    if on_progress:
                        on_progress(done, total)
                results.append(
                    CandidateResult(
                        name=cand.name,
                        kind=cand.kind,
                        adapter=cand.adapter_path.name if cand.adapter_path else None,
                        metrics=aggregate(scores, latencies),
                        size_bytes=cand.size_bytes,
                        load_s=round(load_s, 3),
                    )
                )
        finally:
            engine.shutdown()
    for cand in candidates:
        if cand.kind == "remote":
            taught = [e for e in test if e.teacher is not None]
            if taught:
                metrics = aggregate([score_example(task, e.teacher, e.label, e.tools) for e in taught])
                results.append(CandidateResult(name=cand.name, kind="remote", metrics=metrics, size_bytes=0))
    return results


def select(results: Sequence[CandidateResult], bar: float) -> str | None:
    good = [r for r in results if r.kind != "remote" and r.metrics.exact_match >= bar]
    return min(good, key=lambda r: (r.size_bytes, -r.metrics.exact_match)).name if good else None


def eval_markdown(report: EvalReport, plot: str | None) -> str:
    rows = [
        [
            r.name,
            r.kind,
            r.metrics.n,
            r.metrics.exact_match,
            r.metrics.f1,
            r.metrics.valid_rate,
            r.metrics.latency_ms_p50,
            r.metrics.latency_ms_p95,
            round(r.size_bytes / 1e6, 1) if r.size_bytes else None,
        ]
        for r in report.candidates
    ]
    table = markdown_table(
        ["candidate", "kind", "n", "exact match", "F1", "valid", "p50 ms", "p95 ms", "size MB"], rows
    )
    chosen = (
        f"Smallest local candidate at exact match ≥ {report.bar}: **{report.selected}**."
        if report.selected
        else f"No local candidate reaches exact match {report.bar}."
    )
    parts = [
        f"# Eval: {report.task}",
        f"{report.examples} held-out test examples (dataset `{report.dataset_sha256[:12]}`), {report.seconds:.1f} s.",
        table,
        chosen,
    ]
    if plot:
        parts.append(f"![metrics]({plot})")
    return "\n\n".join(parts) + "\n"


def plot_report(report: EvalReport, path: Path) -> Path:
    names = [r.name for r in report.candidates]
    return plot_metrics(
        path,
        names,
        {
            "exact match": [r.metrics.exact_match for r in report.candidates],
            "F1": [r.metrics.f1 for r in report.candidates],
            "valid": [r.metrics.valid_rate for r in report.candidates],
        },
        f"{report.task}: held-out test ({report.examples} examples)",
    )
