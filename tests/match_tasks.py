"""Matchable tasks built from labelled agent calls, as accepting a discovered task makes them.

Used by tests/test_matching.py and bench/bench_matching.py: each task gets the signature of its
calls' template and/or the centroid and calibrated threshold of their contents, embedded the way
the device embeds a request (contracts/centroids.py, runtime/matching).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slm_agent.contracts.centroids import calibrate_threshold, centroid, cosines
from slm_agent.contracts.signature import request_content, template_signature
from slm_agent.models.encoder import Encoder

Body = Mapping[str, Any]
# The generated agent's steps by output contract: matching keeps tool-calling tasks to tool requests.
KINDS = {"pick_tool": "tool_call", "extract_contact": "text", "classify_ticket": "text"}
# Requests no task of the generated agent covers: they must never match a step by content.
UNRELATED_CHAT = (
    "What's the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain how a transformer neural network works.",
    "Can you recommend a good book about the history of Rome?",
    "Translate 'good morning' into Italian.",
    "What is 17 times 23?",
    "Tell me a joke about programmers.",
    "Summarize the plot of Hamlet in two sentences.",
    "How do I center a div in CSS?",
    "Draft a polite email declining a meeting invitation.",
)


def signature_of(body: Body) -> str:
    return template_signature(body["messages"], body.get("tools"), body.get("response_format"))


def contents(bodies: Sequence[Body]) -> list[str]:
    return [request_content(b["messages"]) for b in bodies]


def task_fields(
    encoder: Encoder | None,
    members: Sequence[Body],
    others: Sequence[Body] = (),
    *,
    kind: str = "text",
    with_signature: bool = True,
    with_centroid: bool = True,
) -> dict[str, Any]:
    """A task's matching fields from its member calls; ``others`` keep the threshold above them."""
    fields: dict[str, Any] = {"kind": kind, "form": "chat"}
    if with_signature:
        signatures = {signature_of(b) for b in members}
        assert len(signatures) == 1, f"members span {len(signatures)} templates"
        fields["signature"] = signatures.pop()
    if with_centroid:
        assert encoder is not None
        if kind == "tool_call":  # only requests offering tools can be mistaken for a tool-calling task
            others = [b for b in others if b.get("tools")]
        vectors = encoder.embed(contents(members))
        center = centroid(vectors)
        other = cosines(encoder.embed(contents(others)), center) if others else None
        fields["centroid"] = center
        fields["match_threshold"] = calibrate_threshold(cosines(vectors, center), other)
    return fields


def write_task(tasks_dir: Path, name: str, fields: Mapping[str, Any]) -> Path:
    """A task file; JSON scalars and arrays are valid TOML values."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"name = {json.dumps(name)}"]
    lines += [f"{key} = {json.dumps(_plain(value))}" for key, value in fields.items()]
    path = tasks_dir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plain(value: Any) -> Any:
    return [float(x) for x in value] if isinstance(value, np.ndarray) else value
