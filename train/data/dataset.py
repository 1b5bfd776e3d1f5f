"""`train dataset TASK`: collected traces -> labeled, scrubbed, deduplicated, split, tokenized.

Writes ``train/val/test.parquet`` and a dataset card (markdown + JSON) into the task's
workspace. The split depends only on each input, so an example held out once stays held out.
A chat-shaped task's input is the agent's whole request (``train.data.chat``); its dedup and split are
keyed on the request's variable content, since every call repeats the same system prompt and tools.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from slm_agent.atomic import replace_dir
from slm_agent.contracts.clock import utcnow
from slm_agent.contracts.tasks import Task
from slm_agent.errors import BadRequestError, NotFoundError
from slm_agent.models.manifest import PromptFormat
from slm_agent.privacy.scrub import Sanitizer
from slm_agent.train.data.chat import ChatInput, example_prompt
from slm_agent.train.data.collected import CollectedTrace
from slm_agent.train.data.dedup import Split, near_duplicate_groups, stable_split
from slm_agent.train.data.labels import SOURCES, Labeled, Unusable, canonical, given_answer, label_trace
from slm_agent.train.data.tokenizer import ServingTokenizer, answer_text
from slm_agent.train.report import markdown_table, write_report

SPLITS: tuple[Split, ...] = ("train", "val", "test")


class Example(BaseModel):
    id: str = Field(description="The trace this example came from.")
    input: str = Field(
        description="The task input; for a chat-shaped task the request as JSON (train.data.chat)."
    )
    tools: list[dict[str, Any]] | None = None
    label: str
    source: str
    teacher: str | None = Field(None, description="The remote LLM's answer, when the call was escalated.")
    split: Split
    created_at: str
    prompt_ids: list[int]
    answer_ids: list[int]


class LengthStats(BaseModel):
    min: int
    mean: float
    p95: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        arr = np.asarray(values or [0])
        return cls(
            min=int(arr.min()),
            mean=round(float(arr.mean()), 1),
            p95=int(np.percentile(arr, 95)),
            max=int(arr.max()),
        )


class DatasetCard(BaseModel):
    task: str
    task_sha256: str = Field(description="Hash of the task definition the prompts were built from.")
    base_model: str
    tokenizer: str = Field(description="The GGUF whose llama.cpp tokenizer made the ids.")
    dataset_sha256: str = Field(description="Hash of every example's id, label and split.")
    traces: int
    examples: int
    by_source: dict[str, int]
    by_split: dict[str, int]
    dropped: dict[str, int] = Field(description="Why traces were not used, with counts.")
    redactions: int = Field(description="Personal data values replaced by placeholders.")
    prompt_tokens: LengthStats
    answer_tokens: LengthStats
    created_at: str


def task_sha256(task: Task) -> str:
    fields = task.model_dump(
        include={
            "name",
            "kind",
            "instructions",
            "input_label",
            "output_label",
            "output_schema",
            "labels",
            "tools",
            "examples",
        }
    )
    if task.form == "chat":  # only then: the hash of a task-shaped task stays what it was
        fields["form"] = task.form
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def build_dataset(
    task: Task,
    traces: list[CollectedTrace],
    tokenizer: ServingTokenizer,
    out: Path,
    *,
    base_model: str,
    min_examples: int = 20,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    near_duplicate: float = 0.9,
    max_tokens: int = 512,
    prompt_format: PromptFormat | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DatasetCard:
    """``prompt_format`` is the base model's (a chat-shaped task's prompt is built with it)."""
    fmt = task.prompt_format or prompt_format or PromptFormat()
    mine = [t for t in traces if t.belongs_to(task.name)]
    if not mine:
        raise NotFoundError(
            f"no collected traces for task {task.name!r}: serve it on a device and push its traces first",
            param="task",
        )
    dropped: Counter[str] = Counter()
    labeled: list[tuple[CollectedTrace, Labeled]] = []
    for trace in mine:
        if not trace.input or (task.form == "chat" and ChatInput.of(trace) is None):
            dropped["no input"] += 1
            continue
        result = label_trace(task, trace)
        if isinstance(result, Labeled):
            labeled.append((trace, result))
        else:
            dropped[result.reason] += 1
    if not labeled:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common())
        raise BadRequestError(
            f"task {task.name!r} has no labeled examples among {len(mine)} traces ({reasons}): add "
            "corrections (slm-agent traces feedback / the TUI), rate good answers, or let it escalate",
            code="no_labels",
        )
    # Best label first (correction, remote, rated local), newest first: dedup keeps the first.
    labeled.sort(key=lambda p: p[0].created_at, reverse=True)
    labeled.sort(key=lambda p: SOURCES.index(p[1].source))
    sanitizer = Sanitizer()
    found: dict[str, int] = {}
    rows = [_row(task, trace, lab, sanitizer, found) for trace, lab in labeled]
    redactions = sum(found.values())
    owners = near_duplicate_groups([r.key for r in rows], near_duplicate)
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if on_progress:
            on_progress(i + 1, len(rows))
        if owners[i] != i:
            dropped["duplicate"] += 1
            continue
        trace, text, label, tools = row.trace, row.text, row.label, row.tools
        prefix, body, _ = example_prompt(task, text, tools, fmt)
        prompt = tokenizer.prompt(prefix, body)
        answer, eos = answer_text(task, label)
        answer_ids = tokenizer.answer(answer, eos=eos)
        if len(prompt) + len(answer_ids) > max_tokens:
            dropped["too long"] += 1
            continue
        examples.append(
            Example(
                id=trace.id,
                input=text,
                tools=tools,
                label=label,
                source=row.source,
                teacher=_teacher(task, trace, tools),
                split=stable_split(row.key, val_fraction, test_fraction),
                created_at=trace.created_at,
                prompt_ids=prompt,
                answer_ids=answer_ids,
            )
        )
    by_split = Counter(e.split for e in examples)
    if len(examples) < min_examples or not by_split["train"] or not by_split["test"]:
        raise BadRequestError(
            f"task {task.name!r} has {len(examples)} usable examples (train {by_split['train']}, "
            f"test {by_split['test']}); at least {min_examples} with some in train and test are needed: "
            "collect more traces with labels",
            code="dataset_too_small",
        )
    examples.sort(key=lambda e: (e.created_at, e.id))
    card = DatasetCard(
        task=task.name,
        task_sha256=task_sha256(task),
        base_model=base_model,
        tokenizer=tokenizer.model_path.name,
        dataset_sha256=_hash(examples),
        traces=len(mine),
        examples=len(examples),
        by_source={s: n for s in SOURCES if (n := sum(e.source == s for e in examples))},
        by_split={s: by_split[s] for s in SPLITS},
        dropped=dict(dropped.most_common()),
        redactions=redactions,
        prompt_tokens=LengthStats.of([len(e.prompt_ids) for e in examples]),
        answer_tokens=LengthStats.of([len(e.answer_ids) for e in examples]),
        created_at=utcnow(),
    )
    _write(out, examples, card)
    return card


class _Row(BaseModel):
    """A labeled trace, scrubbed: its input text, the key dedup and the split use, its label."""

    trace: CollectedTrace
    text: str
    key: str
    label: str
    source: str
    tools: list[dict[str, Any]] | None


def _row(
    task: Task, trace: CollectedTrace, lab: Labeled, sanitizer: Sanitizer, found: dict[str, int]
) -> _Row:
    # Input and label are one row to the sanitizer: a value copied from input to answer gets the
    # same placeholder in both.
    if task.form == "chat":
        request = ChatInput.of(trace)
        assert request is not None  # traces without messages were dropped as "no input"
        clean = sanitizer.clean({"input": request.model_dump(exclude_none=True), "label": lab.label}, found)
        scrubbed = ChatInput.model_validate(clean["input"])
        text, key, tools = scrubbed.to_text(), scrubbed.content(), scrubbed.tools
    else:
        clean = sanitizer.clean({"input": trace.input or "", "label": lab.label}, found)
        text = key = clean["input"]
        tools = trace.tools or task.tools or None
    return _Row(trace=trace, text=text, key=key, label=clean["label"], source=lab.source, tools=tools)


def _teacher(task: Task, trace: CollectedTrace, tools: list[dict[str, Any]] | None) -> str | None:
    if trace.route != "remote" or trace.status >= 400:
        return None
    answer = given_answer(trace)
    return None if isinstance(answer, Unusable) else canonical(task, answer, tools)


def _hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.id):
        digest.update(f"{e.id}\0{e.label}\0{e.split}\n".encode())
    return digest.hexdigest()


_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input", pa.string()),
        ("tools", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("teacher", pa.string()),
        ("split", pa.string()),
        ("created_at", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("answer_ids", pa.list_(pa.int32())),
    ]
)


def _write(out: Path, examples: list[Example], card: DatasetCard) -> None:
    """Build the whole dataset in a sibling folder, then swap it in: a crash leaves the old one."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split in SPLITS:
        rows = [e for e in examples if e.split == split]
        table = pa.table(
            {
                "id": [e.id for e in rows],
                "input": [e.input for e in rows],
                "tools": [json.dumps(e.tools) if e.tools else None for e in rows],
                "label": [e.label for e in rows],
                "source": [e.source for e in rows],
                "teacher": [e.teacher for e in rows],
                "split": [e.split for e in rows],
                "created_at": [e.created_at for e in rows],
                "prompt_ids": [e.prompt_ids for e in rows],
                "answer_ids": [e.answer_ids for e in rows],
            },
            schema=_SCHEMA,
        )
        pq.write_table(table, tmp / f"{split}.parquet")
    write_report(tmp, "card", card, card_markdown(card))
    replace_dir(tmp, out)


