"""Per-request overhead of routing and redaction, the work added to every request on the device.

Over 2,000 realistic requests (task calls, agent turns with tools and long system prompts, some
carrying PII) it times: planning detection, ``RuleRouter.decide``, redaction of every message (as
an escalation does), validation of a local JSON answer against its schema, confidence over the
answer's logprobs and ``review``. Prints one table row: p50, p95, the target, and p95/target.

    python bench/bench_router.py
"""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

from slm_agent.contracts.schemas import validate_local_answer
from slm_agent.privacy.redactor import Redactor
from slm_agent.runtime.routing.router import RequestFeatures, RuleRouter, confidence, is_planning_request

N_REQUESTS = 2_000
TARGET_P95_MS = 2.0

SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    },
    "required": ["vendor", "total", "currency"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": f"tool_{i}", "parameters": {"type": "object", "properties": {}}},
    }
    for i in range(8)
]
AGENT_SYSTEM = (
    "You are an operations agent for a logistics company. You can look up shipments, customers, invoices "
    "and carriers, open tickets, and send e-mails. Make a plan, then act step by step, calling one tool at a "
    "time and checking each result before going on. Never invent tracking numbers. "
) * 6
SENTENCES = [
    "The shipment left the Rotterdam hub on 2024-03-02 and is expected on Friday.",
    "Customer reports the parcel arrived damaged; photos attached in the ticket.",
    "Invoice 88213 totals $1,240.50 including VAT at 21 percent.",
    "Please contact jane.roe@corp.example or call +1 415-555-0100 before 17:00.",
    "Refund to IBAN GB82 WEST 1234 5698 7654 32 once the return is scanned.",
    "The API at 10.0.3.17 returned 503 twice, retried with backoff, then succeeded.",
    "Pay with card 4111 1111 1111 1111; the order number is 5532-7781.",
    "Version 2.4.1 of the label printer firmware fixes the barcode offset.",
]


def make_request(rng: random.Random) -> tuple[dict[str, Any], RequestFeatures]:
    kind = rng.choices(["task", "agent", "proxy"], weights=[6, 3, 1])[0]
    user = " ".join(rng.choices(SENTENCES, k=rng.randint(2, 14)))
    if kind == "agent":
        messages = [
            {"role": "system", "content": AGENT_SYSTEM},
            {"role": "user", "content": user},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "tool_1", "arguments": '{"q": "x"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": " ".join(rng.choices(SENTENCES, k=6))},
        ]
        request = {"model": "gpt-4o", "messages": messages, "tools": TOOLS}
    else:
        messages = [
            {"role": "system", "content": "Extract the invoice fields as JSON."},
            {"role": "user", "content": user},
        ]
        request = {"model": "extract-invoice" if kind == "task" else "gpt-4o-mini", "messages": messages}
    task = "extract-invoice" if kind == "task" else None
    features = RequestFeatures(
        model=request["model"],
        served_locally=kind == "task",
        task=task,
        task_routing="auto" if task else None,
        route_header=None,
        is_planner=False,
        has_tools=bool(request.get("tools")),
        n_tools=len(request.get("tools") or []),
        matching_local_task=task is not None,
        prompt_tokens=None,
        remote_available=rng.random() > 0.1,
    )
    return request, features


def one_request(
    router: RuleRouter,
    redactor: Redactor,
    request: dict[str, Any],
    f: RequestFeatures,
    answer: str,
    logprobs: list[float],
) -> None:
    planner = is_planning_request(request["messages"], f.task, tools=request.get("tools"))
    f = f.model_copy(update={"is_planner": planner})
    router.decide(f)
    mapping: dict[str, str] = {}
    for message in request["messages"]:
        if isinstance(message.get("content"), str):
            redactor.redact(message["content"], mapping)
    failure = validate_local_answer(answer, "stop", schema=SCHEMA)
    mean, low = confidence(logprobs)
    router.review(f, failure=failure, mean_logprob=mean, min_logprob=low)


def main() -> None:
    rng = random.Random(4)
    router, redactor = RuleRouter(), Redactor()
    answer = json.dumps({"vendor": "ACME", "total": 1240.5, "currency": "EUR", "lines": [{"sku": "A-1"}] * 3})
    work = [(*make_request(rng), [rng.uniform(-3, 0) for _ in range(60)]) for _ in range(N_REQUESTS)]
    for request, f, logprobs in work[:50]:  # warm caches (compiled validators)
        one_request(router, redactor, request, f, answer, logprobs)
    times_ms = []
    for request, f, logprobs in work:
        start = time.perf_counter()
        one_request(router, redactor, request, f, answer, logprobs)
        times_ms.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(times_ms, n=100)
    p50, p95 = cuts[49], cuts[94]
    size_kb = statistics.mean(len(json.dumps(r["messages"])) for r, _, _ in work) / 1024
    print("| figure | p50 | p95 | target | ratio (p95 / target) |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| router + redaction per request ({N_REQUESTS} requests, mean {size_kb:.1f} KB) "
        f"| {p50:.3f} ms | {p95:.3f} ms | <= {TARGET_P95_MS:.1f} ms p95 | {p95 / TARGET_P95_MS:.2f} |"
    )


if __name__ == "__main__":
    main()
