"""Training-box settings: defaults < SLM_TRAIN_* env vars < CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slm_agent import locations
from slm_agent.collector.settings import CollectorSettings
from slm_agent.models.bundled import BUNDLED_NAME


class LoraConfig(BaseModel):
    """What `train lora` does; stored in every checkpoint and published manifest."""

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (overrides epochs).")
    warmup_steps: int = Field(5, ge=0)
    eval_every: int = Field(10, ge=1, description="Steps between val-loss checks (and checkpoints).")
    patience: int = Field(3, ge=1, description="Val checks without improvement before stopping early.")
    seed: int = 0
    device: str = Field("auto", description="auto (GPU when present), cpu, cuda.")
    qlora: bool = Field(False, description="4-bit base via bitsandbytes (GPU only).")


class TrainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLM_TRAIN_", extra="ignore")

    data: str = Field(
        default_factory=lambda: CollectorSettings().data,
        description="Collected Parquet traces (the collector's data dir or fsspec URL).",
    )
    workdir: Path = Field(
        default_factory=lambda: locations.data_dir() / "train",
        description="Datasets, runs, checkpoints and reports, one folder per task.",
    )
    publish_dir: Path = Field(
        default_factory=lambda: CollectorSettings().publish_dir,
        description="Where published adapters go for devices to pull.",
    )
    base_cache: Path = Field(
        default_factory=lambda: locations.data_dir() / "train" / "_base",
        description="Dequantized base weights for training, cached by the GGUF's sha256.",
    )
    base: str = Field(BUNDLED_NAME, description="Base model (store name) to train adapters on.")
    min_examples: int = Field(20, ge=1, description="Fewest labeled examples a dataset may have.")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    near_duplicate: float = Field(
        0.9, gt=0, le=1, description="Jaccard similarity that makes two inputs one."
    )
    max_tokens: int = Field(512, ge=16, description="Longest prompt + answer kept, in tokens.")
    margin: float = Field(0.02, ge=0, description="How much an adapter must beat base and published by.")
    parity_tolerance: float = Field(
        0.1, gt=0, description="Largest |val loss PEFT - val loss llama.cpp| a converted adapter may show."
    )
    min_new_examples: int = Field(10, ge=0, description="train loop: new labeled examples needed to retrain.")
