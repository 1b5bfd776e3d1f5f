"""Stored Responses API answers in the trace database's ``responses`` table (migration
m004_responses): what ``GET /v1/responses/{id}`` returns and what ``previous_response_id`` continues.

Each row keeps the conversation the response answered (input items, the previous ones included)
next to the response itself, so a follow-up rebuilds the whole exchange from one row. The prompt
text lives in ``traces`` too; ``trace_id`` links the two.

Its own connection to the same WAL database, as the span store has.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from slm_agent.contracts.clock import utcnow
from slm_agent.contracts.responses_api import ResponseObject
from slm_agent.errors import NotFoundError
from slm_agent.runtime.store.connection import LockedConnection


class StoredResponse(BaseModel):
    id: str
    created_at: str = Field(default_factory=utcnow)
    trace_id: str | None = Field(None, description="The chat trace that produced the output.")
    model: str
    previous_response_id: str | None = None
    input: list[dict[str, Any]] = Field(description="Input items answered, the previous ones first.")
    response: ResponseObject

    def conversation(self) -> list[dict[str, Any]]:
        """What a follow-up continues: this response's input items, then its output items."""
        return [*self.input, *(item.model_dump() for item in self.response.output)]


_COLUMNS = list(StoredResponse.model_fields)


class ResponseStore(LockedConnection):
    def save(self, stored: StoredResponse) -> None:
        content = self.at_rest({"input": stored.input, "response": stored.response.model_dump()})
        stored = stored.model_copy(
            update={"input": content["input"], "response": ResponseObject.model_validate(content["response"])}
        )
        values = [
            stored.response.model_dump_json()
            if name == "response"
            else json.dumps(stored.input, ensure_ascii=False)
            if name == "input"
            else getattr(stored, name)
            for name in _COLUMNS
        ]
        with self._lock:
            self._conn.execute(
                f"INSERT INTO responses ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                values,
            )

    def get(self, response_id: str, *, param: str | None = None) -> StoredResponse:
        with self._lock:
            row = self._conn.execute("SELECT * FROM responses WHERE id = ?", [response_id]).fetchone()
        if row is None:
            raise NotFoundError(
                f"no stored response with id {response_id!r} (responses created with store=false are not kept)",
                param=param,
            )
        return StoredResponse.model_validate(
            {**dict(row), "input": json.loads(row["input"]), "response": json.loads(row["response"])}
        )
