"""Health, metrics, feedback, and the admin routes: load and unload adapters, set a task's routing."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from slm_agent.contracts.api import AdapterLoad, AdapterLoaded, AdapterUnloaded, Health, TaskPolicy
from slm_agent.contracts.records import Feedback, FeedbackRecord
from slm_agent.contracts.tasks import Task
from slm_agent.errors import BadRequestError
from slm_agent.models.manifest import check_name
from slm_agent.runtime.http.deps import LoadedServices, ReadyServices
from slm_agent.runtime.http.errors import documented
from slm_agent.runtime.http.services import Services

router = APIRouter()


@router.get(
    "/healthz",
    response_model=Health,
    responses={
        503: {"model": Health, "description": "Starting, loading, or the model failed to load"},
        # Public (no token needed), but the Host check still applies.
        403: documented()[403],
    },
)
async def healthz(request: Request) -> JSONResponse:
    # No dependency: health answers while the services are still being built, and after a failed load.
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse(Health(status="starting").model_dump(exclude_unset=True), status_code=503)
    status = "failed" if services.load_error else ("ok" if services.engine.ready else "loading")
    body = Health(
        status=status,
        model=services.base.name,
        adapters=sorted(services.engine.adapters),
        queue_depth=services.engine.queue_depth,
        error=services.load_error,
    )
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format 0.0.4"}} | documented(503),
)
async def metrics(services: LoadedServices) -> Response:
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")


@router.post(
    "/v1/traces/{trace_id}/feedback",
    status_code=201,
    response_model=FeedbackRecord,
    responses=documented(400, 404, 413, 503),
)
async def add_feedback(trace_id: str, body: Feedback, services: LoadedServices) -> JSONResponse:
    if body.rating is None and not body.correction and not body.comment:
        raise BadRequestError("feedback needs a rating, a correction or a comment")
    record = services.traces.add_feedback(trace_id, body)
    return JSONResponse(record.model_dump(), status_code=201)


@router.post(
    "/v1/admin/adapters", response_model=AdapterLoaded, responses=documented(400, 404, 413, 503, 507)
)
async def load_adapter(body: AdapterLoad, services: ReadyServices) -> JSONResponse:
    # The store checks the name, the manifest and the file; only a file inside the store loads.
    manifest = services.store.get(body.name)
    if manifest.kind != "lora-adapter":
        raise BadRequestError(f"{body.name!r} is a {manifest.kind}, not a LoRA adapter", param="name")
    if manifest.base != services.base.name:
        raise BadRequestError(
            f"adapter {body.name!r} was built for {manifest.base!r}, but this daemon serves {services.base.name!r}",
            param="name",
        )
    path = await asyncio.to_thread(services.store.check_adapter, manifest, services.base)
    await asyncio.to_thread(services.engine.load_adapter, body.name, path)
    services.jobs.adapters.keep(body.name)  # loaded on purpose: never evicted for another
    services.events.publish("adapter_load", {"adapter": body.name})
    services.tasks.reload()  # `sync pull` may have just installed the task files it serves
    bound = [t for t in manifest.tasks if services.tasks.bind_adapter(t, body.name) is not None]
    return JSONResponse(
        AdapterLoaded(name=body.name, tasks=bound, adapters=sorted(services.engine.adapters)).model_dump()
    )


@router.delete(
    "/v1/admin/adapters/{name}", response_model=AdapterUnloaded, responses=documented(400, 404, 503)
)
async def unload_adapter(name: str, services: ReadyServices) -> JSONResponse:
    await asyncio.to_thread(services.engine.unload_adapter, check_name(name))
    # Its tasks fall back to the base model (or the remote) instead of naming an adapter that is gone.
    unbound = services.tasks.unbind_adapter(name)
    services.events.publish("adapter_unload", {"adapter": name, "tasks": unbound})
    return JSONResponse(
        AdapterUnloaded(name=name, unbound=unbound, adapters=sorted(services.engine.adapters)).model_dump()
    )


@router.get("/v1/admin/tasks", response_model=list[Task], responses=documented(503))
async def list_tasks(services: LoadedServices) -> JSONResponse:
    return JSONResponse([t.model_dump(mode="json") for t in services.tasks.list()])


@router.patch("/v1/admin/tasks/{name}", response_model=Task, responses=documented(400, 404, 413, 503))
async def set_task_policy(name: str, body: TaskPolicy, services: LoadedServices) -> JSONResponse:
    task = services.tasks.set_routing(name, body.routing)
    return JSONResponse(task.model_dump(mode="json"))
