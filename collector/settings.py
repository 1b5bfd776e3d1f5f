"""Collector settings: defaults < SLM_COLLECTOR_* env vars < CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slm_agent import locations


def _root() -> Path:
    return locations.data_dir() / "collector"


class CollectorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLM_COLLECTOR_", extra="ignore")

    data: str = Field(
        default_factory=lambda: str(_root() / "traces"),
        description="Where Parquet goes: a directory or any fsspec URL (s3://bucket/traces, gs://…).",
    )
    catalogue: Path = Field(
        default_factory=lambda: _root() / "catalogue.db",
        description="SQLite catalogue of devices, batches and cursors (a local file).",
    )
    publish_dir: Path = Field(
        default_factory=lambda: _root() / "adapters",
        description="Folder of published adapters (<name>/manifest.json + GGUF) devices pull.",
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8780, ge=0, le=65535, description="TCP port to listen on.")
    max_batch_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest batch body accepted.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
