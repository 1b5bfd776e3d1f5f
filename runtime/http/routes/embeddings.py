"""``POST /v1/embeddings``: the device's encoder for its own id, a remote provider for others."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from slm_agent.contracts.embeddings import EmbeddingList, EmbeddingRequest
from slm_agent.runtime.http.deps import StartedServices
from slm_agent.runtime.http.errors import documented

router = APIRouter()


# The encoder loads with the services, not with the LLM: embeddings answer while the model loads.
# JSONResponse straight away: FastAPI's encoder would walk every float of a batch again.
@router.post(
    "/v1/embeddings",
    response_model=None,
    responses={200: {"model": EmbeddingList, "description": "One embedding per input"}}
    | documented(400, 402, 404, 413, 429, 502, 503, 504),
)
async def create_embeddings(body: EmbeddingRequest, services: StartedServices) -> JSONResponse:
    return JSONResponse(await services.embeddings.create(body))
