"""Dashboard: is the daemon busy, fast, and is answering locally paying off."""

from __future__ import annotations

from collections import deque

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, Static, Tab, Tabs
from textual_plotext import PlotextPlot

from slm_agent.runtime.store.queries import Stats
from slm_agent.tui import formatting as fmt
from slm_agent.tui.sources import SourceError
from slm_agent.tui.widgets.metric import MetricCard

# Refresh each window about as often as its buckets change: 1 s for 5 min keeps the CPU cost flat.
REFRESH_S = {"5m": 1.0, "1h": 5.0, "24h": 30.0}
WINDOW_LABELS = {"5m": "5 min", "1h": "1 hour", "24h": "24 hours"}


class DashboardScreen(Screen[None]):
    BINDINGS = [
        Binding("1", "window('5m')", "5 min", tooltip="Show the last 5 minutes"),
        Binding("2", "window('1h')", "1 h", tooltip="Show the last hour"),
        Binding("3", "window('24h')", "24 h", tooltip="Show the last 24 hours"),
        Binding("f5", "refresh", "Refresh", tooltip="Reload the statistics now"),
    ]

    def __init__(self) -> None:
        super().__init__(id="dashboard")
        self.window = "5m"
        self.stats: Stats | None = None
        self.queue_history: deque[float] = deque(maxlen=60)
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(*(Tab(label, id=f"w-{w}") for w, label in WINDOW_LABELS.items()), id="windows")
        with Grid(id="metrics"):
            yield MetricCard("Requests/s", id="m-rps", tooltip="Requests per second, all routes")
            yield MetricCard("Tokens/s", id="m-tps", tooltip="Generated tokens per second")
            yield MetricCard("Latency p50", id="m-p50", tooltip="Median end-to-end latency")
            yield MetricCard("Latency p95", id="m-p95", tooltip="95th percentile latency")
            yield MetricCard("Queue depth", id="m-queue", tooltip="Requests waiting for the engine")
            yield MetricCard("Answered locally", id="m-local", tooltip="Share of requests not escalated")
            yield MetricCard("Cost saved", id="m-saved", tooltip="Local tokens priced as remote tokens")
            yield MetricCard("Errors", id="m-errors", tooltip="Responses with status ≥ 400")
        with Horizontal(id="dash-bottom"):
            yield PlotextPlot(id="latency-plot")
            with Vertical(id="routes-panel"):
                yield Static("Routes", classes="panel-title")
                yield Static("", id="routes")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PlotextPlot).plt.title("Latency p50 / p95 (ms)")
        self.refresh_stats()
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_interval(REFRESH_S[self.window], self.refresh_stats)

    @on(Tabs.TabActivated, "#windows")
    def _tab(self, event: Tabs.TabActivated) -> None:
        window = (event.tab.id or "w-5m").removeprefix("w-")
        if window != self.window:
            self.window = window
            self.refresh_stats()
            self._schedule()

    def action_window(self, window: str) -> None:
        self.query_one(Tabs).active = f"w-{window}"

    def action_refresh(self) -> None:
        self.refresh_stats()

    @work(exclusive=True, group="stats")
    async def refresh_stats(self) -> None:
        source = self.app.source  # type: ignore[attr-defined]
        try:
            stats = await source.stats(self.window)
            health = await source.health()
        except SourceError as exc:
            self.notify(str(exc), title="Statistics", severity="error", timeout=4)
            return
        if health is not None and health.queue_depth is not None:
            self.queue_history.append(float(health.queue_depth))
        self.show(stats, None if health is None else health.queue_depth)

    def show(self, stats: Stats, queue_depth: int | None) -> None:
        self.stats = stats
        card = self.query_one
        card("#m-rps", MetricCard).update(
            fmt.num(stats.requests_per_s, 2), fmt.series(stats, "requests_per_s")
        )
        card("#m-tps", MetricCard).update(fmt.num(stats.tokens_per_s, 1), fmt.series(stats, "tokens_per_s"))
        card("#m-p50", MetricCard).update(fmt.ms(stats.latency_ms_p50), fmt.series(stats, "latency_p50"))
        card("#m-p95", MetricCard).update(fmt.ms(stats.latency_ms_p95), fmt.series(stats, "latency_p95"))
        queue = "n/a (db)" if self.app.source.read_only else fmt.num(queue_depth)  # type: ignore[attr-defined]
        card("#m-queue", MetricCard).update(queue, list(self.queue_history))
        card("#m-local", MetricCard).update(fmt.pct(stats.local_share), fmt.series(stats, "local_share"))
        saved = f"{fmt.usd(stats.cost_saved_usd)} (spent {fmt.usd(stats.remote_cost_usd)})"
        card("#m-saved", MetricCard).update(saved, fmt.series(stats, "cost_saved"))
        card("#m-errors", MetricCard).update(
            f"{stats.errors} / {stats.requests}", fmt.series(stats, "errors"), alert=stats.errors > 0
        )
        self._plot(stats)
        lines = [
            f"{fmt.route_label(r.route, r.reason)}  [b]{fmt.pct(r.share)}[/b] ({r.count})\n{fmt.bar(r.share, 30)}"
            for r in stats.routes
        ]
        self.query_one("#routes", Static).update("\n".join(lines) or "no requests in this window")
        self.sub_title = (
            f"{self.app.source.label} · last {WINDOW_LABELS[stats.window]} · {stats.requests} requests"  # type: ignore[attr-defined]
        )

    def _plot(self, stats: Stats) -> None:
        widget = self.query_one(PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        xs = list(range(len(stats.buckets)))
        plt.plot(xs, fmt.series(stats, "latency_p50"), label="p50", marker="braille")
        plt.plot(xs, fmt.series(stats, "latency_p95"), label="p95", marker="braille")
        step = max(1, len(xs) // 4)
        ticks = xs[::step]
        positions: list[float] = list(ticks)  # the stub takes list[float]; ints are fine
        plt.xticks(positions, [fmt.clock(stats.buckets[i].start)[6:] for i in ticks])
        widget.refresh()
