"""Answering an embeddings request: the local encoder for the ids it answers to, batched off the
event loop; any other id a remote provider serves goes there unchanged, as chat's proxied ids do.

Embedding calls write no trace (they carry no answer worth reviewing or training on); they are
counted in ``/metrics`` by route, status and inputs.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from slm_agent.contracts.api import ModelCard
from slm_agent.contracts.embeddings import (
    MAX_INPUTS,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from slm_agent.errors import BadRequestError, NotFoundError, SlmAgentError, UnavailableError
from slm_agent.models.encoder import Encoder
from slm_agent.runtime.config import Settings
from slm_agent.runtime.matching.loader import load_encoder
from slm_agent.runtime.remote.client import RemoteClient

# BERT's position table: the manifest's own max_length (256 for MiniLM) is the real cap, but
# load_encoder defaults to matching's much shorter one.
_POSITIONS = 512


class EmbeddingService:
    def __init__(
        self,
        model_id: str,
        encoder: Encoder | None,
        encoder_problem: str | None,
        remote: RemoteClient | None,
        registry: CollectorRegistry,
        *,
        batch_size: int = 32,
    ) -> None:
        self.model_id = model_id
        self.encoder = encoder
        self.encoder_problem = encoder_problem
        self.remote = remote
        self.batch_size = batch_size
        # The manifest's name answers too, so a client can name the exact build it expects.
        self.local_ids = {model_id} | ({encoder.manifest.name} if encoder else set())
        self.requests = Counter(
            "slm_embedding_requests",
            "Embedding requests by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.inputs = Counter(
            "slm_embedding_inputs", "Texts embedded, by route.", ["route"], registry=registry
        )
        self.latency = Histogram(
            "slm_embedding_latency_seconds",
            "Embedding request latency.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

    def model_cards(self) -> list[ModelCard]:
        if self.encoder is None:
            return []
        return [
            ModelCard(
                id=self.model_id,
                kind="embedding",
                description=f"int8 ONNX sentence encoder {self.encoder.manifest.name} "
                f"({self.encoder.dim} dims, {self.encoder.max_length} tokens)",
            )
        ]

    async def create(self, req: EmbeddingRequest) -> dict[str, Any]:
        route = "local" if req.model in self.local_ids else "remote"
        started = time.perf_counter()
        status = 200
        try:
            return await (self._local(req) if route == "local" else self._remote(req))
        except SlmAgentError as exc:
            status = exc.status_code
            raise
        finally:
            self.requests.labels(route, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)

    async def _local(self, req: EmbeddingRequest) -> dict[str, Any]:
        if self.encoder is None:
            raise UnavailableError(
                f"the local encoder is not loaded: {self.encoder_problem}", code="encoder_unavailable"
            )
        encoder = self.encoder
        texts = req.texts()
        if texts is None:
            raise BadRequestError(
                f"{req.model} takes text, not token arrays: its tokenizer is not OpenAI's", param="input"
            )
        if not texts:
            raise BadRequestError("input is empty: send a text or a list of texts", param="input")
        if len(texts) > MAX_INPUTS:
            raise BadRequestError(
                f"{len(texts)} inputs in one request; send at most {MAX_INPUTS}", param="input"
            )
        if req.dimensions is not None and req.dimensions != encoder.dim:
            raise BadRequestError(
                f"{req.model} embeds in {encoder.dim} dimensions only, not {req.dimensions}",
                param="dimensions",
            )
        vectors, tokens = await asyncio.to_thread(self.embed, texts)
        self.inputs.labels("local").inc(len(texts))
        return EmbeddingList(
            data=[
                Embedding(index=i, embedding=encode(row, req.encoding_format))
                for i, row in enumerate(vectors)
            ],
            model=req.model,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        ).model_dump()

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Rows in input order, and the tokens the encoder read (after truncation), in one pass
        of onnxruntime per ``batch_size`` texts. Blocking: call it off the event loop."""
        assert self.encoder is not None
        tokens = sum(sum(e.attention_mask) for e in self.encoder.tokenizer.encode_batch(texts))
        return self.encoder.embed(texts, batch_size=self.batch_size), tokens

    async def _remote(self, req: EmbeddingRequest) -> dict[str, Any]:
        if self.remote is None or not any(p.serves(req.model) for p in self.remote.settings.providers):
            where = (
                "no remote provider is configured" if self.remote is None else "no remote provider serves it"
            )
            raise NotFoundError(
                f"embedding model {req.model!r} is not served here ({where}): use {self.model_id!r}, "
                "the device's encoder, or name the model in a provider's models under [remote]",
                param="model",
            )
        result = await self.remote.aembed(req.model_dump(exclude_unset=True))
        self.inputs.labels("remote").inc(len(req.input) if isinstance(req.input, list) else 1)
        return result.response


def build_embeddings(
    settings: Settings, remote: RemoteClient | None, registry: CollectorRegistry
) -> EmbeddingService:
    """A second load of the matching encoder: matching embeds 32 tokens on one thread, while an
    embeddings client expects whole passages, on threads of its own."""
    encoder, problem = load_encoder(
        settings.encoder_dir, threads=settings.embedding_threads, max_tokens=_POSITIONS
    )
    return EmbeddingService(
        settings.embedding_model, encoder, problem, remote, registry, batch_size=settings.embedding_batch_size
    )


def encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    """A row as OpenAI sends it: floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in row.tolist()]
