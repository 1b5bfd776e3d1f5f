"""One trace in full: messages, tools, answer, escalation attempts, redactions, timings, feedback."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from slm_agent.contracts.records import Feedback
from slm_agent.runtime.store.queries import TraceDetail
from slm_agent.tui import formatting as fmt
from slm_agent.tui.screens.dialogs import CorrectionScreen
from slm_agent.tui.sources import ReadOnlyError, SourceError


def _json(value: Any) -> str:
    return escape(json.dumps(value, indent=2, ensure_ascii=False)) if value is not None else "–"


def _messages(request: Any) -> str:
    if isinstance(request, dict) and isinstance(request.get("messages"), list):
        lines = []
        for m in request["messages"]:
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            lines.append(f"[b]{escape(str(m.get('role', '?')))}[/b]: {escape(text or '')}")
        return "\n".join(lines)
    return _json(request)


def sections(detail: TraceDetail) -> list[tuple[str, str]]:
    """The detail view as (title, rich text) pairs; kept apart from widgets so tests read it."""
    t = detail.trace
    timing = (
        f"queue {fmt.ms(t.queue_ms)} · first token {fmt.ms(t.ttft_ms)} · total {fmt.ms(t.latency_ms)}"
        f" · {fmt.num(t.tokens_per_s)} tok/s · prompt {t.prompt_tokens or 0} (cached {t.cached_tokens or 0})"
        f" · completion {t.completion_tokens or 0}"
    )
    summary = (
        f"{t.id} · seq {t.seq} · {fmt.clock(t.created_at)} · {t.endpoint}\n"
        f"task [b]{escape(t.task or '–')}[/b] · route [b]{t.route}[/b] ({escape(t.route_reason or '–')})"
        f" · model {escape(t.model or '–')} · adapter {escape(t.adapter or '–')}"
        f" · status {t.status}{' · ' + escape(t.error) if t.error else ''}"
    )
    out = [("Trace", summary), ("Timings", timing), ("Messages", _messages(t.request))]
    if t.tools:
        out.append(("Tools", _json(t.tools)))
    answer = escape(t.response or "") if t.output is None else _json(t.output)
    if t.tool_calls:
        answer += "\n" + _json(t.tool_calls)
    out.append(("Response", answer or "–"))
    if t.attempts:
        remote = (
            f"remote {escape(t.remote_model or '–')} in {fmt.ms(t.remote_latency_ms)}, {fmt.usd(t.cost_usd)}"
        )
        out.append(("Attempts (escalated)", remote + "\n" + _json(t.attempts)))
    if t.redactions:
        out.append(("Redactions", ", ".join(f"{k}: {v}" for k, v in t.redactions.items())))
    if detail.feedback:
        lines = [
            f"{fmt.clock(f.created_at)} {f.rating or '–'}"
            + (f" · correction: {escape(f.correction)}" if f.correction else "")
            + (f" · {escape(f.comment)}" if f.comment else "")
            for f in detail.feedback
        ]
        out.append(("Feedback", "\n".join(lines)))
    else:
        out.append(("Feedback", "none yet: g good, b bad, c correct the answer"))
    return out


class TraceDetailScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("g", "rate('good')", "Good", tooltip="Mark this answer good"),
        Binding("b", "rate('bad')", "Bad", tooltip="Mark this answer bad"),
        Binding("c", "correct", "Correct", tooltip="Type the answer it should have given"),
    ]

    def __init__(self, trace_id: str) -> None:
        super().__init__()
        self.trace_id = trace_id
        self.detail: TraceDetail | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="trace-detail")
        yield Footer()

    def on_mount(self) -> None:
        if self.app.source.read_only:  # type: ignore[attr-defined]
            self.sub_title = "read-only: feedback needs the daemon (--url)"
        self.load()

    @work(exclusive=True, group="detail")
    async def load(self) -> None:
        try:
            self.detail = await self.app.source.trace(self.trace_id)  # type: ignore[attr-defined]
        except SourceError as exc:
            self.notify(str(exc), severity="error")
            return
        body = self.query_one("#trace-detail", VerticalScroll)
        await body.remove_children()
        for title, text in sections(self.detail):
            await body.mount(Static(text, classes="section", markup=True))
            body.children[-1].border_title = title

    def action_rate(self, rating: str) -> None:
        self.send(Feedback(rating=rating))  # type: ignore[arg-type]

    def action_correct(self) -> None:
        if self.app.source.read_only:  # type: ignore[attr-defined]
            self.notify(str(ReadOnlyError("Feedback")), title="Read-only", severity="warning")
            return
        answer = self.detail.trace.response if self.detail else None
        self.app.push_screen(CorrectionScreen(self.trace_id, answer), self._corrected)

    def _corrected(self, feedback: Feedback | None) -> None:
        if feedback is not None:
            self.send(feedback)

    @work(group="feedback")
    async def send(self, feedback: Feedback) -> None:
        try:
            await self.app.source.send_feedback(self.trace_id, feedback)  # type: ignore[attr-defined]
        except ReadOnlyError as exc:
            self.notify(str(exc), title="Read-only", severity="warning")
            return
        except SourceError as exc:
            self.notify(str(exc), title="Feedback", severity="error")
            return
        self.notify(f"Feedback sent: {feedback.rating or 'correction'}", title="Feedback")
        self.load()
