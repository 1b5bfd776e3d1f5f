"""Remote providers as configured, and what one remote call returned: pydantic models only, so
loading the daemon's settings pulls in neither httpx nor the redactor."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

__all__ = ["RemoteProvider", "RemoteResult", "RemoteSettings"]


class RemoteProvider(BaseModel):
    name: str = Field(description="Name used in logs, traces and default_provider.")
    base_url: str = Field(description="OpenAI-compatible API root, e.g. https://api.openai.com/v1.")
    models: list[str] = Field(default_factory=lambda: ["*"], description='Model ids it serves; "*" = any.')
    escalation_model: str | None = Field(
        None, description="Model id sent when a local request escalates here (default: first of models)."
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key is never stored)."
    )
    price_per_1k_input: float = Field(0.0, ge=0, description="USD per 1,000 prompt tokens.")
    price_per_1k_output: float = Field(0.0, ge=0, description="USD per 1,000 completion tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Connect/read timeout of one attempt, in seconds.")
    max_retries: int = Field(
        2, ge=0, description="Retries after the first attempt on 429, 5xx, network errors."
    )
    redaction: Literal["off", "redact", "refuse"] = Field(
        "redact", description="PII handling: send as is, replace with placeholders, or refuse to send."
    )

    def serves(self, model: str) -> bool:
        return model in self.models or "*" in self.models

    def upstream_model(self) -> str | None:
        return self.escalation_model or next((m for m in self.models if m != "*"), None)


class RemoteSettings(BaseModel):
    providers: list[RemoteProvider] = Field(default_factory=list, description="Remote providers.")
    default_provider: str | None = Field(
        None, description="Provider for escalations and model ids no provider names (default: the first)."
    )
    daily_token_budget: int | None = Field(
        None, ge=0, description="Remote tokens per UTC day; none = unlimited."
    )
    daily_cost_budget_usd: float | None = Field(
        None, ge=0, description="Remote USD per UTC day; none = unlimited."
    )
    on_budget_exhausted: Literal["local", "error"] = Field(
        "local", description="When a budget is spent: answer locally, or fail with 402."
    )
    breaker_failures: int = Field(3, ge=1, description="Consecutive failures that open a provider's breaker.")
    breaker_cooldown_s: float = Field(30.0, ge=0, description="Seconds an open breaker waits before a probe.")
    backoff_base_s: float = Field(
        0.5, ge=0, description="First retry delay; doubles each retry (with jitter)."
    )
    backoff_max_s: float = Field(8.0, ge=0, description="Longest delay between two retries.")
    max_retry_after_s: float = Field(30.0, ge=0, description="A longer Retry-After fails the call instead.")
    redact_patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra PII kinds to redact: kind -> regex."
    )

    @model_validator(mode="after")
    def _known_default(self) -> RemoteSettings:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"remote provider names must be unique, got {names}")
        if self.default_provider is not None and self.default_provider not in names:
            raise ValueError(
                f"default_provider {self.default_provider!r} is not one of the providers {names}"
            )
        return self


class RemoteResult(BaseModel):
    """What a remote call cost and did, for the trace store; ``response`` is the OpenAI body."""

    response: dict[str, Any] = Field(default_factory=dict)
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = Field(False, description="True when the provider reported no usage.")
    cost_usd: float = 0.0
    attempts: int = 1
    latency_s: float = 0.0
    redactions: dict[str, int] = Field(default_factory=dict, description="PII kind -> values redacted.")

    @property
    def message(self) -> dict[str, Any]:
        """The first choice's message; {} when the provider sent none (streams have no body)."""
        message = self._first_choice().get("message")
        return message if isinstance(message, dict) else {}

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish_reason, as the provider spelled it; None when absent."""
        reason = self._first_choice().get("finish_reason")
        return reason if isinstance(reason, str) else None

    def _first_choice(self) -> dict[str, Any]:
        choice = (self.response.get("choices") or [{}])[0]
        return choice if isinstance(choice, dict) else {}
