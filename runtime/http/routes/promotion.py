"""Task states over HTTP: list them, and promote or demote a task's adapter by hand."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from slm_agent.runtime.http.deps import LoadedServices
from slm_agent.runtime.http.errors import documented
from slm_agent.runtime.http.services import Services
from slm_agent.runtime.shadow.records import TaskState, TaskStateView

router = APIRouter()


def _views(services: Services) -> list[TaskStateView]:
    """Every known task's state (a task never seen is proxied) and every stored one."""
    promoter = services.promoter
    names = {t.name for t in services.tasks.list()} | {s.task for s in promoter.states.all_states()}
    views = []
    for name in sorted(names):
        state = promoter.state(name)
        window = services.tasks.get(name).promotion.drift_window if services.tasks.has(name) else 20
        stats = promoter.states.stats(name, state.adapter, window) if state.adapter else None
        views.append(TaskStateView(**state.model_dump(), stats=stats))
    return views


def _body(state: TaskState) -> JSONResponse:
    return JSONResponse(state.model_dump(mode="json"))


@router.get("/v1/admin/task-states", response_model=list[TaskStateView], responses=documented(503))
async def task_states(services: LoadedServices) -> JSONResponse:
    views = await asyncio.to_thread(_views, services)
    return JSONResponse([v.model_dump(mode="json") for v in views])


@router.post("/v1/admin/tasks/{name}/promote", response_model=TaskState, responses=documented(404, 409, 503))
async def promote(name: str, services: LoadedServices) -> JSONResponse:
    task = services.tasks.get(name)
    return _body(await asyncio.to_thread(services.promoter.promote, task, "manual"))


@router.post("/v1/admin/tasks/{name}/demote", response_model=TaskState, responses=documented(404, 409, 503))
async def demote(name: str, services: LoadedServices) -> JSONResponse:
    task = services.tasks.get(name)
    return _body(await asyncio.to_thread(services.promoter.demote, task, "manual"))
