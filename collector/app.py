"""The collector's HTTP API: devices push batches, pull published adapters."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from slm_agent.collector.catalogue import Catalogue
from slm_agent.collector.ingest import Collector
from slm_agent.collector.settings import CollectorSettings
from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.wire import CHECKSUM_HEADER, AdapterListing, SyncAck, decode_batch, scan_publish_dir
from slm_agent.errors import (
    AuthenticationError,
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    SlmAgentError,
)

log = logging.getLogger(__name__)


def create_app(settings: CollectorSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalogue = Catalogue(settings.catalogue)
        collector = Collector(TraceStorage(settings.data), catalogue)
        collector.reconcile()
        app.state.collector = collector
        app.state.settings = settings
        yield
        catalogue.close()

    app = FastAPI(title="slm-agent collector", lifespan=lifespan)

    @app.exception_handler(SlmAgentError)
    async def _error(request: Request, exc: SlmAgentError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": exc.message, "type": exc.error_type, "code": exc.code}},
            status_code=exc.status_code,
        )

    def authenticate(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        device = (
            request.app.state.collector.catalogue.device_for_token(token)
            if scheme.lower() == "bearer"
            else None
        )
        if not device:
            raise AuthenticationError(
                "missing or unknown device token: register the device with "
                "`slm-agent collector register DEVICE_ID` and set its token"
            )
        return str(device)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/batches", response_model=SyncAck)
    async def post_batch(request: Request) -> SyncAck:
        device = authenticate(request)
        body = await request.body()
        if len(body) > settings.max_batch_bytes:
            raise BadRequestError(
                f"batch of {len(body)} bytes exceeds {settings.max_batch_bytes}", code="too_large"
            )
        expected = request.headers.get(CHECKSUM_HEADER)
        if not expected or hashlib.sha256(body).hexdigest() != expected:
            raise BadRequestError(
                f"batch body does not match its {CHECKSUM_HEADER}: resend it", code="corrupt_batch"
            )
        batch = await run_in_threadpool(decode_batch, body)
        if batch.device_id != device:
            raise ForbiddenError(f"token belongs to device {device!r}, batch claims {batch.device_id!r}")
        collector: Collector = request.app.state.collector
        return await run_in_threadpool(collector.ingest, batch)

    @app.get("/v1/adapters", response_model=AdapterListing)
    async def list_adapters(request: Request) -> AdapterListing:
        authenticate(request)
        return AdapterListing(adapters=scan_publish_dir(settings.publish_dir))

    @app.get("/v1/adapters/{name}/file")
    async def adapter_file(name: str, request: Request) -> FileResponse:
        authenticate(request)
        # Only files a manifest names are served: no path from the request reaches the filesystem.
        for adapter in scan_publish_dir(settings.publish_dir):
            if adapter.name == name:
                path = Path(settings.publish_dir) / adapter.name / Path(adapter.file).name
                if path.is_file():
                    return FileResponse(path, media_type="application/octet-stream", filename=path.name)
        raise NotFoundError(f"no published adapter named {name!r}")

    return app
