"""Read what the collector stored: Parquet traces and feedback, joined per trace.

The collector writes hive-partitioned Parquet (``traces/day=…/device=…/part-….parquet`` and the
same under ``feedback/``) and tags (``collector.tags``); this is the one place the training box
reads them. A trace belongs to a task when its ``task`` column names it or it is tagged for it.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from pydantic import BaseModel, Field

from slm_agent.collector.storage import TRACE_SCHEMA
from slm_agent.collector.tags import read_tags
from slm_agent.contracts.signature import template, template_signature
from slm_agent.errors import NotFoundError

_TRACE_COLUMNS = [
    "id",
    "created_at",
    "endpoint",
    "task",
    "route",
    "route_reason",
    "status",
    "error",
    "request",
    "tools",
    "params",
    "response",
    "output",
    "tool_calls",
    "adapter",
    "remote_model",
    "signature",
    "match_method",
]
# Files written before a column existed read it as null: every file is read with today's schema.
_PARTITIONS = pa.schema([pa.field("day", pa.string()), pa.field("device", pa.string())])


class CollectedFeedback(BaseModel):
    rating: str | None = None
    correction: str | None = None
    created_at: str = ""


class CollectedTrace(BaseModel):
    """One collected trace with the feedback given on it, newest feedback last."""

    id: str
    created_at: str
    device: str | None = None
    endpoint: str
    task: str | None = None
    route: str = "local"
    route_reason: str | None = None
    status: int = 200
    error: str | None = None
    input: str | None = Field(
        None, description="The text the task worked on (the last user message for chat)."
    )
    request: Any = Field(None, description="The request as stored: chat messages, or the task input.")
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] | None = None
    response: str | None = None
    output: Any = None
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="The answer's tool calls, OpenAI-shaped (arguments a JSON string)."
    )
    adapter: str | None = None
    remote_model: str | None = None
    signature: str | None = Field(None, description="Template signature the device computed, if any.")
    match_method: str | None = None
    tags: list[str] = Field(default_factory=list, description="Tasks this trace is tagged for.")
    feedback: list[CollectedFeedback] = Field(default_factory=list)

    def belongs_to(self, task: str) -> bool:
        return self.task == task or task in self.tags

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        """The chat messages of a chat request (None for task-API calls and completions)."""
        if self.endpoint == "tasks":
            return None
        found = self.request.get("messages") if isinstance(self.request, dict) else self.request
        if not isinstance(found, list) or not all(isinstance(m, dict) for m in found):
            return None
        return found

    @property
    def response_format(self) -> dict[str, Any] | None:
        found = (self.params or {}).get("response_format")
        if found is None and isinstance(self.request, dict):
            found = self.request.get("response_format")
        return found if isinstance(found, dict) else None

    def has_template(self) -> bool:
        """Whether the request has fixed parts (system prompt, tools, response format or a templated
        user lead) that make calls of one agent step recognisable; a bare question has none."""
        messages = self.messages
        if not messages:
            return False
        fixed = template(messages, self.tools, self.response_format)
        return bool(fixed["system"] or fixed["tools"] or fixed["response_format"] or fixed["user_lead"])

    def template_signature(self) -> str | None:
        """The signature stored with the trace, else computed the way the device computes it."""
        if self.signature:
            return self.signature
        messages = self.messages
        return template_signature(messages, self.tools, self.response_format) if messages else None

    @property
    def correction(self) -> str | None:
        return next((fb.correction for fb in reversed(self.feedback) if fb.correction), None)

    @property
    def rating(self) -> str | None:
        return next((fb.rating for fb in reversed(self.feedback) if fb.rating), None)


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _list(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def request_text(request: Any, endpoint: str) -> str | None:
    """The input a task call worked on, as the daemon put it in the prompt.

    The task API's input (a JSON object is dumped as the daemon dumps it), or a chat's last user
    message.
    """
    if endpoint == "tasks":
        return request if isinstance(request, str) else json.dumps(request, ensure_ascii=False)
    messages = request.get("messages") if isinstance(request, dict) else request
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: the text ones, as ChatMessage.text() joins them
                return "".join(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            return content if isinstance(content, str) else None
    return None


def _dataset(data_url: str, kind: str) -> ds.Dataset | None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(data_url)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{kind}"):
        return None
    if kind == "traces":
        schema = pa.unify_schemas([TRACE_SCHEMA, _PARTITIONS])
        partitioning = ds.partitioning(_PARTITIONS, flavor="hive")
        return ds.dataset(
            f"{root}/{kind}", filesystem=fs, format="parquet", partitioning=partitioning, schema=schema
        )
    return ds.dataset(f"{root}/{kind}", filesystem=fs, format="parquet", partitioning="hive")


def task_counts(data_url: str) -> dict[str, int]:
    """Collected traces per task, reading only the task column."""
    traces_ds = _dataset(data_url, "traces")
    if traces_ds is None:
        return {}
    table = traces_ds.to_table(columns=["id", "task"])
    tags = read_tags(data_url)
    counts: dict[str, int] = {}
    for trace_id, name in zip(table.column("id").to_pylist(), table.column("task").to_pylist(), strict=True):
        for task in dict.fromkeys([*([name] if name else []), *tags.get(trace_id, [])]):
            counts[task] = counts.get(task, 0) + 1
    return counts


def read_traces(data_url: str, task: str | None = None) -> list[CollectedTrace]:
    """Every collected trace (of one task when given: named by the trace or tagged), oldest first,
    with its feedback and tags attached."""
    traces_ds = _dataset(data_url, "traces")
    if traces_ds is None:
        raise NotFoundError(
            f"no collected traces under {data_url}: push traces from a device first (slm-agent sync push)"
        )
    columns = [c for c in _TRACE_COLUMNS if c in traces_ds.schema.names]
    if "device" in traces_ds.schema.names:
        columns.append("device")
    tags = read_tags(data_url)
    flt = None
    if task is not None:
        tagged = [trace_id for trace_id, names in tags.items() if task in names]
        flt = (ds.field("task") == task) | ds.field("id").isin(pa.array(tagged, pa.string()))
    rows = traces_ds.to_table(columns=columns, filter=flt).to_pylist()
    feedback: dict[str, list[CollectedFeedback]] = {}
    feedback_ds = _dataset(data_url, "feedback")
    if feedback_ds is not None and rows:
        ids = [r["id"] for r in rows]
        table = feedback_ds.to_table(
            columns=["trace_id", "rating", "correction", "created_at"],
            filter=ds.field("trace_id").isin(ids),
        )
        for fb in sorted(table.to_pylist(), key=lambda f: f["created_at"] or ""):
            feedback.setdefault(fb["trace_id"], []).append(
                CollectedFeedback(
                    rating=fb["rating"], correction=fb["correction"], created_at=fb["created_at"]
                )
            )
    out = []
    seen: set[str] = set()
    for row in sorted(rows, key=lambda r: (r["created_at"], r["id"])):
        if row["id"] in seen:  # a batch resent under another id: the collector keeps both files
            continue
        seen.add(row["id"])
        request = _json(row.get("request"))
        out.append(
            CollectedTrace(
                id=row["id"],
                created_at=row["created_at"],
                device=str(row["device"]) if row.get("device") is not None else None,
                endpoint=row["endpoint"],
                task=row.get("task"),
                route=row.get("route") or "local",
                route_reason=row.get("route_reason"),
                status=row.get("status") or 200,
                error=row.get("error"),
                input=request_text(request, row["endpoint"]),
                request=request,
                tools=_json(row.get("tools")),
                params=_dict(_json(row.get("params"))),
                response=row.get("response"),
                output=_json(row.get("output")),
                tool_calls=_list(_json(row.get("tool_calls"))),
                adapter=row.get("adapter"),
                remote_model=row.get("remote_model"),
                signature=row.get("signature"),
                match_method=row.get("match_method"),
                tags=tags.get(row["id"], []),
                feedback=feedback.get(row["id"], []),
            )
        )
    return out
