"""Everything a running daemon holds, built once in the app's lifespan: store, engine, tasks, traces,
routing, remote client, agent runs; the weights load in the background so ``/healthz`` answers at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.errors import SlmAgentError
from slm_agent.models import BUNDLED_NAME, ModelManifest, ModelStore, ensure_bundled, estimate
from slm_agent.models.memory import UNKNOWN_KV_BYTES_PER_CELL, ensure_fits, kv_bytes_per_token
from slm_agent.runtime.agents.runs import AgentRunner
from slm_agent.runtime.config import Settings
from slm_agent.runtime.embedding.service import EmbeddingService, build_embeddings
from slm_agent.runtime.engine import Engine, EngineConfig
from slm_agent.runtime.http.metrics import Metrics
from slm_agent.runtime.matching.loader import load_encoder
from slm_agent.runtime.matching.matcher import TaskMatcher
from slm_agent.runtime.remote.client import RemoteClient
from slm_agent.runtime.responses_api.service import ResponsesApi
from slm_agent.runtime.routing.escalation import Escalation
from slm_agent.runtime.serving.adapters import AdapterCache
from slm_agent.runtime.serving.jobs import JobBuilder
from slm_agent.runtime.serving.local import LocalRunner
from slm_agent.runtime.serving.recorder import TraceRecorder
from slm_agent.runtime.shadow.promoter import Promoter
from slm_agent.runtime.shadow.states import TaskStates
from slm_agent.runtime.shadow.worker import ShadowWorker
from slm_agent.runtime.store.events import EventBus
from slm_agent.runtime.store.responses import ResponseStore
from slm_agent.runtime.store.spans import SpanStore
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.worker import SyncWorker

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    store: ModelStore
    base: ModelManifest
    engine: Engine
    tasks: TaskRegistry
    traces: TraceStore
    recorder: TraceRecorder
    jobs: JobBuilder
    metrics: Metrics
    events: EventBus
    remote: RemoteClient | None
    escalation: Escalation
    runs: AgentRunner
    promoter: Promoter
    shadow: ShadowWorker
    embeddings: EmbeddingService
    responses: ResponsesApi
    load_error: str | None = None


def resolve_base(settings: Settings, store: ModelStore) -> ModelManifest:
    if settings.model == BUNDLED_NAME:
        return ensure_bundled(store)
    if store.has(settings.model):
        return store.get(settings.model)
    path = Path(settings.model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        name = path.stem
        return store.get(name) if store.has(name) else store.add(path)
    return store.get(settings.model)  # raises NotFoundError listing what exists


def build_services(settings: Settings) -> Services:
    """Everything except loading weights, which happens in the background so /healthz answers at once."""
    store = ModelStore(settings.store_dir)
    base = resolve_base(settings, store)
    tasks = TaskRegistry(settings.tasks_dir)
    config = EngineConfig(
        model_path=store.path_of(base),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
        queue_size=settings.queue_size,
        prefix_cache_size=settings.prefix_cache_size,
        max_sequences=settings.max_sequences,
        max_contexts=settings.max_contexts,
        kv_budget_mb=settings.kv_budget_mb,
    )
    # The KV cache the engine will plan (every context at its share of kv_budget_mb), not n_ctx's.
    cells = config.kv_cells(kv_bytes_per_token(base.info) or UNKNOWN_KV_BYTES_PER_CELL)
    needed = estimate(base, settings.n_ctx, cells * config.max_contexts, config.max_contexts).total_bytes
    adapters = _adapter_names(settings, tasks)
    needed += sum(store.get(a).size for a in adapters if store.has(a))
    limit = settings.max_memory_mb * 2**20 if settings.max_memory_mb else None
    ensure_fits(
        needed,
        f"model {base.name} with {config.max_contexts} contexts of {cells} KV cells (kv_budget_mb="
        f"{config.kv_budget_mb})",
        limit,
    )
    engine = Engine(config)
    redacted = settings.traces.store_redacted  # every table that quotes prompts keeps the same form
    traces = TraceStore(settings.db_path, store_redacted=redacted)
    metrics = Metrics(engine)
    traces.add_listener(
        lambda t: metrics.observe(
            t.endpoint, t.status, t.route, t.latency_ms, t.ttft_ms, t.prompt_tokens, t.completion_tokens
        )
    )
    events = EventBus(traces)
    traces.add_listener(events.publish_trace)
    recorder = TraceRecorder(traces, base.name)
    adapters = AdapterCache(engine, store, base, tasks, settings.adapter_memory_mb, events.publish)
    metrics.watch_adapters(adapters)
    jobs = JobBuilder(settings, store, base, engine, tasks, adapters)
    # No provider configured: no client, and every remote route is answered locally ("offline").
    remote = RemoteClient(settings.remote) if settings.remote.providers else None
    encoder, problem = load_encoder(settings.encoder_dir, threads=1)
    matcher = TaskMatcher(
        tasks,
        encoder,
        encoder_problem=problem,
        on_event=events.publish,
        on_new_signature=traces.tag_signature,
    )
    promoter = Promoter(TaskStates(settings.db_path, on_event=events.publish, store_redacted=redacted))
    shadow = ShadowWorker(
        engine,
        promoter,
        events.publish,
        capacity=settings.shadow_queue,
        concurrency=min(settings.shadow_concurrency, settings.max_sequences),
    )
    metrics.watch_shadow(promoter, shadow)
    escalation = Escalation(
        jobs,
        LocalRunner(engine, recorder),
        recorder,
        remote,
        events.publish,
        matcher=matcher,
        promoter=promoter,
        shadow=shadow,
    )
    runs = AgentRunner(escalation, SpanStore(settings.db_path, store_redacted=redacted), events.publish)
    return Services(
        settings,
        store,
        base,
        engine,
        tasks,
        traces,
        recorder,
        jobs,
        metrics,
        events,
        remote,
        escalation,
        runs,
        promoter,
        shadow,
        build_embeddings(settings, remote, metrics.registry),
        ResponsesApi(escalation, ResponseStore(settings.db_path, store_redacted=redacted)),
    )


def _adapter_names(settings: Settings, tasks: TaskRegistry) -> list[str]:
    names = list(settings.adapters)
    names += [t.adapter for t in tasks.list() if t.adapter and t.adapter not in names]
    return names


def _bind_trained_adapters(services: Services) -> None:
    """Tasks without a pinned adapter get the newest adapter in the store trained for them."""
    newest: dict[str, ModelManifest] = {}
    for manifest in services.store.list():
        if manifest.kind != "lora-adapter" or manifest.base != services.base.name:
            continue
        for task in manifest.tasks:
            if task not in newest or manifest.created_at > newest[task].created_at:
                newest[task] = manifest
    for task, manifest in newest.items():
        if services.tasks.has(task) and not services.tasks.pinned(task):
            services.tasks.bind_adapter(task, manifest.name)


def load_model(services: Services) -> None:
    try:
        services.engine.load()
        services.events.publish("model_load", {"model": services.base.name, "n_ctx": services.settings.n_ctx})
        _bind_trained_adapters(services)
        for name in _adapter_names(services.settings, services.tasks):
            try:
                manifest = services.store.get(name)
                services.engine.load_adapter(name, services.store.path_of(manifest))
                services.events.publish("adapter_load", {"adapter": name})
            except SlmAgentError as exc:
                log.error("adapter %s not loaded: %s", name, exc.message)
                services.events.publish("error", {"message": f"adapter {name} not loaded: {exc.message}"})
    except Exception as exc:
        services.load_error = str(exc)
        services.events.publish("error", {"message": f"model load failed: {exc}"})
        log.exception("model load failed")


def start_sync(services: Services) -> SyncWorker | None:
    """Background push of traces to the collector, when configured (off by default)."""
    if not services.settings.sync.enabled:
        return None
    worker = SyncWorker(
        services.settings.sync,
        services.settings.db_path,
        excluded_tasks=lambda: {t.name for t in services.tasks.list() if not t.sync},
        busy=services.engine.serving,
    )
    worker.start()
    return worker
