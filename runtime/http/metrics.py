"""Prometheus metrics of one daemon (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from slm_agent.runtime.engine import Engine
from slm_agent.runtime.serving.adapters import AdapterCache
from slm_agent.runtime.shadow.promoter import Promoter
from slm_agent.runtime.shadow.records import STATE_NAMES
from slm_agent.runtime.shadow.worker import ShadowWorker

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.stats
        yield GaugeMetricFamily(
            "slm_queue_depth", "Requests waiting for or running on the engine.", self.engine.queue_depth
        )
        yield GaugeMetricFamily("slm_adapters_loaded", "LoRA adapters loaded.", len(self.engine.adapters))
        yield GaugeMetricFamily(
            "slm_batch_sequences", "Requests decoding in the running batches now.", self.engine.running
        )
        yield GaugeMetricFamily(
            "slm_engine_contexts", "Contexts held, one per adapter set in use.", self.engine.contexts
        )
        yield CounterMetricFamily(
            "slm_engine_contexts_created", "Contexts made for an adapter set.", stats.contexts_created
        )
        yield CounterMetricFamily(
            "slm_engine_steps", "Decode steps, each over one context's batch.", stats.steps
        )
        yield CounterMetricFamily(
            "slm_engine_step_tokens",
            "Tokens evaluated by decode steps (tokens per step: over steps).",
            stats.step_tokens,
        )
        yield CounterMetricFamily(
            "slm_engine_step_sequences",
            "Sequences served by decode steps (batch size per step: over steps).",
            stats.step_sequences,
        )
        yield CounterMetricFamily(
            "slm_engine_queue_wait_seconds",
            "Time started requests waited in the queue.",
            stats.queue_ms / 1000,
        )
        given_back = CounterMetricFamily(
            "slm_engine_kv_taken_back",
            "Sequences that gave their KV cells back to a full cache: shadow work cancelled, live "
            "sequences evicted to be read again.",
            labels=["kind"],
        )
        given_back.add_metric(["shadow_cancelled"], stats.preempted)
        given_back.add_metric(["live_evicted"], stats.evicted)
        yield given_back
        hits = CounterMetricFamily(
            "slm_prefix_cache", "Prompt-prefix lookups by outcome.", labels=["outcome"]
        )
        hits.add_metric(["kv_resident"], stats.prefix_hits_kv)
        hits.add_metric(["state_restored"], stats.prefix_hits_state)
        hits.add_metric(["miss"], stats.prefix_misses)
        yield hits
        yield GaugeMetricFamily(
            "slm_prefix_cache_bytes", "Bytes held by saved prefix states.", self.engine.prefix_cache.bytes
        )


class _ShadowCollector(Collector):
    """Each task's state (1 on its current state), its shadow pairs and agreements, the worker's queue."""

    def __init__(self, promoter: Promoter, worker: ShadowWorker | None) -> None:
        self.promoter = promoter
        self.worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        states = GaugeMetricFamily(
            "slm_task_state", "Task state: 1 on the state the task is in.", labels=["task", "state"]
        )
        coverage = GaugeMetricFamily(
            "slm_gate_coverage", "Share of shadow pairs a live task's gate lets through.", labels=["task"]
        )
        for current in self.promoter.states.all_states():
            for name in STATE_NAMES:
                states.add_metric([current.task, name], float(current.state == name))
            if current.gate is not None:
                coverage.add_metric([current.task], current.gate.coverage)
        yield states
        yield coverage
        pairs = CounterMetricFamily(
            "slm_shadow_pairs", "Judged shadow pairs (local vs remote).", labels=["task"]
        )
        agreements = CounterMetricFamily(
            "slm_shadow_agreements", "Shadow pairs where the local answer agreed.", labels=["task"]
        )
        for task, (n, agreed) in self.promoter.states.pair_totals().items():
            pairs.add_metric([task], n)
            agreements.add_metric([task], agreed)
        yield pairs
        yield agreements
        if self.worker is not None:
            yield GaugeMetricFamily("slm_shadow_queue_depth", "Shadow jobs waiting.", self.worker.pending)
            jobs = CounterMetricFamily("slm_shadow_jobs", "Shadow jobs by outcome.", labels=["outcome"])
            counters = self.worker.counters
            for outcome in ("submitted", "completed", "failed", "preempted", "dropped"):
                jobs.add_metric([outcome], getattr(counters, outcome))
            yield jobs


class _AdapterCollector(Collector):
    """Adapters loaded on first use and evicted for room, and the memory loaded adapters hold."""

    def __init__(self, adapters: AdapterCache) -> None:
        self.adapters = adapters

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counters = self.adapters.counters
        yield CounterMetricFamily("slm_adapter_loads", "Adapters loaded on first use.", counters.loads)
        yield CounterMetricFamily(
            "slm_adapter_evictions", "Adapters unloaded for room (least recently used).", counters.evictions
        )
        yield GaugeMetricFamily("slm_adapter_bytes", "Bytes of loaded adapters.", self.adapters.held_bytes())


class Metrics:
    def __init__(
        self, engine: Engine, promoter: Promoter | None = None, shadow: ShadowWorker | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "slm_requests",
            "Requests by endpoint, status and route.",
            ["endpoint", "status", "route"],
            registry=self.registry,
        )
        self.tokens = Counter("slm_tokens", "Tokens processed.", ["kind"], registry=self.registry)
        self.latency = self._seconds("slm_request_latency_seconds", "End-to-end request latency.")
        self.ttft = self._seconds("slm_time_to_first_token_seconds", "Time to first token.")
        self.registry.register(_EngineCollector(engine))
        if promoter is not None:
            self.watch_shadow(promoter, shadow)

    def watch_shadow(self, promoter: Promoter, shadow: ShadowWorker | None = None) -> None:
        """Export task states and shadow counters (for services built after the metrics)."""
        self.registry.register(_ShadowCollector(promoter, shadow))

    def watch_adapters(self, adapters: AdapterCache) -> None:
        """Export adapter loads and evictions (the cache is built after the metrics)."""
        self.registry.register(_AdapterCollector(adapters))

    def _seconds(self, name: str, documentation: str) -> Histogram:
        """A per-endpoint histogram of durations in seconds."""
        return Histogram(name, documentation, ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe(
        self,
        endpoint: str,
        status: int,
        route: str,
        latency_ms: float | None,
        ttft_ms: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        self.requests.labels(endpoint, str(status), route).inc()
        if latency_ms is not None:
            self.latency.labels(endpoint).observe(latency_ms / 1000)
        if ttft_ms is not None:
            self.ttft.labels(endpoint).observe(ttft_ms / 1000)
        if prompt_tokens:
            self.tokens.labels("prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels("completion").inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
