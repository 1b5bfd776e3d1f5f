"""Traces: the newest requests, filtered, paged from SQLite by seq as the cursor moves down."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Checkbox, DataTable, Footer, Header, Input, Select, Static

from slm_agent.runtime.store.queries import TraceFilter, TraceSummary
from slm_agent.tui import formatting as fmt
from slm_agent.tui.screens.trace_detail import TraceDetailScreen
from slm_agent.tui.sources import LiveEvent, SourceError

PAGE = 100
COLUMNS = ("Time", "Task", "Route", "Model / adapter", "Latency", "Tokens", "Status")


class TracesScreen(Screen[None]):
    AUTO_FOCUS = "#trace-table"
    BINDINGS = [
        Binding("slash", "focus_search", "Search", tooltip="Search ids, tasks, prompts and answers"),
        Binding("e", "toggle_errors", "Errors only", tooltip="Show only failed requests"),
        Binding("escape", "clear_filters", "Clear", tooltip="Clear every filter"),
        Binding("enter", "open", "Open", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="traces")
        self.filter = TraceFilter(limit=PAGE)
        self.rows: list[TraceSummary] = []
        self.next_before: int | None = None
        self._search_timer: Timer | None = None
        self._live_pending = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="trace-filters"):
            yield Input(placeholder="search (/)", id="q")
            yield Select[str]([], prompt="any task", id="task")
            yield Select[str]([("local", "local"), ("remote", "remote")], prompt="any route", id="route")
            yield Checkbox("errors only", id="errors")
        yield DataTable(id="trace-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="trace-status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns(*COLUMNS)
        self.load_tasks()
        self.load()
        self.app.live_signal.subscribe(self, self._on_live)  # type: ignore[attr-defined]

    @work(group="trace-tasks")
    async def load_tasks(self) -> None:
        try:
            tasks = await self.app.source.tasks()  # type: ignore[attr-defined]
        except SourceError:
            return
        self.query_one("#task", Select).set_options((t.name, t.name) for t in tasks)

    # -- filters -------------------------------------------------------------------------------------
    def apply(self, **changes: object) -> None:
        self.filter = self.filter.model_copy(update=changes)
        self.load()

    @on(Input.Changed, "#q")
    def _search_changed(self, event: Input.Changed) -> None:
        # Debounced: one query once typing pauses, not one per key.
        if self._search_timer is not None:
            self._search_timer.stop()
        value = event.value.strip() or None
        self._search_timer = self.set_timer(0.25, lambda: self.apply(q=value))

    @on(Input.Submitted, "#q")
    def _search_submitted(self, event: Input.Submitted) -> None:
        if self._search_timer is not None:
            self._search_timer.stop()
        self.apply(q=event.value.strip() or None)
        self.query_one(DataTable).focus()

    @on(Select.Changed, "#task")
    def _task_changed(self, event: Select.Changed) -> None:
        self.apply(task=None if event.value is Select.BLANK else event.value)

    @on(Select.Changed, "#route")
    def _route_changed(self, event: Select.Changed) -> None:
        self.apply(route=None if event.value is Select.BLANK else event.value)

    @on(Checkbox.Changed, "#errors")
    def _errors_changed(self, event: Checkbox.Changed) -> None:
        self.apply(errors=event.value)

    def action_focus_search(self) -> None:
        self.query_one("#q", Input).focus()

    def action_toggle_errors(self) -> None:
        box = self.query_one("#errors", Checkbox)
        box.value = not box.value

    def action_clear_filters(self) -> None:
        self.query_one("#q", Input).value = ""
        self.query_one("#task", Select).clear()
        self.query_one("#route", Select).clear()
        self.query_one("#errors", Checkbox).value = False
        self.filter = TraceFilter(limit=PAGE)
        self.load()

    # -- paging --------------------------------------------------------------------------------------
    @work(exclusive=True, group="traces")
    async def load(self, more: bool = False) -> None:
        f = self.filter.model_copy(update={"before_seq": self.next_before if more else None})
        try:
            page = await self.app.source.traces(f)  # type: ignore[attr-defined]
        except SourceError as exc:
            self.notify(str(exc), title="Traces", severity="error")
            return
        table = self.query_one(DataTable)
        if not more:
            table.clear()
            self.rows = []
        for item in page.items:
            table.add_row(*fmt.trace_row(item), key=item.id)
        self.rows.extend(page.items)
        self.next_before = page.next_before_seq
        tail = "↓ for older" if self.next_before else "end of traces"
        self.query_one("#trace-status", Static).update(f"{len(self.rows)} shown · {tail}")

    @on(DataTable.RowHighlighted, "#trace-table")
    def _near_end(self, event: DataTable.RowHighlighted) -> None:
        if self.next_before is not None and event.cursor_row >= len(self.rows) - 10:
            self.load(more=True)

    @on(DataTable.RowSelected, "#trace-table")
    def _selected(self, event: DataTable.RowSelected) -> None:
        self.open_trace(str(event.row_key.value))

    def action_open(self) -> None:
        table = self.query_one(DataTable)
        if self.rows:
            self.open_trace(self.rows[table.cursor_row].id)

    def open_trace(self, trace_id: str) -> None:
        self.app.push_screen(TraceDetailScreen(trace_id))

    # -- live ----------------------------------------------------------------------------------------
    def _on_live(self, event: LiveEvent) -> None:
        """New traces show up when the user is looking at the top of the list; at most one reload a second."""
        if event.kind != "trace" or self._live_pending or not self.is_current:
            return
        if self.query_one(DataTable).cursor_row > 0:
            return
        self._live_pending = True

        def reload() -> None:
            self._live_pending = False
            self.load()

        self.set_timer(1.0, reload)
