"""A dashboard tile: a metric's current value over a sparkline of its recent buckets."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline, Static


class MetricCard(Vertical):
    """Title, big value, and a sparkline; ``update`` swaps all three at once."""

    DEFAULT_CLASSES = "metric"

    def __init__(self, title: str, *, id: str, tooltip: str | None = None) -> None:
        super().__init__(id=id)
        self._title = title
        self._latest: tuple[str, list[float], bool] | None = None
        if tooltip:
            self.tooltip = tooltip

    def compose(self) -> ComposeResult:
        yield Label(self._title, classes="metric-title")
        yield Static("–", classes="metric-value")
        yield Sparkline([], classes="metric-spark")

    def update(self, value: str, data: list[float], *, alert: bool = False) -> None:
        # A refresh can land before the card has composed its children (a screen being mounted):
        # keep the figures and show them once the children exist.
        self._latest = (value, data, alert)
        self._show()

    def on_mount(self) -> None:
        self.call_after_refresh(self._show)

    def _show(self) -> None:
        if self._latest is None or not self.query(".metric-value"):
            return
        value, data, alert = self._latest
        self.query_one(".metric-value", Static).update(value)
        self.query_one(Sparkline).data = data
        self.set_class(alert, "alert")
