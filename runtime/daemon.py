"""``slm-agentd``: start the daemon on the configured (by default the bundled) model."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import click
import uvicorn
from pydantic import BaseModel, ValidationError

from slm_agent.errors import SlmAgentError
from slm_agent.models import BUNDLED_NAME, ModelStore, ensure_bundled
from slm_agent.permissions import restrict_umask
from slm_agent.progress import rich_progress
from slm_agent.runtime.config import Settings, load_settings
from slm_agent.runtime.http.app import create_app
from slm_agent.runtime.http.services import resolve_base
from slm_agent.runtime.store.retention import RetentionWorker

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("slm_agent.daemon")


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per top-level setting, its help taken from the field's description.

    Nested sections (``remote``, ``sync``, ``traces``) are set in the TOML file or with
    SLM_AGENT_REMOTE__*, SLM_AGENT_SYNC__* and SLM_AGENT_TRACES__* variables.
    """
    for name, field in reversed(Settings.model_fields.items()):
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if name == "adapters":
            option = click.option("--adapter", "adapters", multiple=True, help=help_text)
        elif get_origin(annotation) is Literal:
            option = click.option(flag, name, type=click.Choice(get_args(annotation)), help=help_text)
        else:
            kinds = {a for a in (annotation, *get_args(annotation)) if a in (int, float, Path)}
            option = click.option(flag, name, type=kinds.pop() if kinds else str, help=help_text)
        command = option(command)
    return command


@click.command(
    epilog="""\b
Example usage:
  slm-agentd                                  # bundled model on 127.0.0.1:8765
  slm-agentd --port 9000 --n-ctx 8192
  SLM_AGENT_TOKEN=s3cret slm-agentd --host 0.0.0.0
  curl localhost:8765/v1/models""",
)
@settings_options
def main(**flags: Any) -> None:
    """Serve agent subtasks on a local GGUF model: OpenAI-compatible API, task API, traces."""
    # Before anything is written: traces, their journals, exports and sync batches hold prompts.
    restrict_umask()
    flags["adapters"] = list(flags["adapters"]) or None
    try:
        settings = load_settings(**flags)
    except (ValidationError, ValueError) as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        store = ModelStore(settings.store_dir)
        if settings.model == BUNDLED_NAME and not store.has(BUNDLED_NAME):
            with rich_progress("assembling bundled model") as progress:
                ensure_bundled(store, on_progress=progress)
        # Fail here, with a one-line message, rather than inside the server's startup.
        resolve_base(settings, store)
        serve(settings)
    except SlmAgentError as exc:
        raise click.ClickException(exc.message) from exc


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        access_log=settings.log_level == "debug",
        lifespan="on",
    )
    log.info("slm-agentd listening on http://%s:%d", settings.host, settings.port)
    retention = _start_retention(settings, app)
    try:
        _Server(config, app).run()
    finally:
        if retention:
            retention.stop()


def _start_retention(settings: Settings, app: FastAPI) -> RetentionWorker | None:
    """The automatic prune, when a retention period or size limit is set (off by default)."""
    if not (settings.traces.retention_days or settings.traces.max_db_mb):
        return None

    def busy() -> bool:
        services = getattr(app.state, "services", None)
        return services is None or services.engine.serving()

    worker = RetentionWorker(settings.traces, settings.sync, settings.db_path, busy=busy)
    worker.start()
    return worker


class _Server(uvicorn.Server):
    """Ends the live event streams on a signal: they never finish by themselves, and uvicorn waits
    for open responses before it runs the lifespan shutdown that would close them."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app  # config.app is typed as any ASGI app or import string; this one has state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(self._app.state, "services", None)
        if services is not None:
            services.events.close()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
