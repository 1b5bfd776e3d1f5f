"""Tasks and models: each task's adapter, routing and traffic; the loaded base model and adapters."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label

from slm_agent.tui import formatting as fmt
from slm_agent.tui.screens.dialogs import RoutingScreen
from slm_agent.tui.sources import ModelInfo, ReadOnlyError, SourceError

TRAFFIC_WINDOW = "24h"


class TasksScreen(Screen[None]):
    AUTO_FOCUS = "#task-table"
    BINDINGS = [
        Binding("p", "routing", "Routing policy", tooltip="Change the selected task's routing (daemon only)"),
        Binding("l", "load_adapter", "Load adapter", tooltip="Load the selected adapter (daemon only)"),
        Binding("u", "unload_adapter", "Unload adapter", tooltip="Unload the selected adapter (daemon only)"),
        Binding("f5", "reload", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__(id="tasks")
        self.task_rows: list[fmt.TaskRow] = []
        self.model_rows: list[ModelInfo] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="tasks-pane"):
            yield Label(f"Tasks · traffic over {TRAFFIC_WINDOW}", classes="panel-title")
            yield DataTable(id="task-table", cursor_type="row", zebra_stripes=True)
            yield Label("Models", classes="panel-title")
            yield DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#task-table", DataTable).add_columns(
            "Task", "Adapter", "Routing", "Requests", "Local success", "Escalated", "Description"
        )
        self.query_one("#model-table", DataTable).add_columns("Model", "Kind", "Loaded")
        if self.app.source.read_only:  # type: ignore[attr-defined]
            self.sub_title = "read-only: routing and adapters need the daemon (--url)"
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    @work(exclusive=True, group="tasks")
    async def reload(self) -> None:
        source = self.app.source  # type: ignore[attr-defined]
        try:
            tasks, stats, models = (
                await source.tasks(),
                await source.stats(TRAFFIC_WINDOW),
                await source.models(),
            )
        except SourceError as exc:
            self.notify(str(exc), title="Tasks", severity="error")
            return
        self.task_rows = fmt.task_rows(tasks, stats)
        self.model_rows = models
        table = self.query_one("#task-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for r in self.task_rows:
            table.add_row(
                r.name,
                r.adapter or "–",
                r.routing or "?",
                str(r.requests),
                fmt.pct(r.local_success),
                fmt.pct(r.escalation),
                r.description or "",
                key=r.name,
            )
        table.move_cursor(row=min(cursor, max(0, len(self.task_rows) - 1)))
        mtable = self.query_one("#model-table", DataTable)
        mcursor = mtable.cursor_row
        mtable.clear()
        for m in models:
            mtable.add_row(m.id, m.kind, "●" if m.loaded else "○", key=m.id)
        mtable.move_cursor(row=min(mcursor, max(0, len(models) - 1)))

    def _refuse_read_only(self, action: str) -> bool:
        if self.app.source.read_only:  # type: ignore[attr-defined]
            self.notify(str(ReadOnlyError(action)), title="Read-only", severity="warning")
            return True
        return False

    def action_routing(self) -> None:
        if self._refuse_read_only("Changing a routing policy") or not self.task_rows:
            return
        row = self.task_rows[self.query_one("#task-table", DataTable).cursor_row]

        def chosen(routing: str | None) -> None:
            if routing is not None:
                self.act(f"{row.name} now routes {routing}", "set_routing", row.name, routing)

        self.app.push_screen(RoutingScreen(row.name, row.routing), chosen)

    def _selected_adapter(self) -> ModelInfo | None:
        if not self.model_rows:
            return None
        model = self.model_rows[self.query_one("#model-table", DataTable).cursor_row]
        if model.kind != "adapter":
            self.notify(f"{model.id} is a {model.kind}, not an adapter.", severity="warning")
            return None
        return model

    def action_load_adapter(self) -> None:
        if not self._refuse_read_only("Loading an adapter") and (m := self._selected_adapter()):
            self.act(f"loaded {m.id}", "load_adapter", m.id)

    def action_unload_adapter(self) -> None:
        if not self._refuse_read_only("Unloading an adapter") and (m := self._selected_adapter()):
            self.act(f"unloaded {m.id}", "unload_adapter", m.id)

    @work(group="task-actions")
    async def act(self, done: str, method: str, *args: str) -> None:
        try:
            await getattr(self.app.source, method)(*args)  # type: ignore[attr-defined]
        except (SourceError, ReadOnlyError) as exc:
            self.notify(str(exc), title="Tasks", severity="error")
            return
        self.notify(done, title="Tasks")
        self.reload()
