"""Agent runs: each run with its step spans as a tree, refreshed as new traces arrive."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Tree

from slm_agent.runtime.store.queries import RunDetail, RunSummary
from slm_agent.runtime.store.spans import Span
from slm_agent.tui import formatting as fmt
from slm_agent.tui.screens.trace_detail import TraceDetailScreen
from slm_agent.tui.sources import LiveEvent, SourceError

STATUS_MARK = {"ok": "[green]✔[/]", "error": "[red]✘[/]", "running": "[yellow]…[/]"}


def span_label(span: Span) -> str:
    mark = STATUS_MARK.get(span.status, span.status)
    step = f"{span.step}. " if span.step is not None else ""
    route = f" · {span.route}" if span.route else ""
    return f"{mark} {step}{span.kind} [b]{span.name or ''}[/b]{route} · {fmt.ms(span.duration_ms)}"


class RunsScreen(Screen[None]):
    AUTO_FOCUS = "#run-table"
    BINDINGS = [
        Binding("f5", "reload", "Refresh"),
        Binding("o", "open_trace", "Open step's trace", tooltip="Show the trace of the selected span"),
    ]

    def __init__(self) -> None:
        super().__init__(id="runs")
        self.run_rows: list[RunSummary] = []
        self.detail: RunDetail | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="runs-pane"):
            yield DataTable(id="run-table", cursor_type="row", zebra_stripes=True)
            yield Tree("run", id="span-tree")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#run-table", DataTable).add_columns("Started", "Run", "Status", "Steps", "Duration")
        self.query_one(Tree).show_root = True
        self.reload()
        self.app.live_signal.subscribe(self, self._on_live)  # type: ignore[attr-defined]
        self.set_interval(2.0, self._tick)

    def _tick(self) -> None:
        if self.is_current and self.detail is not None and self.detail.run.status == "running":
            self.reload()

    def _on_live(self, event: LiveEvent) -> None:
        if event.kind == "trace" and self.is_current:
            self.reload()

    def action_reload(self) -> None:
        self.reload()

    @work(exclusive=True, group="runs")
    async def reload(self) -> None:
        try:
            runs = await self.app.source.runs()  # type: ignore[attr-defined]
        except SourceError as exc:
            self.notify(str(exc), title="Runs", severity="error")
            return
        table = self.query_one("#run-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        self.run_rows = runs
        for r in runs:
            table.add_row(
                fmt.clock(r.started_at), r.name or r.run_id, STATUS_MARK.get(r.status, r.status),
                str(r.steps), fmt.ms(r.duration_ms), key=r.run_id,
            )  # fmt: skip
        if runs:
            table.move_cursor(row=min(cursor, len(runs) - 1))
            self.show_run(runs[table.cursor_row].run_id)

    @on(DataTable.RowHighlighted, "#run-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.show_run(str(event.row_key.value))

    @work(exclusive=True, group="run")
    async def show_run(self, run_id: str) -> None:
        try:
            detail = await self.app.source.run(run_id)  # type: ignore[attr-defined]
        except SourceError as exc:
            self.notify(str(exc), title="Runs", severity="error")
            return
        self.detail = detail
        tree: Tree[Span] = self.query_one(Tree)
        tree.clear()
        root = next(s for s in detail.spans if s.parent_id is None)
        tree.root.set_label(span_label(root))
        tree.root.data = root
        nodes = {root.id: tree.root}
        for span in detail.spans:
            if span is root:
                continue
            parent = nodes.get(span.parent_id or "", tree.root)
            nodes[span.id] = parent.add(span_label(span), data=span, expand=True)
        tree.root.expand_all()

    def action_open_trace(self) -> None:
        node = self.query_one(Tree).cursor_node
        span = node.data if node else None
        if span is None or not span.trace_id:
            self.notify("This span has no trace.", severity="warning")
            return
        self.app.push_screen(TraceDetailScreen(span.trace_id))
