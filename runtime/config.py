"""Daemon settings: defaults < TOML file < SLM_AGENT_* env vars < CLI flags.

Every field's description doubles as its ``--help`` text and as the comment in
``slm-agent config show``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from slm_agent import locations
from slm_agent.contracts.wire import SyncSettings
from slm_agent.models.bundled import BUNDLED_NAME
from slm_agent.models.encoder import default_encoder_dir
from slm_agent.runtime.remote.settings import RemoteSettings
from slm_agent.runtime.store.settings import TraceSettings

ENV_PREFIX = "SLM_AGENT_"


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_nested_delimiter="__")

    # -- server ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind. Anything but loopback requires a token.")
    port: int = Field(8765, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    token: SecretStr | None = Field(
        None, description="Bearer token clients must send; required when binding beyond loopback."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Daemon log level.")

    # -- model -------------------------------------------------------------------------------------
    model: str = Field(BUNDLED_NAME, description="Base model: a name in the model store or a path to a GGUF.")
    adapters: list[str] = Field(
        default_factory=list, description="Adapters (store names) to load at start; tasks' adapters load too."
    )
    n_ctx: int = Field(4096, ge=256, description="Context window in tokens (prompt + answer).")
    n_threads: int = Field(default_factory=_default_threads, ge=1, description="CPU threads for inference.")
    n_batch: int = Field(512, ge=32, description="Prompt-processing batch size in tokens.")
    max_memory_mb: int | None = Field(
        None, description="Refuse to load models whose estimated memory exceeds this many MiB."
    )
    adapter_memory_mb: float = Field(
        512,
        gt=0,
        description="MiB of LoRA adapters held loaded. An adapter loads on its first request; one "
        "past this unloads the least recently used idle one (adapters tasks name always stay).",
    )

    # -- requests ----------------------------------------------------------------------------------
    queue_size: int = Field(16, ge=1, description="Requests that may wait for the engine before 429s.")
    max_tokens: int = Field(512, ge=1, description="Default cap on generated tokens per request.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline of one request, queueing included.")
    prefix_cache_size: int = Field(
        8,
        ge=0,
        description="Task prefixes kept resident per context, and saved prefix states per daemon (LRU).",
    )
    max_sequences: int = Field(
        8, ge=1, le=64, description="Requests decoded together in one batch per context."
    )
    max_contexts: int = Field(
        2, ge=1, le=16, description="Adapter sets served at once, the base model's included (a context each)."
    )
    kv_budget_mb: int = Field(
        256, ge=16, description="MiB for all contexts' KV caches; the daemon refuses one too small for n_ctx."
    )
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted.")

    # -- hostile input -----------------------------------------------------------------------------
    max_tokens_cap: int = Field(
        4096, ge=1, description="Most tokens one request may generate, whatever its max_tokens asks."
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Host header names a daemon without a token answers (any port), against DNS "
        "rebinding from a browser; '*' allows any. Comma-separated on the command line.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS); empty sends no CORS headers. "
        "Comma-separated on the command line.",
    )

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # The CLI flag gives one string: "localhost,myhost.lan".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # -- state -------------------------------------------------------------------------------------
    store_dir: Path = Field(default_factory=locations.default_store_dir, description="Model store folder.")
    db_path: Path = Field(default_factory=locations.default_db_path, description="SQLite trace database.")
    tasks_dir: Path = Field(default_factory=locations.tasks_dir, description="Folder of task TOML files.")
    encoder_dir: Path = Field(
        default_factory=default_encoder_dir,
        description="Sentence encoder (int8 ONNX, built by `slm-agent quantize encoder`) that matches "
        "agent calls to tasks by content; without one, calls match by template signature only.",
    )
    shadow_queue: int = Field(
        64, ge=1, description="Shadow comparisons waiting for an idle engine; the oldest gives way."
    )
    shadow_concurrency: int = Field(
        4,
        ge=1,
        description="Shadow comparisons decoded together while the engine is idle (at most max_sequences).",
    )

    # -- embeddings --------------------------------------------------------------------------------
    embedding_model: str = Field(
        "all-minilm-l6-v2", description="Model id /v1/embeddings answers with the encoder at encoder_dir."
    )
    embedding_threads: int = Field(
        2, ge=1, description="CPU threads of the /v1/embeddings encoder (the LLM keeps the others)."
    )
    embedding_batch_size: int = Field(
        32, ge=1, description="Texts per onnxruntime call when embedding a list; bounds peak memory."
    )

    # -- remote ------------------------------------------------------------------------------------
    remote: RemoteSettings = Field(
        default_factory=RemoteSettings, description="Remote LLM providers and escalation budgets."
    )

    # -- sync --------------------------------------------------------------------------------------
    sync: SyncSettings = Field(
        default_factory=SyncSettings, description="Shipping traces to a collector and pulling adapters back."
    )

    # -- traces at rest ----------------------------------------------------------------------------
    traces: TraceSettings = Field(
        default_factory=TraceSettings, description="Trace retention, database size limit, redaction at rest."
    )

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> Settings:
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"binding to {self.host} exposes the daemon beyond this machine: set a token "
                "(SLM_AGENT_TOKEN or --token) or bind to 127.0.0.1"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    """The config file, read fresh so SLM_AGENT_HOME / SLM_AGENT_CONFIG set late still count."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(config_path())


def config_path() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}CONFIG") or locations.config_file())


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(**overrides: Any) -> Settings:
    """Settings from every source; ``overrides`` are CLI flags (None means 'not given')."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def value_sources(settings: Settings, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Where each effective value came from: cli, env, file or default."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_values = read_config_file(config_path())
    sources = {}
    for name in Settings.model_fields:
        if name in overrides:
            sources[name] = "cli"
        elif f"{ENV_PREFIX}{name.upper()}" in {k.upper() for k in os.environ}:
            sources[name] = "env"
        elif name in file_values:
            sources[name] = f"file ({config_path()})"
        else:
            sources[name] = "default"
    return sources
