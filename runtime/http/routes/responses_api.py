"""OpenAI's Responses API: ``POST /v1/responses`` answered through the chat completions path, and
``GET /v1/responses/{id}`` for a stored one."""

from __future__ import annotations

from fastapi import APIRouter, Response

from slm_agent.contracts.responses_api import ResponseObject, ResponseRequest
from slm_agent.runtime.http.deps import Caller, ReadyServices, StartedServices
from slm_agent.runtime.http.errors import CLIENT_CLOSED, documented
from slm_agent.runtime.http.respond import json_or_sse, respond

router = APIRouter()


@router.post(
    "/v1/responses",
    response_model=None,
    responses=json_or_sse(ResponseObject, "The response, or response.* events when stream is set")
    | documented(400, 402, 404, 413, 422, 429, 502, 503, 504)
    | CLIENT_CLOSED,
)
async def create_response(body: ResponseRequest, services: ReadyServices, ctx: Caller) -> Response:
    return respond(await services.responses.create(body, ctx))


@router.get("/v1/responses/{response_id}", responses=documented(404))
async def get_response(response_id: str, services: StartedServices) -> ResponseObject:
    return services.responses.get(response_id)
