"""The generation routes: OpenAI's chat and text completions, the task API and the model list.
Each parses, lets routing decide and carry out, and sends what routing hands back.

Routing a request tokenizes its prompt, compiles its grammar and embeds it for task matching:
milliseconds to a second of CPU for a large body, so it runs on a worker thread, never on the
event loop that answers every other client (and /healthz) meanwhile.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from slm_agent.contracts.api import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
    TaskRequest,
    TaskResponse,
)
from slm_agent.runtime.http.deps import Caller, LoadedServices, ReadyServices
from slm_agent.runtime.http.errors import CLIENT_CLOSED, documented
from slm_agent.runtime.http.respond import json_or_sse, respond

router = APIRouter()

# What generating can answer: a bad field or header, an unknown model or task, a prompt over the
# context, an unsatisfiable schema, a full queue, the remote's failures, loading, a passed deadline.
GENERATION_ERRORS = documented(400, 402, 404, 413, 422, 429, 502, 503, 504) | CLIENT_CLOSED


@router.get("/v1/models", responses=documented(503))
async def list_models(services: LoadedServices) -> ModelList:
    return ModelList(data=[*services.jobs.model_cards(), *services.embeddings.model_cards()])


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=json_or_sse(
        ChatCompletion, "The completion, or chat.completion.chunk events when stream is set"
    )
    | GENERATION_ERRORS,
)
async def chat_completions(body: ChatCompletionRequest, services: ReadyServices, ctx: Caller) -> Response:
    escalation = services.escalation
    return respond(await escalation.chat(await asyncio.to_thread(escalation.route_chat, body, ctx)))


@router.post(
    "/v1/completions",
    response_model=None,
    responses=json_or_sse(Completion, "The completion, or text_completion events when stream is set")
    | GENERATION_ERRORS,
)
async def completions(body: CompletionRequest, services: ReadyServices, ctx: Caller) -> Response:
    escalation = services.escalation
    job = await asyncio.to_thread(escalation.route_completion, body, ctx)
    return respond(await escalation.completion(job, body, ctx))


@router.post(
    "/v1/tasks/{name}",
    response_model=None,
    responses={200: {"model": TaskResponse, "description": "The task's typed output"}} | GENERATION_ERRORS,
)
async def run_task(name: str, body: TaskRequest, services: ReadyServices, ctx: Caller) -> Response:
    escalation = services.escalation
    return respond(await escalation.task(await asyncio.to_thread(escalation.route_task, name, body, ctx)))
