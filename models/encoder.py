"""A built int8 ONNX sentence encoder, loaded to embed text: the half the device needs.

    <folder>/model.onnx        int8 weights (dynamic quantization: activations quantized at run time)
    <folder>/tokenizer.json    and the other tokenizer files
    <folder>/manifest.json     EncoderManifest: sizes, the cosine check's figures, sha256

Embedding needs only onnxruntime and tokenizers, so the device matches requests by content
without torch; building one (export, quantize, check) is the training box's job
(``slm_agent.quantize.encoder``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field

from slm_agent import locations
from slm_agent.errors import NotFoundError

if TYPE_CHECKING:
    import onnxruntime

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
DEFAULT_ENCODER = "all-minilm-l6-v2-int8"

Strategy = Literal["int8", "int8-fp32-down-proj"]


class EncoderManifest(BaseModel):
    """What an encoder folder holds and how well its int8 model matches the fp32 one."""

    name: str
    source: str = Field(description="The model it was exported from: a folder or a package.")
    dim: int = Field(description="Embedding size.")
    max_length: int = Field(description="Inputs are truncated to this many tokens.")
    pooling: Literal["mean"] = "mean"
    normalized: bool = Field(True, description="Rows are L2-normalised, so a dot product is a cosine.")
    pad_token: str = "[PAD]"
    strategy: Strategy = Field(
        "int8", description="int8 everywhere, or with down-projections kept fp32 when int8 fell short."
    )
    fp32_bytes: int
    int8_bytes: int
    cosine_min: float = Field(description="Lowest int8-vs-fp32 cosine over the check sentences.")
    cosine_mean: float = Field(description="Mean int8-vs-fp32 cosine over the check sentences.")
    check_sentences: int = 0
    sha256: str = Field(description="sha256 of model.onnx.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Embedder:
    """An ONNX encoder and its tokenizer: mean pooling over the attention mask, then L2 norm."""

    def __init__(
        self, model: Path, tokenizer: Path, max_length: int, pad_token: str, threads: int | None = None
    ) -> None:
        # Optional dependencies, imported when an encoder is actually loaded: a device without
        # them still serves, matching by signature only (runtime.matching.load_encoder says so).
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session: onnxruntime.InferenceSession = ort.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        pad_id = self.tokenizer.token_to_id(pad_token)
        # tokenizer.json may carry its own fixed padding/truncation; ours is set explicitly.
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token=pad_token)
        self.max_length = max_length

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out: np.ndarray | None = None
        # Batches of similar length waste little on padding; rows go back to their input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in idx])
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": mask,
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.input_names})[0]
            summed = (hidden * mask[..., None]).sum(axis=1)
            pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1)
            norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            if out is None:  # the output's width may be symbolic in the graph: take it from the data
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled / norms
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class Encoder(Embedder):
    """A built encoder folder; embedding needs onnxruntime and tokenizers only."""

    def __init__(self, folder: Path, *, threads: int | None = None, max_length: int | None = None) -> None:
        """``max_length`` caps the manifest's token limit: cost grows with tokens, and a caller that
        compares embeddings (matching to a centroid) must embed both sides with the same cap."""
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise NotFoundError(
                f"{self.folder} is not an encoder folder (no {MANIFEST}): build one with slm-agent quantize encoder"
            )
        self.manifest = EncoderManifest.model_validate_json(path.read_text())
        super().__init__(
            self.folder / MODEL_FILE,
            self.folder / "tokenizer.json",
            min(self.manifest.max_length, max_length or self.manifest.max_length),
            self.manifest.pad_token,
            threads,
        )

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Float32 rows, L2-normalised, in the order of ``texts``."""
        if not texts:
            return np.zeros((0, self.manifest.dim), dtype=np.float32)
        return super().embed(list(texts), batch_size)


def default_encoder_dir(root: Path | None = None) -> Path:
    """Where the default encoder lives: ``root`` (default the data dir's encoders/) / its name."""
    return (root or locations.data_dir() / "encoders") / DEFAULT_ENCODER
