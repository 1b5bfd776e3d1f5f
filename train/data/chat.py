"""Examples of chat-shaped tasks: the agent's own request is the input, as the daemon serves it.

A task-shaped example's input is the text its prompt wraps; a chat-shaped one's is the request the
agent sent (messages, tools, response_format) as JSON, and its prompt is
``contracts.prompts.chat_task_prompt`` over those messages. ``example_prompt`` is the one place
the dataset and the eval turn an example into the daemon's prompt, whichever its form.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from slm_agent.contracts.api import ChatMessage
from slm_agent.contracts.prompts import chat_task_prompt, task_prompt
from slm_agent.contracts.signature import request_content
from slm_agent.contracts.tasks import Task
from slm_agent.models.manifest import PromptFormat
from slm_agent.train.data.collected import CollectedTrace


class ChatInput(BaseModel):
    """A chat-shaped example's input: the parts of the agent's request the answer depends on."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = Field(None, description="As the agent sent it.")

    @classmethod
    def of(cls, trace: CollectedTrace) -> ChatInput | None:
        messages = trace.messages
        if not messages:
            return None
        return cls(messages=messages, tools=trace.tools or None, response_format=trace.response_format)

    @classmethod
    def parse(cls, text: str) -> ChatInput:
        return cls.model_validate_json(text)

    def to_text(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), ensure_ascii=False)

    def content(self) -> str:
        """What varies between calls of one agent step: dedup and the split are keyed on it."""
        return request_content(self.messages)


def example_prompt(
    task: Task, value: str, tools: list[dict[str, Any]] | None, fmt: PromptFormat
) -> tuple[str, str, list[str]]:
    """(prefix, body, stop) of an example exactly as the daemon builds the task's prompt."""
    if task.form == "chat":
        request = ChatInput.parse(value)
        messages = [ChatMessage.model_validate(m) for m in request.messages]
        return chat_task_prompt(task, messages, request.tools or tools, fmt)
    return task_prompt(task, value, tools, fmt)
