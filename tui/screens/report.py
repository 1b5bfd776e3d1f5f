"""Conversion report: how much of the traffic the device answers, how well, how much faster and cheaper.

The figures are runtime/report's ``ConversionReport``, the same the CLI prints and ``/v1/report``
serves; this screen only lays them out. The plot follows the highlighted row (the first is all tasks).
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Static, Tab, Tabs
from textual_plotext import PlotextPlot

from slm_agent.runtime.report import Bucket, ConversionReport, TaskConversion
from slm_agent.runtime.report.markdown import count, milliseconds
from slm_agent.tui import formatting as fmt
from slm_agent.tui.sources import SourceError

# Period tab -> --since; "all" is since the first trace, as `slm-agent report` without --since.
PERIODS = {"1d": "24 hours", "7d": "7 days", "30d": "30 days", "all": "All"}
REFRESH_S = 10.0  # a report spans hours or days; it changes slowly
ALL_ROW = "__all__"


class ReportScreen(Screen[None]):
    AUTO_FOCUS = "#report-table"
    DEFAULT_CSS = """
    #report-periods { margin: 0 1; }
    #report-headline { margin: 0 2; height: auto; text-style: bold; color: $accent; }
    #report-table { height: 1fr; margin: 0 1; }
    #report-plot { height: 1fr; margin: 0 1; border: round $primary 50%; }
    """
    BINDINGS = [
        Binding("1", "period('1d')", "24 h", tooltip="Report the last 24 hours"),
        Binding("2", "period('7d')", "7 d", tooltip="Report the last 7 days"),
        Binding("3", "period('30d')", "30 d", tooltip="Report the last 30 days"),
        Binding("4", "period('all')", "All", tooltip="Report since the first trace"),
        Binding("f5", "reload", "Refresh", tooltip="Recompute the report now"),
    ]

    def __init__(self) -> None:
        super().__init__(id="report")
        self.period = "all"
        self.report: ConversionReport | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(*(Tab(label, id=f"p-{p}") for p, label in PERIODS.items()), id="report-periods")
        yield Static("", id="report-headline")
        yield DataTable(id="report-table", cursor_type="row", zebra_stripes=True)
        yield PlotextPlot(id="report-plot")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#report-periods", Tabs).active = f"p-{self.period}"
        self.query_one(DataTable).add_columns(
            "Task", "State", "Share", "Local", "Agreement (≥ bound, pairs)", "p50 local", "p50 remote",
            "Tokens saved", "Cost saved",
        )  # fmt: skip
        self.reload()
        self._timer = self.set_interval(REFRESH_S, self.reload)

    @on(Tabs.TabActivated, "#report-periods")
    def _tab(self, event: Tabs.TabActivated) -> None:
        period = (event.tab.id or "p-all").removeprefix("p-")
        if period != self.period:
            self.period = period
            self.reload()

    def action_period(self, period: str) -> None:
        self.query_one("#report-periods", Tabs).active = f"p-{period}"

    def action_reload(self) -> None:
        self.reload()

    @work(exclusive=True, group="report")
    async def reload(self) -> None:
        source = self.app.source  # type: ignore[attr-defined]
        try:
            report = await source.report(None if self.period == "all" else self.period)
        except SourceError as exc:
            self.notify(str(exc), title="Report", severity="error", timeout=4)
            return
        self.show(report)

    def show(self, report: ConversionReport) -> None:
        self.report = report
        self.query_one("#report-headline", Static).update(report.headline)
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        table.add_row(
            "all tasks", "", "100%", fmt.pct(report.local_share), fmt.pct(report.agreement),
            milliseconds(report.local_p50_ms), milliseconds(report.remote_p50_ms),
            count(report.tokens_saved), fmt.usd(report.cost_saved_usd), key=ALL_ROW,
        )  # fmt: skip
        for row in report.tasks:
            table.add_row(*_cells(row), key=row.task or "")
        table.move_cursor(row=min(cursor, table.row_count - 1))
        self._plot_row(table.cursor_row)
        self.sub_title = (
            f"{self.app.source.label} · {report.since[:16]} → {report.until[:16]} UTC · {report.calls} calls"  # type: ignore[attr-defined]
        )

    @on(DataTable.RowHighlighted, "#report-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._plot_row(event.cursor_row)

    def _plot_row(self, index: int) -> None:
        if self.report is None:
            return
        if 1 <= index <= len(self.report.tasks):
            row = self.report.tasks[index - 1]
            self._plot(row.buckets, "(no task)" if row.task is None else row.task)
        else:
            self._plot(self.report.buckets, "all tasks")

    def _plot(self, buckets: list[Bucket], title: str) -> None:
        assert self.report is not None
        widget = self.query_one(PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.title(f"Calls answered locally by {self.report.granularity} · {title}")
        xs = list(range(len(buckets)))
        plt.plot(xs, [float(b.calls) for b in buckets], label="all calls", marker="braille")
        plt.plot(xs, [float(b.local) for b in buckets], label="local", marker="braille")
        step = max(1, len(xs) // 6)
        ticks = xs[::step]
        cut = slice(5, 16) if self.report.granularity == "hour" else slice(5, 10)
        positions: list[float] = list(ticks)  # the stub takes list[float]; ints are fine
        plt.xticks(positions, [buckets[i].start[cut].replace("T", " ") for i in ticks])
        widget.refresh()


def _cells(row: TaskConversion) -> tuple[str, ...]:
    return (
        "(no task)" if row.task is None else row.task,
        row.state,
        fmt.pct(row.share),
        fmt.pct(row.local_share),
        "–"
        if row.agreement is None
        else f"{fmt.pct(row.agreement)} (≥ {fmt.pct(row.agreement_lower)}, {row.agreed}/{row.pairs})",
        milliseconds(row.local_p50_ms),
        milliseconds(row.remote_p50_ms),
        count(row.tokens_saved),
        fmt.usd(row.cost_saved_usd),
    )
