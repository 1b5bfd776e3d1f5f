"""Task discovery: group collected traces by template, then by content; propose a task per big group.

Agent calls are grouped by their template signature first (``train.discovery.templates``): one agent step
is one group whatever each call asks, and becomes a chat-shaped proposal that keeps the agent's
own request as its input, with the signature, a centroid and a match threshold the device matches
new calls with. Planning requests are never proposed. Traces without a usable template (task-API
calls, bare questions) are embedded with the int8 sentence encoder and clustered (average linkage
over cosine distance, deterministic), each cluster split by the shape of its answers, since one
task has one output contract; they become task-shaped proposals with instructions.

Groups with at least ``min_size`` traces become proposals: a name, a kind and output contract
inferred from the answers (a trace's correction wins over what the model said) and few-shot
examples, ready to be written as a task TOML file; accepting one also tags its traces on the
collector (``collector.tags``) so ``train dataset`` finds them at once.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from slm_agent.atomic import write_atomic
from slm_agent.collector.tags import write_tags
from slm_agent.contracts.centroids import MATCH_MAX_TOKENS
from slm_agent.contracts.signature import message_text, request_content
from slm_agent.contracts.tasks import TASK_NAME_RE, Example, parse_task
from slm_agent.errors import BadRequestError, ConflictError
from slm_agent.models.encoder import Encoder
from slm_agent.progress import ProgressFn
from slm_agent.quantize.encoder import ensure_encoder
from slm_agent.train.data.collected import CollectedTrace
from slm_agent.train.data.contract import (
    AnswerShape,
    Kind,
    answer_of,
    answer_shape,
    answer_text,
    infer_contract,
    infer_tools,
    instructions,
    is_tool_call,
)
from slm_agent.train.discovery.names import TaskNames
from slm_agent.train.discovery.templates import (
    TemplateGroup,
    chat_contract,
    group_by_template,
    is_planning,
    placement,
    split_by_answers,
)
from slm_agent.train.task_toml import task_toml

DEFAULT_MIN_SIZE = 5
# Average-linkage cosine distance: clusters merge while their members are, on average, more alike
# than cosine 0.2. Unrelated sentences sit near 0 with MiniLM, one templated request family near 0.4.
DEFAULT_THRESHOLD = 0.8
MAX_EXAMPLE_INPUTS = 5
FEW_SHOT = 3
# Above this many traces, cluster a fixed sample and assign the rest to the nearest centroid:
# agglomerative clustering needs the full pairwise distance matrix.
MAX_CLUSTER_POINTS = 2000


class TaskProposal(BaseModel):
    """A task suggested by one group of traces, with its inferred output contract."""

    cluster: int = Field(description="Group id: groups are numbered by size, largest first.")
    size: int
    share: float = Field(description="Fraction of the traces with an input that fell in this cluster.")
    name: str = Field(description="Suggested task name: unique among proposals, valid as a task name.")
    existing_task: str | None = Field(None, description="The task most of these traces already carry.")
    keywords: list[str] = Field(default_factory=list, description="Words distinctive of this cluster.")
    form: Literal["task", "chat"] = Field(
        "task", description="chat: one agent step, served in the agent's own request form."
    )
    signature: str | None = Field(None, description="chat: the template signature all its calls share.")
    centroid: list[float] | None = Field(None, description="chat: mean embedding of its calls' content.")
    match_threshold: float | None = Field(None, description="chat: cosine to the centroid that matches.")
    kind: Kind
    output_schema: dict[str, Any] | None = None
    labels: list[str] = Field(default_factory=list)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    description: str = ""
    instructions: str = ""
    input_label: str = "Input"
    output_label: str = "Output"
    max_tokens: int = 256
    answered: int = Field(0, description="Traces with an answer (a correction, the output or the response).")
    corrected: int = Field(0, description="Traces whose answer is a correction from feedback.")
    example_inputs: list[str] = Field(default_factory=list, description="The most central inputs.")
    examples: list[Example] = Field(default_factory=list, description="Few-shot examples with exact answers.")
    trace_ids: list[str] = Field(default_factory=list)


class DiscoveryReport(BaseModel):
    data: str | None = Field(None, description="Where the traces were read from.")
    encoder: str
    traces: int = Field(description="Traces read.")
    with_input: int = Field(description="Traces with an input text: the ones grouped.")
    planning: int = Field(0, description="Planning requests among them: left to the remote, never proposed.")
    templates: int = Field(0, description="Groups formed by template signature (chat-shaped).")
    clusters: int
    covered: int = Field(description="Traces in the proposed clusters.")
    min_size: int
    threshold: float
    seconds: float
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    proposals: list[TaskProposal] = Field(default_factory=list)


# -- discovery -------------------------------------------------------------------------------------
def discover(
    traces: Sequence[CollectedTrace],
    *,
    encoder: Encoder | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    data: str | None = None,
    on_progress: ProgressFn | None = None,
) -> DiscoveryReport:
    """Group ``traces`` by template, then content, and propose a task for every group of ``min_size``
    or more (planning requests excepted)."""
    started = time.monotonic()
    # Embedded as the device embeds a call when it matches one: the same encoder, the same token cap.
    encoder = encoder or Encoder(ensure_encoder(), max_length=MATCH_MAX_TOKENS)
    usable = [t for t in traces if t.input and t.input.strip()]
    # A chat call is embedded as the device embeds it when matching: its request content.
    inputs = [request_content(t.messages) if t.messages else t.input or "" for t in usable]
    vectors = _embed(encoder, inputs, on_progress)
    answers = [answer_of(t) for t in usable]
    shapes = [answer_shape(a) for a in answers]
    planning = {i for i, t in enumerate(usable) if is_planning(t)}
    candidates = [i for i in range(len(usable)) if i not in planning]
    by_template, rest = group_by_template(usable, candidates, answers, min_size)
    groups: list[TemplateGroup | list[int]] = []
    for group in by_template:
        groups.extend(split_by_answers(group, shapes, vectors, lambda v: _cluster(v, threshold), min_size))
    if rest:
        content = _split_by_shape(_cluster(vectors[rest], threshold), [shapes[i] for i in rest])
        groups.extend([rest[j] for j in part] for part in content)
    groups.sort(key=lambda g: (-len(_members(g)), _members(g)[0]))
    names = TaskNames([_naming_text(t, text) for t, text in zip(usable, inputs, strict=True)], answers)
    proposals = []
    for cluster_id, group in enumerate(groups):
        members = _members(group)
        if len(members) < min_size:
            break  # groups are sorted by size
        found = [usable[i] for i in members]
        proposal = _propose(cluster_id, found, vectors, len(usable), names, members, group)
        proposals.append(proposal)
    return DiscoveryReport(
        data=data,
        encoder=encoder.manifest.name,
        traces=len(traces),
        with_input=len(usable),
        planning=len(planning),
        templates=sum(isinstance(g, TemplateGroup) for g in groups),
        clusters=len(groups),
        covered=sum(p.size for p in proposals),
        min_size=min_size,
        threshold=threshold,
        seconds=round(time.monotonic() - started, 2),
        proposals=proposals,
    )


def _members(group: TemplateGroup | list[int]) -> list[int]:
    return group.members if isinstance(group, TemplateGroup) else group


def _naming_text(trace: CollectedTrace, text: str) -> str:
    # An agent step's system prompt says what the step is; its user messages vary.
    system = [message_text(m) for m in trace.messages or [] if m.get("role") in ("system", "developer")]
    return " ".join([*system, text])


def _embed(encoder: Encoder, inputs: list[str], on_progress: ProgressFn | None) -> np.ndarray:
    # Templated traffic repeats itself: embed each distinct input once.
    unique = list(dict.fromkeys(inputs))
    rows: list[np.ndarray] = []
    step = 256
    for start in range(0, len(unique), step):
        rows.append(encoder.embed(unique[start : start + step]))
        if on_progress:
            on_progress(min(start + step, len(unique)), len(unique))
    if not rows:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    table = np.concatenate(rows)
    index = {text: i for i, text in enumerate(unique)}
    return table[[index[text] for text in inputs]]


def _cluster(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """A cluster label per row; deterministic for the same input."""
    n = len(vectors)
    if n < 2:
        return np.zeros(n, dtype=int)
    from sklearn.cluster import AgglomerativeClustering

    sample = np.arange(n)
    if n > MAX_CLUSTER_POINTS:
        sample = np.sort(np.random.default_rng(0).choice(n, MAX_CLUSTER_POINTS, replace=False))
    model = AgglomerativeClustering(
        n_clusters=None, distance_threshold=threshold, metric="cosine", linkage="average"
    )
    sample_labels = model.fit_predict(vectors[sample])
    if len(sample) == n:
        return np.asarray(sample_labels)
    centroids = np.stack(
        [vectors[sample[sample_labels == k]].mean(axis=0) for k in range(sample_labels.max() + 1)]
    )
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.asarray((vectors @ centroids.T).argmax(axis=1))


def _split_by_shape(labels: np.ndarray, shapes: list[AnswerShape | None]) -> list[list[int]]:
    """Member indices per (cluster, answer shape), largest first; unanswered traces join the
    cluster's most common shape."""
    groups: dict[tuple[int, str], list[int]] = {}
    for cluster in sorted(set(labels.tolist())):
        members: list[int] = np.flatnonzero(labels == cluster).tolist()
        counted = Counter(s for i in members if (s := shapes[i]) is not None)
        majority = counted.most_common(1)[0][0] if counted else "text"
        for i in members:
            groups.setdefault((cluster, shapes[i] or majority), []).append(i)
    return sorted(groups.values(), key=lambda m: (-len(m), m[0]))


