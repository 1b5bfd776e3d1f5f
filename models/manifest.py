"""Manifests: what the store knows about each model file, as pydantic models."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

from slm_agent.errors import BadRequestError

# One path component and never '.' or '..': a name can only ever mean a folder directly in the store.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """``name`` if it is a valid store name; a 400 naming the rule otherwise (from an API or CLI)."""
    if not NAME_RE.match(name):
        raise BadRequestError(
            f"invalid model name {name[:64]!r}: use letters, digits, '.', '_' and '-' (at most 128), "
            "starting with a letter or digit",
            param="name",
        )
    return name


class ModelKind(StrEnum):
    base = "base"
    lora_adapter = "lora-adapter"
    encoder = "encoder"


class ChatTemplate(BaseModel):
    """A model's own chat template (``tokenizer.chat_template`` in its GGUF), with the special
    tokens the template refers to, as the GGUF's tokenizer names them."""

    source: str = Field(description="The Jinja2 template text.")
    bos_token: str = Field("", description="Text of the beginning-of-sequence token.")
    eos_token: str = Field("", description="Text of the end-of-sequence token.")
    add_bos: bool = Field(
        True, description="Whether the tokenizer adds BOS itself (a template's own BOS is then dropped)."
    )


class PromptFormat(BaseModel):
    """How chat turns become one prompt string for a model.

    The bundled base model has no chat template, so every manifest carries one of these and a
    task may override it. ``{content}`` is replaced by the turn's text. A model whose GGUF has a
    chat template also carries it: plain chat is then prompted with it, while task prompts keep
    the generic turns their adapters were trained on.
    """

    system: str = Field("{content}\n\n", description="Template of a system turn.")
    user: str = Field("User: {content}\n", description="Template of a user turn.")
    assistant: str = Field("Assistant: {content}\n", description="Template of a past assistant turn.")
    generation_prefix: str = Field("Assistant:", description="Text that cues the model's answer.")
    stop: list[str] = Field(default_factory=lambda: ["\nUser:"], description="Stop strings of a chat answer.")
    chat_template: ChatTemplate | None = Field(None, description="The model's own chat template, if any.")


class GGUFInfo(BaseModel):
    """Metadata read from a GGUF header."""

    architecture: str
    file_type: str | None = Field(None, description="Quantization of the weights, e.g. Q4_K_M.")
    tensor_count: int
    context_length: int | None = None
    general_type: str | None = Field(None, description="'model' or 'adapter'.")
    name: str | None = None
    # Present only for LoRA adapters.
    lora_alpha: float | None = None
    lora_rank: int | None = None
    # Architecture shape, used for memory estimates.
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None


class ModelManifest(BaseModel):
    name: str
    kind: ModelKind
    file: str = Field(description="File name inside the model's folder in the store.")
    sha256: str
    size: int = Field(description="File size in bytes.")
    architecture: str
    file_type: str | None = None
    tensor_count: int = 0
    context_length: int | None = None
    base: str | None = Field(None, description="For adapters: the name of the base model they fit.")
    base_sha256: str | None = None
    lora_alpha: float | None = None
    lora_rank: int | None = None
    tasks: list[str] = Field(default_factory=list, description="Tasks this adapter serves.")
    prompt_format: PromptFormat | None = Field(None, description="For base models: chat prompt format.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: str = Field("local", description="Where the file came from: bundled, a path, or hf://repo/file.")
    info: GGUFInfo | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"invalid model name {value!r}: use letters, digits, '.', '_' and '-' (at most 128)"
            )
        return value

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        # The manifest may come from a folder someone else wrote (a sync pull, a copied store).
        if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
            raise ValueError("must be a plain file name inside the model's folder, not a path")
        return value
