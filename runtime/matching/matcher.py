"""Which task a chat request is: explicit name > template signature > nearest centroid.

Every chat request (local or proxied) goes through ``TaskMatcher.match`` so its trace records
the task, how it was found and how sure. An agent that never names a task is recognised by its
template (contracts/signature.py) or, failing that, by content: the cosine of its last user
message to an accepted task's centroid, above the threshold calibrated on that task's own traces
(contracts/centroids.py). A tool-calling task is never matched by content to a request that
offers no tools (its adapter could not answer it). Only tasks that carry a signature or a
centroid take part; declared tasks (the built-ins) are reached by name only.

The request path pays a hash and a dict lookup for a signature match; embedding is done only
when no signature matched and some task has a centroid, and is cached by content. A caller whose
routing cannot depend on a content match (no content-matched task answers locally yet) asks for
it ``later``: the embedding runs on the matcher's own thread while the call goes on, and the
trace writer waits for it (long since done) before the row is written.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from slm_agent.contracts.signature import request_content, template_signature
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.models.encoder import Encoder

log = logging.getLogger(__name__)

MatchMethod = Literal["explicit", "signature", "embedding"]
EventFn = Callable[[str, dict[str, Any]], None]
# (signature, task): traces recorded before the task existed are tagged by the one trace writer.
NewSignatureFn = Callable[[str, str], None]

MATCHING_EVENT = "matching"
REFRESH_EVERY_S = 1.0
CACHE_SIZE = 4096


class Match(BaseModel):
    """A request's task, as recorded in its trace (task, match_method, match_score, signature)."""

    task: str | None = None
    method: MatchMethod | None = None
    score: float | None = Field(None, description="Cosine to the centroid (embedding), else 1.0.")
    signature: str


