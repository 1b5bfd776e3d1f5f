"""What routes depend on, through FastAPI ``Depends``: the daemon's services and the caller's context."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from slm_agent.errors import BadRequestError, UnavailableError
from slm_agent.runtime.http.services import Services
from slm_agent.runtime.serving.context import CallContext


def started_services(request: Request) -> Services:
    """The services, whether or not the model loaded: the monitor reads traces either way."""
    services: Services = request.app.state.services
    return services


def services_of(request: Request) -> Services:
    services = started_services(request)
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
        disconnected=request.is_disconnected,
    )


StartedServices = Annotated[Services, Depends(started_services)]
LoadedServices = Annotated[Services, Depends(services_of)]
ReadyServices = Annotated[Services, Depends(ready_services)]
Caller = Annotated[CallContext, Depends(call_context)]
