"""Shadow mode's two figures (issue 12): what shadow work costs live requests, and how much of a
task the per-request gate lets the local model answer at the target agreement.

1. Live latency with shadow work pending vs none. An agent calls ``task:extract`` on the real
   engine with a think time between calls (it is doing other things, such as remote calls); in one
   condition the shadow worker always has 8 jobs pending (``classify`` prompts: another prefix,
   so the KV cache is disturbed as a real shadow job would), in the other none. Conditions
   alternate in blocks so both see the same machine load. Median and p95 of the live requests'
   latency, and their ratio (target <= 1.05x).
2. The gate's coverage at the target agreement on held-out pairs. Real pairs: the bundled base
   model answers ``classify`` on generated support messages whose label is known (the "remote"
   answer), with its token log-probabilities; plus synthetic pairs whose features predict
   agreement. The gate is fitted on one half, measured on the other; the risk-coverage curves are
   plotted to bench/results/risk_coverage.png.

    python bench/bench_shadow.py
    BENCH_THREADS=1 python bench/bench_shadow.py   # on a machine shared with other work
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_daemon import print_table

from slm_agent.contracts.prompts import task_prompt
from slm_agent.contracts.records import TraceRecord
from slm_agent.contracts.tasks import Task, builtin_tasks
from slm_agent.models import BUNDLED_NAME, ModelStore, ensure_bundled
from slm_agent.models.manifest import PromptFormat
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationRequest, grammars
from slm_agent.runtime.serving.context import Job, Target
from slm_agent.runtime.shadow import Promoter, ShadowJob, ShadowWorker, TaskStates, fit_gate, gate_features
from slm_agent.runtime.shadow.gate import Gate, risk_coverage
from slm_agent.runtime.shadow.stats import Z_ONE_SIDED_95, wilson_bounds
from slm_agent.runtime.store.traces import TraceStore

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
TARGET_RATIO = 1.05
TARGET_AGREEMENT = 0.95
N_LIVE = 40  # per condition
THINK_S = 1.5  # the agent does other work (a remote call) between local calls
PENDING = 8
N_REAL_PAIRS = 480
RESULTS = Path(__file__).resolve().parent / "results"
ROWS: list[tuple[str, str, str, str, str]] = []

FIRST = ("Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas")
LAST = ("Martin", "Okafor", "Ruiz", "Novak", "Tanaka", "Berg", "Silva", "Khan")
CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Quito", "Osaka", "Perth", "Turin")
COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli")
MESSAGES = {
    "billing": (
        "I was charged {n} times for my {plan} plan this month.",
        "My invoice for {month} shows the wrong amount.",
        "Can I get a refund for the {plan} subscription?",
        "Why did my card get billed {n} dollars extra?",
    ),
    "bug": (
        "The app crashes when I {action}.",
        "I get an error message every time I {action}.",
        "Nothing happens when I try to {action}, the button is broken.",
        "The page freezes after I {action}.",
    ),
    "feature_request": (
        "It would be great if you could let me {action} offline.",
        "Please add a way to {action} from the mobile app.",
        "Could you support exporting when I {action}?",
    ),
    "account": (
        "I can't log in after I changed my password in {month}.",
        "How do I change the email address on my account?",
        "My account got locked, please unlock it.",
    ),
    "other": (
        "Do you have an office in {city}?",
        "What are your opening hours in {month}?",
        "Who should I talk to about a partnership with {company}?",
    ),
}
ACTIONS = ("open a file", "save a draft", "upload a photo", "export a report", "share a link")
PLANS = ("basic", "pro", "team", "family")
MONTHS = ("January", "March", "May", "July", "October")


def row(name: str, value: str, anchor: str, ratio: str, target: str) -> None:
    ROWS.append((name, value, anchor, ratio, target))
    print(f"  {name}: {value} (anchor {anchor})", file=sys.stderr)


def task(name: str) -> Task:
    return next(t for t in builtin_tasks() if t.name == name)


def request(t: Task, value: str, fmt: PromptFormat) -> GenerationRequest:
    prefix, body, stop = task_prompt(t, value, None, fmt)
    return GenerationRequest(
        prefix=prefix,
        body=body,
        max_tokens=t.sampling.max_tokens,
        temperature=0.0,
        stop=stop,
        grammar=grammars.task_grammar(t, None),
        logprobs=True,
    )


def contact(rng: random.Random) -> str:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    return f"{name} from {rng.choice(COMPANIES)} in {rng.choice(CITIES)} wrote in; mail {name.split()[0].lower()}@x.example."


def ticket(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(list(MESSAGES))
    text = rng.choice(MESSAGES[label]).format(
        n=rng.randint(2, 4),
        plan=rng.choice(PLANS),
        month=rng.choice(MONTHS),
        action=rng.choice(ACTIONS),
        city=rng.choice(CITIES),
        company=rng.choice(COMPANIES),
    )
    return text, label


def shadow_job(t: Task, text: str, label: str, fmt: PromptFormat) -> ShadowJob:
    target = Target(f"task:{t.name}", t, None, 1.0, fmt)
    job = Job("tasks", target, request(t, text, fmt), TraceRecord(endpoint="tasks"), t.kind)
    remote = {"role": "assistant", "content": label}
    return ShadowJob(job=job, task=t, remote=remote, input_chars=len(text))


# -- 1. live latency with shadow work pending ----------------------------------------------------


def bench_latency(engine: Engine, db: Path, fmt: PromptFormat) -> None:
    extract, classify = task("extract"), task("classify")
    rng = random.Random(7)
    worker = ShadowWorker(engine, Promoter(TaskStates(db)), capacity=PENDING)
    worker.start()
    latency: dict[bool, list[float]] = {False: [], True: []}
    engine.generate(request(extract, contact(rng), fmt))  # warm: the extract prefix is resident
    for i in range(2 * N_LIVE):
        shadowing = i % 2 == 1  # alternate, so both conditions see the same machine load
        if shadowing:
            while worker.pending < PENDING:
                worker.submit(shadow_job(classify, *ticket(rng), fmt))
        else:
            worker.clear()
            while worker.running or not engine.idle:
                time.sleep(0.01)
        time.sleep(THINK_S)
        started = time.perf_counter()
        engine.generate(request(extract, contact(rng), fmt))
        latency[shadowing].append((time.perf_counter() - started) * 1000)
    worker.stop()
    counters = worker.counters
    print(f"  shadow jobs: {counters}", file=sys.stderr)
    for stat, fn in (("p50", statistics.median), ("p95", lambda v: float(np.percentile(v, 95)))):
        base, busy = fn(latency[False]), fn(latency[True])
        row(
            f"live task:extract latency {stat}, {PENDING} shadow jobs pending (ms)",
            f"{busy:.0f}",
            f"{base:.0f} (none pending)",
            f"{busy / base:.3f}",
            f"<= {TARGET_RATIO}",
        )
    row(
        "shadow jobs completed / preempted while measuring",
        f"{counters.completed} / {counters.preempted}",
        "-",
        "-",
        "-",
    )


# -- 2. the gate on held-out pairs ---------------------------------------------------------------


def real_pairs(engine: Engine, fmt: PromptFormat) -> tuple[np.ndarray, np.ndarray]:
    """The base model's classify answers vs the known labels, with the gate's features."""
    classify = task("classify")
    rng = random.Random(11)
    features, agreed = [], []
    for _ in range(N_REAL_PAIRS):
        text, label = ticket(rng)
        result = engine.generate(request(classify, text, fmt))
        features.append(gate_features(result.token_logprobs, None, len(text), 0, result.completion_tokens))
        agreed.append(result.text.strip() == label)
    return np.asarray(features), np.asarray(agreed)


def synthetic_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features whose log-probabilities predict agreement, as a fine-tuned adapter's tend to."""
    rng = np.random.default_rng(seed)
    confidence = rng.normal(size=n)
    x = np.column_stack(
        [
            confidence * 0.5 - 0.6 + rng.normal(0, 0.3, n),
            confidence - 2 + rng.normal(0, 0.6, n),
            rng.uniform(0.7, 1.0, n),
            rng.normal(5, 1, n),
            np.full(n, 4.0),
            rng.normal(2.5, 0.4, n),
        ]
    )
    return x, rng.random(n) < 1 / (1 + np.exp(-(3 * confidence + 2.5)))