@dataclass(frozen=True)
class _Index:
    """The registry's matchable tasks at one generation, in the shapes the hot path wants."""

    generation: int
    by_signature: dict[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    calls_tools: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


@dataclass(frozen=True)
class ContentQuery:
    """A request no name or signature matched, to match by the embedding of its content."""

    signature: str
    content: str
    has_tools: bool
    index: _Index


class TaskMatcher:
    """Matches chat requests to tasks; thread-safe, and never raises on a request.

    ``on_event(kind, data)`` hears why matching is degraded (the daemon's event bus);
    ``on_new_signature(signature, task)`` is told of each task signature the index gains,
    including those present at start, so untagged traces of it can be retro-tagged.
    """

    def __init__(
        self,
        tasks: TaskRegistry,
        encoder: Encoder | None,
        *,
        encoder_problem: str | None = None,
        on_event: EventFn | None = None,
        on_new_signature: NewSignatureFn | None = None,
        refresh_every_s: float = REFRESH_EVERY_S,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tasks = tasks
        self.encoder = encoder
        self._on_event = on_event
        self._on_new_signature = on_new_signature
        self._refresh_every_s = refresh_every_s
        self._clock = clock
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._known: set[tuple[str, str]] = set()
        self._embed_failed = False
        self._last_refresh = clock()
        self._index = _Index(generation=-1)
        self._indexed_generation = -1
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-matcher")
        if encoder is None:
            self._degraded(f"matching by signature only: {encoder_problem or 'no encoder configured'}")
        with self._refresh_lock:
            self._rebuild()

    # -- the request path ------------------------------------------------------------------------
    def match(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        response_format: Mapping[str, Any] | None,
        explicit: str | None = None,
    ) -> Match:
        found = self.by_template(messages, tools, response_format, explicit)
        return found if isinstance(found, Match) else self.by_content(found)

    def by_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        response_format: Mapping[str, Any] | None,
        explicit: str | None = None,
    ) -> Match | ContentQuery:
        """The match by name or signature, or what matching by content still has to embed."""
        signature = template_signature(messages, tools, response_format)
        if explicit:
            return Match(task=explicit, method="explicit", score=1.0, signature=signature)
        index = self._current()
        task = index.by_signature.get(signature)
        if task is not None:
            return Match(task=task, method="signature", score=1.0, signature=signature)
        if self.encoder is None or not index.names or (not tools and index.calls_tools.all()):
            return Match(signature=signature)
        content = request_content(messages)
        if not content.strip():
            return Match(signature=signature)
        return ContentQuery(signature=signature, content=content, has_tools=bool(tools), index=index)

    def by_content(self, query: ContentQuery) -> Match:
        index, unmatched = query.index, Match(signature=query.signature)
        vector = self._embedding(query.content)
        if vector is None or vector.shape[0] != index.centroids.shape[1]:
            return unmatched
        scores = index.centroids @ vector
        if not query.has_tools:  # a tool-calling task cannot answer a request that offers no tool
            scores = np.where(index.calls_tools, -np.inf, scores)
        best = int(scores.argmax())
        score = float(scores[best])
        if score < float(index.thresholds[best]):
            return unmatched
        return Match(
            task=index.names[best], method="embedding", score=round(score, 4), signature=query.signature
        )

    def later(self, query: ContentQuery) -> Future[Match]:
        """``by_content`` on the matcher's thread: one at a time, as the encoder runs on one core."""
        return self._worker.submit(self.by_content, query)

    def content_tasks(self) -> tuple[str, ...]:
        """The tasks a request can match by content (those with a centroid and a threshold)."""
        return self._current().names

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def refresh(self) -> bool:
        """Reload the registry if its files changed and reindex; True when the index moved."""
        with self._refresh_lock:
            self._last_refresh = self._clock()
            self.tasks.refresh()
            return self._rebuild()

    # -- internals -------------------------------------------------------------------------------
    def _current(self) -> _Index:
        """The index, refreshed at most once per ``refresh_every_s``; a request never waits on it."""
        due = self._clock() - self._last_refresh >= self._refresh_every_s
        # A reload done elsewhere (tasks add/remove) moves the generation without a refresh here.
        stale = self._indexed_generation != self.tasks.generation
        if (due or stale) and self._refresh_lock.acquire(blocking=False):
            try:
                if due:
                    self._last_refresh = self._clock()
                    self.tasks.refresh()
                self._rebuild()
            except Exception:  # a bad tasks dir must not fail the request that noticed it
                log.exception("refreshing the task registry failed; matching with the previous tasks")
            finally:
                self._refresh_lock.release()
        return self._index

    def _rebuild(self) -> bool:
        generation = self.tasks.generation
        if generation == self._index.generation:
            return False
        # Set first: a registry this fails on is not retried on every request, only when it changes.
        self._indexed_generation = generation
        by_signature: dict[str, str] = {}
        names: list[str] = []
        rows: list[list[float]] = []
        thresholds: list[float] = []
        calls_tools: list[bool] = []
        dim = self.encoder.dim if self.encoder is not None else None
        for task in sorted(self.tasks.list(), key=lambda t: t.name):
            if task.signature:
                if task.signature in by_signature:
                    log.warning(
                        "tasks %r and %r share signature %s; matching it to %r",
                        by_signature[task.signature],
                        task.name,
                        task.signature,
                        by_signature[task.signature],
                    )
                else:
                    by_signature[task.signature] = task.name
            if dim is None or task.centroid is None or task.match_threshold is None:
                continue  # without an encoder, or a calibrated threshold, content cannot match
            if len(task.centroid) != dim:
                log.warning(
                    "task %r: its centroid has %d dimensions but the encoder gives %d; matching it by "
                    "signature only (re-accept it with this encoder)",
                    task.name,
                    len(task.centroid),
                    dim,
                )
                continue
            names.append(task.name)
            rows.append(task.centroid)
            thresholds.append(task.match_threshold)
            calls_tools.append(task.kind == "tool_call")
        centroids = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim or 0)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        self._index = _Index(
            generation=generation,
            by_signature=by_signature,
            names=tuple(names),
            centroids=centroids,
            thresholds=np.asarray(thresholds, dtype=np.float32),
            calls_tools=np.asarray(calls_tools, dtype=bool),
        )
        self._announce(by_signature)
        return True

    def _announce(self, by_signature: dict[str, str]) -> None:
        fresh = set(by_signature.items()) - self._known
        self._known |= fresh
        if self._on_new_signature is None:
            return
        for signature, task in sorted(fresh):
            try:
                self._on_new_signature(signature, task)
            except Exception:  # retro-tagging is bookkeeping: a failure must not fail matching
                log.exception("retro-tagging traces of task %r (signature %s) failed", task, signature)

    def _embedding(self, content: str) -> np.ndarray | None:
        key = _key(content)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        assert self.encoder is not None
        try:
            vector = self.encoder.embed([content])[0]
        except Exception as exc:  # onnxruntime raises its own kinds; the request goes on unmatched
            if not self._embed_failed:
                self._embed_failed = True
                self._degraded(f"embedding a request failed, it stays unmatched: {exc}")
            return None
        self._remember({key: vector})
        return vector

    def _remember(self, rows: dict[bytes, np.ndarray]) -> None:
        with self._cache_lock:
            for key, row in rows.items():
                self._cache[key] = row
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _degraded(self, message: str) -> None:
        log.warning("%s", message)
        if self._on_event is not None:
            self._on_event(MATCHING_EVENT, {"mode": "signature", "message": message})


def _key(content: str) -> bytes:
    return hashlib.blake2b(content.encode(), digest_size=16).digest()