def _propose(
    cluster_id: int,
    traces: list[CollectedTrace],
    vectors: np.ndarray,
    total: int,
    names: TaskNames,
    members: list[int],
    group: TemplateGroup | list[int],
) -> TaskProposal:
    """``vectors`` are every usable trace's; ``members`` index this group's among them."""
    mine = vectors[members]
    centroid = mine.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    central = [traces[i] for i in np.argsort(-(mine @ centroid), kind="stable")]
    answers = [(t, a) for t in central if (a := answer_of(t)) is not None]
    given = [a for _, a in answers]
    chat: dict[str, Any] = {}
    if isinstance(group, TemplateGroup):
        kind, schema, labels = chat_contract(traces, given, [answer_shape(a) for a in given])
        center, threshold = placement(vectors, members)
        chat = {
            "form": "chat",
            "signature": group.signature,
            "centroid": center,
            "match_threshold": threshold,
        }
    else:
        kind, schema, labels = infer_contract(given)
    task_counts = Counter(t.task for t in traces if t.task)
    existing = None
    if task_counts and task_counts.most_common(1)[0][1] * 2 > len(traces):
        existing = task_counts.most_common(1)[0][0]
    name, keywords = names.suggest(members, existing)
    tools = infer_tools(traces, given) if kind == "tool_call" else []
    share = len(traces) / total if total else 0.0
    example_inputs = list(dict.fromkeys(t.input or "" for t in central))[:MAX_EXAMPLE_INPUTS]
    return TaskProposal(
        cluster=cluster_id,
        size=len(traces),
        share=round(share, 4),
        name=name,
        existing_task=existing,
        keywords=keywords,
        **chat,
        kind=kind,
        output_schema=schema,
        labels=labels,
        tools=tools,
        description=f"Discovered from {len(traces)} traces ({share:.0%} of traffic), "
        f'e.g. "{_clip(example_inputs[0], 60)}"',
        instructions=instructions(kind, schema, labels, tools),
        input_label="Request" if kind == "tool_call" else "Input",
        output_label="Call" if kind == "tool_call" else "Output",
        max_tokens=_max_tokens([answer_text(a) for a in given]),
        answered=len(answers),
        corrected=sum(1 for t, _ in answers if t.correction),
        example_inputs=example_inputs,
        examples=_few_shot(kind, answers, labels),
        trace_ids=[t.id for t in traces],
    )


