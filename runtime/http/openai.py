"""The generation routes: OpenAI's chat and text completions, the task API and the model list.
Each parses, lets routing decide and carry out, and sends what routing hands back."""

from __future__ import annotations

from fastapi import APIRouter, Response

from slm_agent.contracts.api import ChatCompletionRequest, CompletionRequest, ModelList, TaskRequest
from slm_agent.runtime.http.deps import Caller, LoadedServices, ReadyServices
from slm_agent.runtime.http.respond import respond

router = APIRouter()


@router.get("/v1/models")
async def list_models(services: LoadedServices) -> ModelList:
    return ModelList(data=services.jobs.model_cards())


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, services: ReadyServices, ctx: Caller) -> Response:
    escalation = services.escalation
    return respond(await escalation.chat(escalation.route_chat(body, ctx)))


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, services: ReadyServices, ctx: Caller) -> Response:
    escalation = services.escalation
    job = escalation.route_completion(body, ctx)
    return respond(await escalation.completion(job, body, ctx))


@router.post("/v1/tasks/{name}", response_model=None)
async def run_task(name: str, body: TaskRequest, services: ReadyServices, ctx: Caller) -> Response:
    escalation = services.escalation
    return respond(await escalation.task(escalation.route_task(name, body, ctx)))
