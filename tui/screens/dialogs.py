"""Modal dialogs: a corrected answer for a trace, a task's routing policy."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, TextArea

from slm_agent.contracts.records import Feedback

ROUTING = ("local", "remote", "auto")


class CorrectionScreen(ModalScreen[Feedback | None]):
    """Type the answer the model should have given; it trains the next adapter."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "send", "Send", tooltip="Send the correction to the daemon"),
    ]

    def __init__(self, trace_id: str, answer: str | None) -> None:
        super().__init__(classes="dialog")
        self.trace_id = trace_id
        self.answer = answer or ""

    def compose(self) -> ComposeResult:
        with Vertical(id="correction", classes="dialog-box"):
            yield Label(f"Correct the answer of {self.trace_id}", classes="dialog-title")
            yield TextArea(self.answer, id="correction-text")
            yield Input(placeholder="comment (optional)", id="correction-comment")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Send  ^s", variant="primary", id="send")
                yield Button("Cancel  esc", id="cancel")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    @on(Button.Pressed, "#send")
    def action_send(self) -> None:
        correction = self.query_one(TextArea).text.strip()
        comment = self.query_one("#correction-comment", Input).value.strip() or None
        if not correction:
            self.notify("Type the corrected answer first.", severity="warning")
            return
        self.dismiss(Feedback(rating="bad", correction=correction, comment=comment))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class RoutingScreen(ModalScreen[str | None]):
    """Pick where a task's requests go: always local, always remote, or the router decides."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, task: str, current: str | None) -> None:
        super().__init__(classes="dialog")
        self.task_name = task
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="routing", classes="dialog-box"):
            yield Label(f"Routing policy of {self.task_name}", classes="dialog-title")
            yield OptionList(*ROUTING, id="routing-options")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = ROUTING.index(self.current) if self.current in ROUTING else 0
        options.focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(ROUTING[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)
