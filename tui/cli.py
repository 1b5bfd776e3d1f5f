"""`slm-agent tui`: the click command; the lead registers it on the main group."""

from __future__ import annotations

from pathlib import Path

import click

from slm_agent.commands import Command
from slm_agent.runtime.store.queries import DEFAULT_PRICE_PER_MTOK
from slm_agent.tui.sources import open_source


@click.command(name="tui", cls=Command)
@click.option(
    "--url",
    envvar="SLM_AGENT_URL",
    default="http://127.0.0.1:8765",
    show_default=True,
    help="Daemon to watch.",
)
@click.option(
    "--token", envvar="SLM_AGENT_TOKEN", default=None, help="Bearer token of the daemon, if it has one."
)
@click.option(
    "--db",
    "db",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Read a trace database file instead of a daemon (read-only: no feedback or admin actions).",
)
@click.option(
    "--remote-price",
    type=float,
    default=DEFAULT_PRICE_PER_MTOK,
    show_default=True,
    help="USD per million remote tokens, for the 'cost saved' estimate.",
)
def tui(url: str, token: str | None, db: Path | None, remote_price: float) -> None:
    """Watch slm-agentd live: dashboard, traces, tasks and models, agent runs, feedback.

    \b
    Example usage:
        slm-agent tui                                 # the local daemon
        slm-agent tui --url http://10.0.0.5:8765 --token $TOKEN
        slm-agent tui --db ~/.local/share/slm-agent/traces.db   # read-only, no daemon

    \b
    Keys: d dashboard · t traces · m tasks/models · r runs · c conversion report · ctrl+p commands · q quit
    """
    # Textual loads only when the app runs, so `slm-agent tui --help` stays fast.
    from slm_agent.tui.app import create_app

    source = open_source(url=url, token=token, db=db, price_per_mtok=remote_price)
    create_app(source).run()