def _few_shot(kind: Kind, answers: list[tuple[CollectedTrace, Any]], labels: list[str]) -> list[Example]:
    """Central examples, one per label / tool first so the prompt shows the range of answers."""

    def key(answer: Any) -> str:
        if kind == "tool_call" and is_tool_call(answer):
            return str(answer["name"])
        return answer if kind == "label" and isinstance(answer, str) else ""

    fitting = [
        (t, a)
        for t, a in answers
        if (kind in ("json", "tool_call") and isinstance(a, dict))
        or (kind == "label" and a in labels)
        or (kind == "text" and isinstance(a, str))
    ]
    first_per_key = sorted({key(a): i for i, (_, a) in reversed(list(enumerate(fitting)))}.values())
    rest = [i for i in range(len(fitting)) if i not in set(first_per_key)][:FEW_SHOT]
    order = first_per_key + rest
    return [
        Example(input=t.input or "", output=answer_text(a), tools=t.tools if kind == "tool_call" else None)
        for t, a in (fitting[i] for i in order[:FEW_SHOT])
    ]


def _max_tokens(texts: list[str]) -> int:
    # About 3 characters a token for JSON and short labels; half again as margin.
    longest = max((len(t) for t in texts), default=200)
    return int(min(2048, max(16, math.ceil(longest / 3 * 1.5) + 8)))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- task files ------------------------------------------------------------------------------------
