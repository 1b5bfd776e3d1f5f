"""``POST /v1/responses`` without HTTP: continue the stored conversation, route the chat request
it becomes like any other chat call, and shape (and keep) what comes back."""

from __future__ import annotations

import asyncio

from slm_agent.contracts.responses_api import ResponseObject, ResponseRequest
from slm_agent.runtime.responses_api import convert
from slm_agent.runtime.responses_api.events import response_events
from slm_agent.runtime.routing.escalation import Escalation
from slm_agent.runtime.routing.outcome import Outcome
from slm_agent.runtime.serving.context import CallContext
from slm_agent.runtime.store.responses import ResponseStore, StoredResponse


class ResponsesApi:
    def __init__(self, escalation: Escalation, store: ResponseStore) -> None:
        self.escalation = escalation
        self.store = store

    async def create(self, req: ResponseRequest, ctx: CallContext) -> Outcome:
        """The response as an ``Outcome``: a response object, its stream of events, or a bare
        status (499 when the client left); the route headers name the chat trace behind it."""
        previous = (
            self.store.get(req.previous_response_id, param="previous_response_id").conversation()
            if req.previous_response_id
            else None
        )
        items = convert.conversation(req, previous)
        chat = convert.chat_request(req, items)
        # Routing builds the local job (tokenizing, grammars, matching): off the event loop, as
        # the chat completions route does.
        routed = await asyncio.to_thread(self.escalation.route_chat, chat, ctx, "responses")
        outcome = await self.escalation.chat(routed)
        base = convert.started(req)

        def keep(response: ResponseObject) -> None:
            if req.store:
                self.store.save(
                    StoredResponse(
                        id=response.id,
                        trace_id=outcome.trace.id,
                        model=req.model,
                        previous_response_id=req.previous_response_id,
                        input=items,
                        response=response,
                    )
                )

        if outcome.stream is not None:
            return Outcome(outcome.trace, stream=response_events(outcome.stream, base, keep))
        if outcome.body is None:
            return outcome
        response = convert.from_chat(base, outcome.body)
        keep(response)
        return Outcome(outcome.trace, body=response.model_dump(), status=outcome.status)

    def get(self, response_id: str) -> ResponseObject:
        return self.store.get(response_id).response