def card_markdown(card: DatasetCard) -> str:
    lengths = markdown_table(
        ["tokens", "min", "mean", "p95", "max"],
        [
            [
                "prompt",
                card.prompt_tokens.min,
                card.prompt_tokens.mean,
                card.prompt_tokens.p95,
                card.prompt_tokens.max,
            ],
            [
                "answer",
                card.answer_tokens.min,
                card.answer_tokens.mean,
                card.answer_tokens.p95,
                card.answer_tokens.max,
            ],
        ],
    )
    return (
        "\n\n".join(
            part.strip()
            for part in [
                f"# Dataset card: {card.task}",
                f"{card.examples} examples from {card.traces} collected traces; base `{card.base_model}`, "
                f"tokenized with llama.cpp's tokenizer of `{card.tokenizer}`; built {card.created_at}.",
                "## By label source\n\n"
                + markdown_table(["source", "examples"], [[k, v] for k, v in card.by_source.items()]),
                "## By split\n\n"
                + markdown_table(["split", "examples"], [[k, v] for k, v in card.by_split.items()]),
                "## Dropped\n\n"
                + (
                    markdown_table(["reason", "traces"], [[k, v] for k, v in card.dropped.items()])
                    if card.dropped
                    else "Nothing."
                ),
                f"## Lengths\n\n{lengths}",
                f"{card.redactions} personal-data values were replaced by placeholders.\n\n"
                f"dataset sha256 `{card.dataset_sha256}`, task sha256 `{card.task_sha256}`",
            ]
        )
        + "\n"
    )


def load_split(folder: Path, split: Split) -> list[Example]:
    path = Path(folder) / f"{split}.parquet"
    if not path.exists():
        raise NotFoundError(f"no dataset at {folder}: run `slm-agent train dataset TASK` first")
    rows = pq.read_table(path).to_pylist()
    return [
        Example.model_validate({**r, "tools": json.loads(r["tools"]) if r["tools"] else None}) for r in rows
    ]


def load_card(folder: Path) -> DatasetCard:
    path = Path(folder) / "card.json"
    if not path.exists():
        raise NotFoundError(f"no dataset at {folder}: run `slm-agent train dataset TASK` first")
    return DatasetCard.model_validate_json(path.read_text())
