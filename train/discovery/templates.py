"""Grouping agent calls by their template: the first cut of discovery.

Every call of one agent step sends the same system prompt, tools and response format, so the
template signature (``contracts.signature``) groups them whatever each call asks. The signature
also holds the user message's lead ("Ticket:"), which can vary between calls of one step; so
signature groups of one "family" (same fixed parts but the lead) are merged when their answers
keep the same contract (the same labels, JSON keys or tools), and the family's small leftovers
are pooled. A merged group keeps its most common signature (every call with it is in the group);
the rest of its calls are matched by centroid.

Content comes second: a step whose answers clearly split (tool calls here, text there) is cut
along the split with the help of its content clusters, and calls without a usable template are
clustered by content alone (``discover``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from slm_agent.contracts.centroids import calibrate_threshold, centroid, cosines
from slm_agent.contracts.planning import asks_for_planning
from slm_agent.contracts.signature import template_signature
from slm_agent.train.data.collected import CollectedTrace
from slm_agent.train.data.contract import AnswerShape, Kind, infer_contract, is_tool_call

# A second answer shape splits a step when it has at least this share of the answered calls
# (and ``min_size`` of them): a few odd answers are noise the labeller drops, not another task.
SPLIT_SHARE = 0.2
CENTROID_DECIMALS = 6
MAX_LABEL_CHARS = 40  # longer answers are text, not a label (as in contract.infer_contract)

Cluster = Callable[[np.ndarray], np.ndarray]


class TemplateGroup(BaseModel):
    """Calls of one agent step: indices into the traces discovery read."""

    members: list[int]
    signature: str | None = None


def is_planning(trace: CollectedTrace) -> bool:
    """A planning request (by its system prompt): left to the remote, never proposed as a task."""
    messages = trace.messages
    return bool(messages) and asks_for_planning(messages or [])


def family(trace: CollectedTrace) -> str | None:
    """The signature of the request's fixed parts without its user message (so without its lead);
    None when nothing but the lead is fixed."""
    system = [m for m in trace.messages or [] if m.get("role") in ("system", "developer")]
    if not (system or trace.tools or trace.response_format):
        return None
    return template_signature(system, trace.tools, trace.response_format)


def answer_keys(answers: Sequence[Any]) -> set[str]:
    """What a set of answers commits to: tool calls, the JSON keys or the labels they use. Free
    text commits to nothing, so steps answered in free text are never merged."""
    keys: set[str] = set()
    for answer in answers:
        if is_tool_call(answer):
            keys.add("tool_call")  # a family offers the same tools: any calls of them agree
        elif isinstance(answer, dict):
            keys.add("keys:" + ",".join(sorted(map(str, answer))))
        elif isinstance(answer, str) and len(answer) <= MAX_LABEL_CHARS and "\n" not in answer:
            keys.add(f"label:{answer}")
    return keys


def _agree(a: set[str], b: set[str]) -> bool:
    return bool(a and b) and len(a & b) >= 0.5 * min(len(a), len(b))


def group_by_template(
    traces: Sequence[CollectedTrace], candidates: Sequence[int], answers: Sequence[Any], min_size: int
) -> tuple[list[TemplateGroup], list[int]]:
    """Groups of ``min_size`` or more calls of one template (see the module docstring), and the
    calls left for content clustering."""
    by_signature: dict[str, list[int]] = {}
    rest: list[int] = []
    for i in candidates:
        signature = traces[i].template_signature() if traces[i].has_template() else None
        if signature is None:
            rest.append(i)
        else:
            by_signature.setdefault(signature, []).append(i)
    families: dict[str | None, list[list[int]]] = {}
    for members in sorted(by_signature.values(), key=lambda m: (-len(m), m[0])):
        families.setdefault(family(traces[members[0]]), []).append(members)
    groups: list[TemplateGroup] = []
    for key, units in families.items():
        if key is None:  # only the lead is fixed: nothing else says two leads are one step
            groups += [_group(traces, m) for m in units if len(m) >= min_size]
            rest += [i for m in units if len(m) < min_size for i in m]
            continue
        # Units big enough to show their contract merge when they agree; a small unit (a lead seen
        # a few times) joins a big one it agrees with, else the family's pool.
        merged: list[tuple[list[int], set[str]]] = []
        pool: list[int] = []
        for members in units:
            keys = answer_keys([answers[i] for i in members])
            into = next((g for g in merged if _agree(g[1], keys)), None)
            if into is not None:
                into[0].extend(members)
                into[1].update(keys if len(members) >= min_size else ())
            elif len(members) >= min_size:
                merged.append((list(members), keys))
            else:
                pool.extend(members)
        groups += [_group(traces, sorted(m)) for m, _ in merged]
        if len(pool) >= min_size:
            groups.append(_group(traces, sorted(pool)))
        else:
            rest += pool
    return groups, sorted(rest)


def _group(traces: Sequence[CollectedTrace], members: list[int]) -> TemplateGroup:
    counted = Counter(traces[i].template_signature() for i in members)
    return TemplateGroup(members=members, signature=counted.most_common(1)[0][0])


def split_by_answers(
    group: TemplateGroup,
    shapes: Sequence[AnswerShape | None],
    vectors: np.ndarray,
    cluster: Cluster,
    min_size: int,
) -> list[TemplateGroup]:
    """The group itself, or one part per answer shape when its answers clearly split.

    A split group's calls share a signature, so the signature no longer tells its parts apart:
    the parts keep none and are matched by their centroids. An unanswered call joins the shape
    most common in its content cluster.
    """
    members = group.members
    counted = Counter(s for i in members if (s := shapes[i]) is not None)
    answered = sum(counted.values())
    big = [s for s, n in counted.items() if n >= min_size and n >= SPLIT_SHARE * answered]
    if len(big) < 2:
        return [group]
    labels = cluster(vectors[members])
    majority: dict[int, AnswerShape] = {}
    for label in set(labels.tolist()):
        inside = Counter(s for j in np.flatnonzero(labels == label) if (s := shapes[members[j]]) is not None)
        majority[label] = inside.most_common(1)[0][0] if inside else big[0]
    parts: dict[AnswerShape, list[int]] = {}
    for j, i in enumerate(members):
        parts.setdefault(shapes[i] or majority[int(labels[j])], []).append(i)
    return [TemplateGroup(members=m) for m in parts.values()]


def chat_contract(
    traces: Sequence[CollectedTrace], answers: Sequence[Any], shapes: Sequence[AnswerShape | None]
) -> tuple[Kind, dict[str, Any] | None, list[str]]:
    """(kind, output_schema, labels) of an agent step, from what the remote answered.

    Tool calls make a tool_call task; a json_schema response format a json task with that schema
    (the agent's own contract beats one inferred from answers); else labels, JSON or text.
    """
    counted = Counter(s for s in shapes if s is not None)
    if counted and counted.most_common(1)[0][0] == "tool_call":
        return "tool_call", None, []
    schema = response_schema(traces)
    if schema is not None:
        return "json", schema, []
    return infer_contract([a for a in answers if a is not None])


def response_schema(traces: Sequence[CollectedTrace]) -> dict[str, Any] | None:
    """The JSON schema most of the calls ask for in ``response_format``, if any."""
    found: Counter[str] = Counter()
    schemas: dict[str, dict[str, Any]] = {}
    for trace in traces:
        fmt = trace.response_format or {}
        spec = fmt.get("json_schema") if fmt.get("type") == "json_schema" else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            key = repr(sorted(schema.items()))
            found[key] += 1
            schemas.setdefault(key, schema)
    if not found:
        return None
    key, n = found.most_common(1)[0]
    return schemas[key] if n * 2 > len(traces) else None


def placement(vectors: np.ndarray, members: Sequence[int]) -> tuple[list[float], float]:
    """(centroid, match threshold) of a group: the threshold is calibrated against every other
    call read (planning and other steps included), so unrelated calls stay unmatched."""
    inside = np.zeros(len(vectors), dtype=bool)
    inside[list(members)] = True
    center = centroid(vectors[inside])
    others = vectors[~inside]
    threshold = calibrate_threshold(
        cosines(vectors[inside], center), cosines(others, center) if len(others) else None
    )
    return [round(x, CENTROID_DECIMALS) for x in center], threshold
