"""The daemon's HTTP app: ``create_app(settings)`` builds the services in a lifespan and mounts the
routers; routes stay thin over routing, serving and the stores.

State lives on ``app.state.services`` (built in the lifespan), never in module globals; routes
reach it through the dependencies in ``deps.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from slm_agent import __version__
from slm_agent.runtime.config import Settings
from slm_agent.runtime.http import errors
from slm_agent.runtime.http.guard import Guard
from slm_agent.runtime.http.routes import (
    admin,
    agents,
    embeddings,
    monitor,
    openai,
    promotion,
    report,
    responses_api,
)
from slm_agent.runtime.http.services import build_services, load_model, start_sync


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        loader = threading.Thread(target=load_model, args=(services,), name="model-loader", daemon=True)
        loader.start()
        sync_worker = start_sync(services)
        services.shadow.start()
        yield
        # uvicorn has already waited for in-flight requests; finish what is queued, then close.
        await asyncio.to_thread(loader.join)
        await asyncio.to_thread(services.shadow.stop)
        if services.escalation.matcher is not None:
            services.escalation.matcher.close()
        await asyncio.to_thread(services.engine.shutdown)
        if sync_worker:
            await asyncio.to_thread(sync_worker.stop)
        if services.remote is not None:
            await services.remote.aclose()
        services.runs.spans.close()
        services.promoter.states.close()
        services.responses.store.close()
        services.traces.close()

    app = FastAPI(title="slm-agentd", version=__version__, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(Guard, settings=settings)
    for module in (admin, openai, embeddings, responses_api, monitor, agents, report, promotion):
        app.include_router(module.router)
    return app
