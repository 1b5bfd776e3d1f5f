"""The monitor app: four screens as modes, live events fanned out to them through a signal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.signal import Signal

from slm_agent.tui.screens.dashboard import DashboardScreen
from slm_agent.tui.screens.report import ReportScreen
from slm_agent.tui.screens.runs import RunsScreen
from slm_agent.tui.screens.tasks import TasksScreen
from slm_agent.tui.screens.traces import TracesScreen
from slm_agent.tui.sources import LiveEvent, Source

log = logging.getLogger(__name__)

LIVE_GROUP = "live"  # the worker group of the event pump, which runs until the app exits


class MonitorApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "slm-agent"
    MODES = {
        "dashboard": DashboardScreen,
        "traces": TracesScreen,
        "tasks": TasksScreen,
        "runs": RunsScreen,
        "report": ReportScreen,
    }
    DEFAULT_MODE = "dashboard"
    BINDINGS = [
        Binding("d", "switch_mode('dashboard')", "Dashboard", tooltip="Rates, latency, routes, savings"),
        Binding("t", "switch_mode('traces')", "Traces", tooltip="Recent requests, filter and inspect"),
        Binding("m", "switch_mode('tasks')", "Tasks/models", tooltip="Routing policies and adapters"),
        Binding("r", "switch_mode('runs')", "Runs", tooltip="Agent runs and their steps"),
        Binding(
            "c", "switch_mode('report')", "Conversion", tooltip="Calls answered locally, agreement, savings"
        ),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: Source, *, live: bool = True) -> None:
        super().__init__()
        self.source = source
        self.live = live
        self.live_signal: Signal[LiveEvent] = Signal(self, "live")
        self.sub_title = ("read-only · " if source.read_only else "") + source.label

    def on_mount(self) -> None:
        if self.live:
            self.run_worker(self._pump_events(), name="events", group=LIVE_GROUP, exclusive=True)

    async def _pump_events(self) -> None:
        async for event in self.source.events():
            self.live_signal.publish(event)

    async def wait_for_loads(self, poll_s: float = 0.02) -> None:
        """Wait until the screens' workers are done, never the live event pump.

        ``self.workers.wait_for_complete()`` waits for the pump too, that is forever, and it
        swallows the cancellation meant to stop it; this one polls, and a timeout
        (``asyncio.wait_for``) or cancellation stops it.
        """
        while any(not w.is_finished for w in self.workers if w.group != LIVE_GROUP):
            await asyncio.sleep(poll_s)

    async def on_unmount(self) -> None:
        await self.source.close()

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, title, help_text in (
            ("dashboard", "Dashboard", "Rates, latency percentiles, routes, cost saved"),
            ("traces", "Traces", "Recent requests with filters and detail"),
            ("tasks", "Tasks and models", "Routing policies, traffic, adapters"),
            ("runs", "Agent runs", "Runs and their step spans"),
            ("report", "Conversion report", "Share answered locally, agreement, latency, savings"),
        ):
            yield SystemCommand(f"Go to {title}", help_text, lambda m=mode: self.switch_mode(m))
        for window, label in (("5m", "5 minutes"), ("1h", "1 hour"), ("24h", "24 hours")):
            yield SystemCommand(
                f"Dashboard window: {label}", f"Plot the last {label}", lambda w=window: self._window(w)
            )

    def _window(self, window: str) -> None:
        self.switch_mode("dashboard")
        self.call_after_refresh(lambda: self.screen.action_window(window))  # type: ignore[attr-defined]


def create_app(source: Source, *, live: bool = True) -> MonitorApp:
    """The one way to build the monitor, shared by the CLI and the tests."""
    return MonitorApp(source, live=live)
