"""Adapters in the store load on first use within ``adapter_memory_mb``: the least recently used idle
one is unloaded for room, an evicted one loads again when asked for, and one a running request
uses stays loaded. Real LoRA adapters on a real daemon; /v1/models, /metrics and /v1/events show it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon
from lora import make_lora

from slm_agent.models import ModelStore

NAMES = ("lru-a", "lru-b", "lru-c")
CHAT = {"messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def adapter_bytes(
    shared_store: ModelStore, model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> int:
    """Three adapters of one size in the shared store; returns that size."""
    folder = tmp_path_factory.mktemp("lru-adapters")
    for seed, name in enumerate(NAMES):
        if not shared_store.has(name):
            shared_store.add(
                make_lora(folder / f"{name}.gguf", model_path, seed=30 + seed, std=0.08), name=name
            )
    sizes = {shared_store.get(name).size for name in NAMES}
    assert len(sizes) == 1
    return sizes.pop()


def budget_for(n: int, adapter_bytes: int) -> dict[str, str]:
    """Room for ``n`` adapters and half of another."""
    return {"SLM_AGENT_ADAPTER_MEMORY_MB": str((n + 0.5) * adapter_bytes / 2**20)}


def ask(http: httpx.Client, model: str) -> str:
    r = http.post("/v1/chat/completions", json={**CHAT, "model": model})
    assert r.status_code == 200, r.text
    assert r.headers["x-slm-route"] == "local"
    return str(r.json()["choices"][0]["message"]["content"])


def loaded(http: httpx.Client) -> set[str]:
    return {m["id"] for m in http.get("/v1/models").json()["data"] if m["kind"] == "adapter" and m["loaded"]}


def metric(http: httpx.Client, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M)
    assert found, name
    return float(found.group(1))


def adapter_events(http: httpx.Client, count: int) -> list[tuple[str, str, str]]:
    """The first ``count`` adapter load/unload events since the daemon started, from /v1/events."""
    found: list[tuple[str, str, str]] = []
    with http.stream("GET", "/v1/events", headers={"Last-Event-ID": "0"}, timeout=10) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event: dict[str, Any] = json.loads(line[5:])
                if event["kind"] in ("adapter_load", "adapter_unload"):
                    data = event["data"]
                    found.append((event["kind"], data["adapter"], data["reason"]))
                    if len(found) == count:
                        return found
    raise AssertionError(f"the event stream ended after {found}")


def test_least_recently_used_adapter_is_evicted_and_reloads(make_daemon: Any, adapter_bytes: int) -> None:
    a, b, c = NAMES
    daemon: Daemon = make_daemon(env=budget_for(2, adapter_bytes))
    with daemon.client() as http:
        assert loaded(http) == set()  # listed from the store, none loaded
        first_a = ask(http, a)
        ask(http, b)
        assert loaded(http) == {a, b}
        ask(http, c)  # past the budget: a, used least recently, goes
        assert loaded(http) == {b, c}
        assert ask(http, a) == first_a  # loaded again, the same adapter
        assert loaded(http) == {c, a}
        ask(http, c)  # already loaded: now b is the least recently used
        ask(http, b)
        assert loaded(http) == {c, b}
        assert metric(http, "slm_adapter_loads_total") == 5
        assert metric(http, "slm_adapter_evictions_total") == 3
        assert metric(http, "slm_adapter_bytes") == 2 * adapter_bytes
        assert adapter_events(http, 8) == [
            ("adapter_load", a, "first_use"),
            ("adapter_load", b, "first_use"),
            ("adapter_unload", a, "evicted"),
            ("adapter_load", c, "first_use"),
            ("adapter_unload", b, "evicted"),
            ("adapter_load", a, "first_use"),
            ("adapter_unload", a, "evicted"),
            ("adapter_load", b, "first_use"),
        ]


def test_an_adapter_a_running_request_uses_is_not_evicted(make_daemon: Any, adapter_bytes: int) -> None:
    a, b, c = NAMES
    daemon: Daemon = make_daemon(env=budget_for(1, adapter_bytes))
    long_run = {"model": a, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": True}
    with daemon.client() as http, daemon.client() as other:
        with http.stream("POST", "/v1/completions", json=long_run) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # a is generating
            ask(other, b)  # room for one only, but a is in use: both stay, over budget for now
            assert loaded(other) == {a, b}
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2][5:])["choices"][0]["finish_reason"]
        assert finish == "length" and not any('"error"' in line for line in rest)
        ask(http, c)  # both idle now: the next load evicts down to the budget
        assert loaded(http) == {c}
        assert metric(http, "slm_adapter_evictions_total") == 2