def held_out(name: str, x: np.ndarray, y: np.ndarray) -> tuple[list[tuple[float, float]], float]:
    half = len(y) // 2
    gate = fit_gate(x[:half], y[:half], TARGET_AGREEMENT)
    test_x, test_y = x[half:], y[half:]
    overall = float(test_y.mean())
    if gate is None:
        row(
            f"gate coverage at {TARGET_AGREEMENT} agreement, {name} (held out)",
            "0 % (no gate)",
            f"agreement {overall:.2f} without a gate",
            "-",
            "> 0",
        )
    else:
        allowed = np.array([gate.allows(r) for r in test_x])
        covered = int(allowed.sum())
        good = int(test_y[allowed].sum())
        lower = wilson_bounds(good, covered, Z_ONE_SIDED_95)[0] if covered else 0.0
        row(
            f"gate coverage at {TARGET_AGREEMENT} agreement, {name} (held out, n={len(test_y)})",
            f"{covered / len(test_y):.0%} at agreement {good / max(covered, 1):.3f} (LB {lower:.3f})",
            f"agreement {overall:.2f} without a gate",
            "-",
            f"covered agreement >= {TARGET_AGREEMENT}",
        )
    ranking: Gate | None = fit_gate(x[:half], y[:half], 0.0)  # target 0: the model, never None
    return risk_coverage(test_x, test_y, ranking), overall


def plot(curves: dict[str, list[tuple[float, float]]]) -> Path:
    # matplotlib is a training-box extra and slow to import: only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c for c, _ in curve], [a for _, a in curve], label=name)
    ax.axhline(TARGET_AGREEMENT, color="grey", linestyle="--", label=f"target {TARGET_AGREEMENT}")
    ax.set_xlabel("coverage (share of requests answered locally)")
    ax.set_ylabel("agreement with the remote among covered")
    ax.set_title("Per-request gate: risk-coverage on held-out pairs")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    path = RESULTS / "risk_coverage.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        manifest = ensure_bundled(store)
        fmt = manifest.prompt_format or PromptFormat()
        engine = Engine(EngineConfig(model_path=store.path_of(manifest), n_ctx=2048, n_threads=THREADS))
        engine.load()
        traces = TraceStore(Path(tmp) / "traces.db")
        try:
            bench_latency(engine, traces.path, fmt)
            curves: dict[str, Any] = {}
            x, y = real_pairs(engine, fmt)
            curves[f"real: {BUNDLED_NAME} on classify"] = held_out("real classify pairs", x, y)[0]
            x, y = synthetic_pairs(1200, seed=5)
            curves["synthetic"] = held_out("synthetic pairs", x, y)[0]
            print(f"  plot: {plot(curves)}", file=sys.stderr)
        finally:
            engine.shutdown()
            traces.close()
    print_table(ROWS)


if __name__ == "__main__":
    main()
