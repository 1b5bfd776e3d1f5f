"""The daemon's HTTP layer: thin routes over the service, engine and trace store.

State lives on ``app.state.services`` (built in the lifespan), never in module globals.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from slm_agent.errors import BadRequestError, SlmAgentError, UnavailableError
from slm_agent.models import BUNDLED_NAME, ModelManifest, ModelStore, ensure_bundled, estimate
from slm_agent.models.memory import ensure_fits
from slm_agent.runtime import api_errors
from slm_agent.runtime.agent_api import router as agent_router
from slm_agent.runtime.agent_runs import AgentRunner
from slm_agent.runtime.api_types import (
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    TaskPolicy,
    TaskRequest,
)
from slm_agent.runtime.config import Settings
from slm_agent.runtime.engine import Engine, EngineConfig, GenerationResult
from slm_agent.runtime.escalation import Escalation, Outcome
from slm_agent.runtime.events import EventBus
from slm_agent.runtime.guard import Guard
from slm_agent.runtime.metrics import Metrics
from slm_agent.runtime.monitor_api import router as monitor_router
from slm_agent.runtime.remote import RemoteClient
from slm_agent.runtime.service import CallContext, Job, Service
from slm_agent.runtime.spans import SpanStore
from slm_agent.runtime.sse import DONE, sse
from slm_agent.runtime.tasks import TaskRegistry
from slm_agent.runtime.traces import Feedback, TraceRecord, TraceStore

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Services:
    settings: Settings
    store: ModelStore
    base: ModelManifest
    engine: Engine
    tasks: TaskRegistry
    traces: TraceStore
    service: Service
    metrics: Metrics
    events: EventBus
    remote: RemoteClient | None
    escalation: Escalation
    runs: AgentRunner
    load_error: str | None = None


def resolve_base(settings: Settings, store: ModelStore) -> ModelManifest:
    from pathlib import Path

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
    needed = estimate(base, settings.n_ctx).total_bytes
    adapters = _adapter_names(settings, tasks)
    needed += sum(store.get(a).size for a in adapters if store.has(a))
    limit = settings.max_memory_mb * 2**20 if settings.max_memory_mb else None
    ensure_fits(needed, f"model {base.name} at n_ctx={settings.n_ctx}", limit)
    engine = Engine(
        EngineConfig(
            model_path=store.path_of(base),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_batch=settings.n_batch,
            queue_size=settings.queue_size,
            prefix_cache_size=settings.prefix_cache_size,
        )
    )
    traces = TraceStore(settings.db_path)
    metrics = Metrics(engine)
    traces.add_listener(
        lambda t: metrics.observe(
            t.endpoint, t.status, t.route, t.latency_ms, t.ttft_ms, t.prompt_tokens, t.completion_tokens
        )
    )
    events = EventBus(traces)
    traces.add_listener(events.publish_trace)
    service = Service(settings, store, base, engine, tasks, traces)
    # No provider configured: no client, and every remote route is answered locally ("offline").
    remote = RemoteClient(settings.remote) if settings.remote.providers else None
    escalation = Escalation(service, remote, events.publish)
    runs = AgentRunner(
        escalation,
        SpanStore(settings.db_path),
        events.publish,
        lambda job: asyncio.wrap_future(engine.submit(job.gen)),
    )
    return Services(
        settings, store, base, engine, tasks, traces, service, metrics, events, remote, escalation, runs
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


def _load_model(services: Services) -> None:
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


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        loader = threading.Thread(target=_load_model, args=(services,), name="model-loader", daemon=True)
        loader.start()
        sync_worker = _start_sync(services)
        yield
        # uvicorn has already waited for in-flight requests; finish what is queued, then close.
        await asyncio.to_thread(loader.join)
        await asyncio.to_thread(services.engine.shutdown)
        if sync_worker:
            await asyncio.to_thread(sync_worker.stop)
        if services.remote is not None:
            await services.remote.aclose()
        services.runs.spans.close()
        services.traces.close()

    app = FastAPI(title="slm-agentd", version="0.1.0", lifespan=lifespan)
    api_errors.install(app)

    app.add_middleware(
        Guard,
        token=settings.token.get_secret_value() if settings.token else None,
        max_request_bytes=settings.max_request_bytes,
    )

    app.include_router(router)
    app.include_router(monitor_router)
    app.include_router(agent_router)
    return app


def _start_sync(services: Services) -> Any:
    """Background push of traces to the collector, when configured (off by default)."""
    if not services.settings.sync.enabled:
        return None
    from slm_agent.runtime.sync import SyncWorker

    worker = SyncWorker(
        services.settings.sync,
        services.settings.db_path,
        excluded_tasks=lambda: {t.name for t in services.tasks.list() if not t.sync},
        busy=services.engine.serving,
    )
    worker.start()
    return worker


router = APIRouter()


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    if services.load_error:
        raise UnavailableError(f"the model failed to load: {services.load_error}", code="model_load_failed")
    return services


def ready_services(request: Request) -> Services:
    services = services_of(request)
    if not services.engine.ready:
        raise UnavailableError("the model is still loading", retry_after_s=1, code="loading")
    return services


def call_context(request: Request) -> CallContext:
    deadline_ms = request.headers.get("x-slm-deadline-ms")
    route = request.headers.get("x-slm-route")
    if route is not None and route not in ("local", "remote"):
        raise BadRequestError(f"X-SLM-Route must be 'local' or 'remote', not {route!r}", param="X-SLM-Route")
    return CallContext(
        route=route,  # type: ignore[arg-type]  # checked just above
        client=request.client.host if request.client else None,
        session_id=request.headers.get("x-slm-session"),
        agent=request.headers.get("x-slm-agent"),
        task_header=request.headers.get("x-slm-task"),
        deadline_s=float(deadline_ms) / 1000
        if deadline_ms and deadline_ms.replace(".", "", 1).isdigit()
        else None,
    )


def route_headers(trace: TraceRecord) -> dict[str, str]:
    return {
        "X-SLM-Route": trace.route,
        "X-SLM-Route-Reason": trace.route_reason or "",
        "X-SLM-Trace-Id": trace.id,
    }


# -- health, metrics, catalogue --------------------------------------------------------------------
@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    status = "failed" if services.load_error else ("ok" if services.engine.ready else "loading")
    body = {
        "status": status,
        "model": services.base.name,
        "adapters": sorted(services.engine.adapters),
        "queue_depth": services.engine.queue_depth,
        "error": services.load_error,
    }
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = services_of(request)
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=services_of(request).service.model_cards())


# -- generation --------------------------------------------------------------------------------------
def _prepare(
    services: Services, endpoint: str, ctx: CallContext, model: str | None, raw: Any, build: Callable[[], T]
) -> T:
    try:
        return build()
    except SlmAgentError as exc:
        services.service.record_failure(endpoint, ctx, model, raw, exc)
        raise


async def _run(request: Request, services: Services, job: Job) -> GenerationResult:
    """Run a job on the engine; cancel it if the client goes away while it waits."""
    future = asyncio.wrap_future(services.engine.submit(job.gen))
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        if await request.is_disconnected():
            job.gen.cancel.set()


async def _complete(
    request: Request, services: Services, job: Job, shape: Callable[[Job, GenerationResult], BaseModel]
) -> Response:
    result: GenerationResult | None = None
    try:
        result = await _run(request, services, job)
        if result.finish_reason == "cancelled":
            services.service.record(job, result, response_text=result.text, status=499)
            return Response(status_code=499)
        body = shape(job, result)
    except SlmAgentError as exc:
        services.service.record(job, result, response_text=result.text if result else None, error=exc)
        raise
    return JSONResponse(body.model_dump(exclude_none=True), headers=route_headers(job.trace))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    services = ready_services(request)
    ctx = call_context(request)
    raw = [m.model_dump(exclude_none=True) for m in body.messages]
    escalation = services.escalation
    routed = _prepare(
        services, "chat.completions", ctx, body.model, raw, lambda: escalation.route_chat(body, ctx)
    )
    outcome = await escalation.chat(routed, lambda job: _run(request, services, job))
    if outcome.local_stream is not None:
        return _stream(
            request,
            services,
            outcome.local_stream,
            chat=True,
            include_usage=bool((body.stream_options or {}).get("include_usage")),
        )
    return _respond(outcome)


def _respond(outcome: Outcome) -> Response:
    headers = route_headers(outcome.trace)
    if outcome.stream is not None:
        return StreamingResponse(
            outcome.stream, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    if outcome.body is None:
        return Response(status_code=outcome.status, headers=headers)
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest) -> Response:
    services = ready_services(request)
    ctx = call_context(request)
    job = _prepare(
        services,
        "completions",
        ctx,
        body.model,
        body.prompt,
        lambda: services.service.completion_job(body, ctx),
    )
    services.escalation.local_only(job, ctx)
    if body.stream:
        return _stream(
            request,
            services,
            job,
            chat=False,
            include_usage=bool((body.stream_options or {}).get("include_usage")),
        )
    return await _complete(request, services, job, services.service.completion_response)


@router.post("/v1/tasks/{name}", response_model=None)
async def run_task(request: Request, name: str, body: TaskRequest) -> Response:
    services = ready_services(request)
    ctx = call_context(request)
    escalation = services.escalation
    routed = _prepare(
        services, "tasks", ctx, f"task:{name}", body.input, lambda: escalation.route_task(name, body, ctx)
    )
    outcome = await escalation.task(routed, lambda job: _run(request, services, job))
    return _respond(outcome)


def _stream(
    request: Request, services: Services, job: Job, *, chat: bool, include_usage: bool
) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    buffered = job.output_kind == "tool_call"  # a tool call is sent whole, once it parses
    if not buffered:
        job.gen.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    # Submitting before the response starts lets a full queue answer a plain 429.
    future = services.engine.submit(job.gen)
    waiter = asyncio.wrap_future(future)
    service = services.service
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(loop.time())

    def chunk(delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = (
            {"index": 0, "delta": delta, "finish_reason": finish}
            if chat
            else {"index": 0, "text": delta, "finish_reason": finish}
        )
        return {
            "id": job.trace.id,
            "object": kind,
            "created": created,
            "model": job.target.model_id,
            "choices": [choice],
        }

    def text_chunk(text: str) -> dict[str, Any]:
        return chunk({"content": text} if chat else text)

    async def body() -> AsyncIterator[bytes]:
        finished = False
        result: GenerationResult | None = None
        try:
            if chat:
                yield sse(chunk({"role": "assistant", "content": ""}))
            while not waiter.done():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse(text_chunk(getter.result()))
                else:
                    getter.cancel()
            while not pieces.empty():
                yield sse(text_chunk(pieces.get_nowait()))
            result = waiter.result()
            finish = "length" if result.finish_reason == "length" else "stop"
            if chat:
                output, tool_calls = service.chat_output(job, result)
                if tool_calls:
                    finish = "tool_calls"
                    calls = [{"index": i, **c.model_dump()} for i, c in enumerate(tool_calls)]
                    yield sse(chunk({"tool_calls": calls}))
                service.record(
                    job,
                    result,
                    response_text=None if tool_calls else result.text,
                    output=output,
                    tool_calls=tool_calls,
                )
            else:
                service.record(job, result, response_text=result.text)
            # The trace is committed; only now do the last bytes go out.
            yield sse(chunk({} if chat else "", finish))
            if include_usage:
                from slm_agent.runtime.service import usage

                yield sse({**chunk({} if chat else ""), "choices": [], "usage": usage(result).model_dump()})
            yield DONE
            finished = True
        except SlmAgentError as exc:
            service.record(job, result, response_text=result.text if result else None, error=exc)
            finished = True
            yield sse(api_errors.error_body(exc.message, exc.error_type, exc.param, exc.code))
            yield DONE
        finally:
            if not finished:
                # The client went away mid-stream: stop generating, keep the trace of what was said.
                job.gen.cancel.set()
                future.add_done_callback(lambda f: _record_abandoned(service, job, f))

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={**route_headers(job.trace), "Cache-Control": "no-cache"},
    )


def _record_abandoned(service: Service, job: Job, future: Any) -> None:
    result = None if future.exception() else future.result()
    service.record(job, result, response_text=result.text if result else None, status=499)


# -- traces and feedback -----------------------------------------------------------------------------
@router.post("/v1/traces/{trace_id}/feedback")
async def add_feedback(request: Request, trace_id: str, body: Feedback) -> JSONResponse:
    services = services_of(request)
    if body.rating is None and not body.correction and not body.comment:
        raise BadRequestError("feedback needs a rating, a correction or a comment")
    record = services.traces.add_feedback(trace_id, body)
    return JSONResponse(record.model_dump(), status_code=201)


# -- admin: adapters and task policies ---------------------------------------------------------------
@router.post("/v1/admin/adapters")
async def load_adapter(request: Request, body: AdapterLoad) -> JSONResponse:
    services = ready_services(request)
    manifest = services.store.get(body.name)
    if manifest.kind != "lora-adapter":
        raise BadRequestError(f"{body.name!r} is a {manifest.kind}, not a LoRA adapter", param="name")
    if manifest.base != services.base.name:
        raise BadRequestError(
            f"adapter {body.name!r} was built for {manifest.base!r}, but this daemon serves {services.base.name!r}",
            param="name",
        )
    await asyncio.to_thread(services.engine.load_adapter, body.name, services.store.path_of(manifest))
    services.events.publish("adapter_load", {"adapter": body.name})
    bound = [t for t in manifest.tasks if services.tasks.bind_adapter(t, body.name) is not None]
    return JSONResponse(
        {"name": body.name, "loaded": True, "tasks": bound, "adapters": sorted(services.engine.adapters)}
    )


@router.delete("/v1/admin/adapters/{name}")
async def unload_adapter(request: Request, name: str) -> JSONResponse:
    services = ready_services(request)
    await asyncio.to_thread(services.engine.unload_adapter, name)
    services.events.publish("adapter_unload", {"adapter": name})
    return JSONResponse({"name": name, "loaded": False, "adapters": sorted(services.engine.adapters)})


@router.get("/v1/admin/tasks")
async def list_tasks(request: Request) -> JSONResponse:
    services = services_of(request)
    return JSONResponse([t.model_dump(mode="json") for t in services.tasks.list()])


@router.patch("/v1/admin/tasks/{name}")
async def set_task_policy(request: Request, name: str, body: TaskPolicy) -> JSONResponse:
    task = services_of(request).tasks.set_routing(name, body.routing)
    return JSONResponse(task.model_dump(mode="json"))
