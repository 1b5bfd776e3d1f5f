"""Task matching on the generated agent: overhead per request and precision/recall.

Tasks are built as accepting a discovered task builds them: one per subtask of the generated
agent (tests/agent_sim.py), with the signature of its template and the centroid and calibrated
threshold of half of its calls (calibrated against the other steps and planning). The other half,
new planning requests and unrelated chat are then matched:

- ``agent``: tasks with signature and centroid, the device's real setup;
- ``content only``: the same tasks without signatures, so every call is matched by embedding
  (the path an agent whose template drifts takes), the threshold's own precision and recall.

Overhead is ``TaskMatcher.match`` wall time per request: the signature path, the embedding path
with every content new (cold) and seen before (cached), and the agent's real mix; and the
encoder's CPU time per embedding on one thread, which waiting for a busy core does not inflate.
Prints one table: figure, value, target.

    python bench/bench_matching.py [--encoder DIR] [--calls 100] [--planning 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_sim import PLANNING, SUBTASKS, AgentCall, generate_calls
from match_tasks import KINDS, UNRELATED_CHAT, contents, task_fields, write_task

from slm_agent.contracts.centroids import MATCH_MAX_TOKENS
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.models.encoder import Encoder
from slm_agent.quantize.encoder import ensure_encoder
from slm_agent.runtime.matching import TaskMatcher, load_encoder

TARGET_P95_MS = 5.0


def _unrelated() -> list[AgentCall]:
    return [
        AgentCall("unrelated", {"messages": [{"role": "user", "content": t}]}, {"content": None})
        for t in UNRELATED_CHAT
    ]


def _tasks(root: Path, encoder: Encoder, fit: Sequence[AgentCall], *, with_signature: bool) -> TaskRegistry:
    for subtask in SUBTASKS:
        members = [c.body for c in fit if c.subtask == subtask]
        others = [c.body for c in fit if c.subtask != subtask]
        fields = task_fields(encoder, members, others, kind=KINDS[subtask], with_signature=with_signature)
        write_task(root, subtask, fields)
    return TaskRegistry(root)


def _match(matcher: TaskMatcher, call: AgentCall) -> tuple[str | None, float]:
    body = call.body
    start = time.perf_counter()
    match = matcher.match(body["messages"], body.get("tools"), body.get("response_format"))
    return match.task, (time.perf_counter() - start) * 1000


def _precision_recall(
    calls: Sequence[AgentCall], predicted: Sequence[str | None]
) -> tuple[float, float, int]:
    tp = fp = fn = 0
    for call, task in zip(calls, predicted, strict=True):
        truth = call.subtask if call.subtask in SUBTASKS else None
        tp += task is not None and task == truth
        fp += task is not None and task != truth
        fn += truth is not None and task != truth
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), fp


def _cpu_per_embedding(folder: Path, calls: Sequence[AgentCall]) -> float:
    """CPU time of one embedding on one thread: what a request costs free of the other processes
    a shared machine runs (wall times above include waiting for a core)."""
    encoder, problem = load_encoder(folder, threads=1)
    if encoder is None:
        raise SystemExit(problem)
    texts = contents([c.body for c in calls])
    encoder.embed(texts[:4])
    start = time.process_time()
    for text in texts:
        encoder.embed([text])
    return (time.process_time() - start) * 1000 / len(texts)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", type=Path, help="encoder folder (default: built in the data dir)")
    parser.add_argument("--calls", type=int, default=100, help="calls per subtask")
    parser.add_argument("--planning", type=int, default=60, help="planning calls")
    parser.add_argument("--threads", type=int, default=1, help="encoder threads (the daemon uses 1)")
    args = parser.parse_args(argv)

    args.encoder = args.encoder or ensure_encoder()
    encoder, problem = load_encoder(args.encoder, threads=args.threads)
    if encoder is None:
        raise SystemExit(problem)
    calls = generate_calls(args.calls, args.planning, seed=0)
    half = len(calls) // 2
    fit, held_out = calls[:half], [*calls[half:], *_unrelated()]
    rows: list[tuple[str, str, str]] = []
    for label, with_signature in (("agent", True), ("content only", False)):
        with tempfile.TemporaryDirectory() as root:
            matcher = TaskMatcher(_tasks(Path(root), encoder, fit, with_signature=with_signature), encoder)
            cold = [_match(matcher, c) for c in held_out]
            cached = [_match(matcher, c) for c in held_out]
        precision, recall, false_matches = _precision_recall(held_out, [t for t, _ in cold])
        rows += [
            (f"{label}: match p50 ms, cold", f"{_pct([ms for _, ms in cold], 50):.2f}", ""),
            (
                f"{label}: match p95 ms, cold",
                f"{_pct([ms for _, ms in cold], 95):.2f}",
                f"<= {TARGET_P95_MS}",
            ),
            (
                f"{label}: match p95 ms, cached",
                f"{_pct([ms for _, ms in cached], 95):.2f}",
                f"<= {TARGET_P95_MS}",
            ),
            (f"{label}: precision", f"{precision:.3f}", "1.000"),
            (f"{label}: recall", f"{recall:.3f}", ">= 0.95" if with_signature else ">= 0.90"),
            (f"{label}: false matches (planning + unrelated)", str(false_matches), "0"),
        ]
        if with_signature:
            sig = [ms for c, (_, ms) in zip(held_out, cold, strict=True) if c.subtask in SUBTASKS]
            emb = [ms for c, (_, ms) in zip(held_out, cold, strict=True) if c.subtask not in SUBTASKS]
            rows += [
                ("signature path p95 ms", f"{_pct(sig, 95):.3f}", ""),
                ("embedding path p50 ms, cold (planning, unrelated)", f"{_pct(emb, 50):.2f}", ""),
                ("embedding path p95 ms, cold", f"{_pct(emb, 95):.2f}", f"<= {TARGET_P95_MS}"),
            ]
    rows.append(
        (
            "encoder CPU ms per cold embedding, 1 thread",
            f"{_cpu_per_embedding(args.encoder, held_out):.2f}",
            "",
        )
    )
    n_eval = sum(c.subtask != "unrelated" for c in held_out)
    print(
        f"{len(fit)} calls fitted, {n_eval} held out + {len(UNRELATED_CHAT)} unrelated; "
        f"{MATCH_MAX_TOKENS} tokens embedded at most, {args.threads} encoder thread(s); load average {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores; planning is {PLANNING!r}"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>8}  target")
    for figure, value, target in rows:
        print(f"{figure:<{width}}  {value:>8}  {target}")


if __name__ == "__main__":
    main()
