"""Deterministic demo traffic for a trace store: tests, the benchmark and the README screenshot."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from slm_agent.contracts.clock import iso
from slm_agent.contracts.records import Feedback, TraceRecord
from slm_agent.runtime.store.traces import TraceStore

TASKS = (
    ("extract_fields", "extract-fields-v3"),
    ("pick_tool", "pick-tool-v2"),
    ("classify_intent", None),
)
BASE = "gemma-3-270m-q4_k_m"
# The router's own reasons (runtime/router.py), so the demo looks like a real daemon.
REMOTE_REASONS = ("confidence", "validation", "planning", "policy")


def demo_trace(rng: random.Random, i: int, at: datetime) -> TraceRecord:
    task, adapter = TASKS[i % len(TASKS)]
    remote = rng.random() < 0.18
    error = rng.random() < 0.03
    prompt, completion = rng.randint(40, 400), rng.randint(5, 120)
    latency = rng.lognormvariate(6.3 if remote else 5.0, 0.45)
    return TraceRecord(
        id=f"tr_{i:08d}",
        created_at=iso(at.timestamp()),
        endpoint="/v1/tasks/run" if i % 4 else "/v1/chat/completions",
        session_id=f"s{i % 7}",
        agent="demo-agent",
        task=task,
        model=(f"task:{task}" if not remote else "gpt-4o-mini"),
        base_model=BASE,
        adapter=None if remote else adapter,
        route="remote" if remote else "local",
        route_reason=rng.choice(REMOTE_REASONS) if remote else ("policy" if i % 11 else "offline"),
        request={"messages": [{"role": "user", "content": f"request {i} for {task}: invoice #{1000 + i}"}]},
        response=f'{{"answer": "result {i}"}}' if not error else None,
        prompt_tokens=prompt,
        completion_tokens=0 if error else completion,
        latency_ms=round(latency, 1),
        queue_ms=round(rng.random() * 5, 2),
        ttft_ms=round(latency * 0.3, 1),
        tokens_per_s=round(completion / max(latency / 1000, 0.001), 1),
        status=500 if error else 200,
        error="engine failed: demo fault" if error else None,
        attempts=[{"route": "local", "error": "low confidence 0.41"}, {"route": "remote", "status": 200}]
        if remote
        else None,
        redactions={"email": 1} if i % 11 == 0 else None,
        remote_model="gpt-4o-mini" if remote else None,
        remote_latency_ms=round(latency * 0.9, 1) if remote else None,
        cost_usd=round((prompt + completion) * 0.6 / 1e6, 6) if remote else None,
    )


def seed(store: TraceStore, n: int, *, end: datetime, span: timedelta, rng_seed: int = 7) -> None:
    """``n`` traces spread evenly over ``span`` up to ``end``, plus feedback and two agent runs."""
    rng = random.Random(rng_seed)
    step = span / max(n, 1)
    start = end - span
    if n > 2000:  # bulk: multi-row inserts (the store commits each insert, too slow for 100k rows)
        rows = (
            demo_trace(rng, i, start + step * (i + 1) - timedelta(milliseconds=1)).model_dump(exclude={"seq"})
            for i in range(n)
        )
        store.db["traces"].insert_all(rows, batch_size=500)
    else:
        for i in range(n):
            store.insert(demo_trace(rng, i, start + step * (i + 1) - timedelta(milliseconds=1)))
    if n:
        store.add_feedback(f"tr_{n - 1:08d}", Feedback(rating="good", source="demo"))
        store.add_feedback(
            f"tr_{n - 2:08d}", Feedback(rating="bad", correction='{"answer": 42}', source="demo")
        )
        store.db.execute("UPDATE feedback SET created_at = ?", [iso(end.timestamp())])  # stable screenshots
    _seed_runs(store, end)


def _seed_runs(store: TraceStore, end: datetime) -> None:
    rows = []
    for r, (name, status) in enumerate((("triage-inbox", "ok"), ("book-travel", "running"))):
        run_id = f"run_{r}"
        t0 = end - timedelta(seconds=120 - r * 60)
        rows.append(dict(id=run_id, run_id=run_id, parent_id=None, step=None, kind="run", name=name,
                         route=None, status=status, started_at=iso(t0.timestamp()),
                         ended_at=iso(t0.timestamp() + 9) if status == "ok" else None,
                         duration_ms=9000.0 if status == "ok" else None))  # fmt: skip
        for s, (kind, sname, route) in enumerate(
            (("llm", "plan", "remote"), ("tool", "search_mail", None), ("llm", "extract_fields", "local"))
        ):
            sid = f"{run_id}_s{s}"
            rows.append(dict(id=sid, run_id=run_id, parent_id=run_id, step=s + 1, kind=kind, name=sname,
                             route=route, status="running" if status == "running" and s == 2 else "ok",
                             trace_id=f"tr_{s:08d}" if kind == "llm" else None,
                             started_at=iso(t0.timestamp() + 3 * s),
                             duration_ms=None if status == "running" and s == 2 else 2500.0 + 100 * s))  # fmt: skip
            if kind == "tool":
                rows.append(dict(id=f"{sid}_c", run_id=run_id, parent_id=sid, step=None, kind="http",
                                 name="GET /mail?q=invoice", route=None, status="ok",
                                 started_at=iso(t0.timestamp() + 3 * s + 1), duration_ms=180.0))  # fmt: skip
    store.db["spans"].insert_all(rows)
