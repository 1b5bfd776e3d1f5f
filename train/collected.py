"""Read what the collector stored: Parquet traces and feedback, joined per trace.

The collector writes hive-partitioned Parquet (``traces/day=…/device=…/part-….parquet`` and the
same under ``feedback/``); this is the one place the training box reads it.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.dataset as ds
from pydantic import BaseModel, Field

from slm_agent.errors import NotFoundError

_TRACE_COLUMNS = [
    "id",
    "created_at",
    "endpoint",
    "task",
    "route",
    "status",
    "error",
    "request",
    "tools",
    "response",
    "output",
    "tool_calls",
    "adapter",
    "remote_model",
]


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
    status: int = 200
    error: str | None = None
    input: str | None = Field(
        None, description="The text the task worked on (the last user message for chat)."
    )
    tools: list[dict[str, Any]] | None = None
    response: str | None = None
    output: Any = None
    adapter: str | None = None
    remote_model: str | None = None
    feedback: list[CollectedFeedback] = Field(default_factory=list)

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
    return ds.dataset(f"{root}/{kind}", filesystem=fs, format="parquet", partitioning="hive")


def task_counts(data_url: str) -> dict[str, int]:
    """Collected traces per task, reading only the task column."""
    traces_ds = _dataset(data_url, "traces")
    if traces_ds is None:
        return {}
    column = traces_ds.to_table(columns=["task"]).column("task").to_pylist()
    counts: dict[str, int] = {}
    for name in column:
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def read_traces(data_url: str, task: str | None = None) -> list[CollectedTrace]:
    """Every collected trace (of one task when given), oldest first, with its feedback attached."""
    traces_ds = _dataset(data_url, "traces")
    if traces_ds is None:
        raise NotFoundError(
            f"no collected traces under {data_url}: push traces from a device first (slm-agent sync push)"
        )
    columns = [c for c in _TRACE_COLUMNS if c in traces_ds.schema.names]
    if "device" in traces_ds.schema.names:
        columns.append("device")
    flt = (ds.field("task") == task) if task is not None else None
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
                status=row.get("status") or 200,
                error=row.get("error"),
                input=request_text(request, row["endpoint"]),
                tools=_json(row.get("tools")),
                response=row.get("response"),
                output=_json(row.get("output")),
                adapter=row.get("adapter"),
                remote_model=row.get("remote_model"),
                feedback=feedback.get(row["id"], []),
            )
        )
    return out