def _task_data(proposal: TaskProposal, name: str) -> dict[str, Any]:
    if proposal.form == "chat":
        # The agent's own request is the prompt: no instructions or labels of an input. No routing
        # either: a chat-shaped task is proxied until its adapter is promoted (its state decides).
        return {
            "name": name,
            "description": proposal.description,
            "form": "chat",
            "kind": proposal.kind,
            "signature": proposal.signature,
            "match_threshold": proposal.match_threshold,
            "output_schema": proposal.output_schema or None,
            "labels": proposal.labels or None,
            "tools": proposal.tools or None,
            "centroid": proposal.centroid,
            "sampling": {"temperature": 0.0, "max_tokens": proposal.max_tokens},
            # For a reviewer: what a call asks and what the remote answered.
            "examples": [e.model_dump(exclude_none=True, exclude={"tools"}) for e in proposal.examples],
        }
    return {
        "name": name,
        "description": proposal.description,
        "kind": proposal.kind,
        "routing": "local",
        "instructions": proposal.instructions,
        "input_label": proposal.input_label,
        "output_label": proposal.output_label,
        "output_schema": proposal.output_schema or None,  # task_toml leaves None out
        "labels": proposal.labels or None,
        "tools": proposal.tools or None,
        "sampling": {"temperature": 0.0, "max_tokens": proposal.max_tokens},
        "examples": [e.model_dump(exclude_none=True) for e in proposal.examples],
    }


def proposal_to_task_toml(proposal: TaskProposal, name: str | None = None) -> str:
    """A task file for ``slm-agent tasks add``; checked to load back as the same task."""
    name = name or proposal.name
    if proposal.form == "chat":
        header = (
            f"# Proposed by `slm-agent train discover` from {proposal.size} calls of one agent step "
            f"({proposal.share:.0%} of traffic, group {proposal.cluster}). Its input is the agent's own "
            "request, its label the remote's answer;\n# the examples are for review. Review before serving it.\n"
        )
    else:
        header = (
            f"# Proposed by `slm-agent train discover` from {proposal.size} traces "
            f"({proposal.share:.0%} of traffic, cluster {proposal.cluster}). Review before serving it.\n"
        )
    text = header + task_toml(_task_data(proposal, name))
    parse_task(tomllib.loads(text), f"{name}.toml")  # raises BadRequestError on an invalid name
    return text


def accept(
    proposal: TaskProposal,
    tasks_dir: Path,
    name: str | None = None,
    replace: bool = False,
    *,
    data: str | None = None,
) -> Path:
    """Write the proposal as ``<tasks_dir>/<name>.toml`` and, with ``data`` (the collector's
    traces), tag the traces it covers for the task so ``train dataset`` finds them at once."""
    name = name or proposal.name
    if not TASK_NAME_RE.match(name):
        raise BadRequestError(
            f"invalid task name {name!r}: lowercase letters, digits, '_' and '-' (at most 64)", param="name"
        )
    target = Path(tasks_dir) / f"{name}.toml"
    if target.exists() and not replace:
        raise ConflictError(f"task file {target} already exists; pick another --name or pass --replace")
    write_atomic(target, proposal_to_task_toml(proposal, name).encode())
    if data is not None:
        write_tags(data, name, proposal.trace_ids, signature=proposal.signature)
    return target
