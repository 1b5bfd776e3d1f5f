"""``slm-agent collector``: run the training box's trace collector and manage its devices."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from slm_agent.collector.catalogue import Catalogue
from slm_agent.collector.ingest import Collector
from slm_agent.collector.publish import publish_adapter
from slm_agent.collector.settings import CollectorSettings
from slm_agent.collector.storage import TraceStorage
from slm_agent.commands import CommandGroup, json_option, print_json


def _settings(**overrides: Any) -> CollectorSettings:
    return CollectorSettings(**{k: v for k, v in overrides.items() if v is not None})


_data = click.option("--data", help=CollectorSettings.model_fields["data"].description)
_catalogue = click.option(
    "--catalogue",
    type=click.Path(path_type=Path),
    help=CollectorSettings.model_fields["catalogue"].description,
)


@click.group(cls=CommandGroup)
def collector() -> None:
    """Collect device traces into Parquet and serve published adapters (training box)."""


@collector.command()
@_data
@_catalogue
@click.option("--publish-dir", type=click.Path(path_type=Path), help="Folder of published adapters.")
@click.option("--host", help="Address to bind.")
@click.option("--port", type=int, help="TCP port.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(**overrides: Any) -> None:
    """Accept trace batches from devices over HTTP.

    Example usage:

    \b
        slm-agent collector serve --data /srv/traces --port 8780
        slm-agent collector serve --data s3://bucket/slm-traces --host 0.0.0.0
    """
    # The web server stack (FastAPI, uvicorn) loads only to serve: the other commands do without it.
    import uvicorn

    from slm_agent.collector.app import create_app

    settings = _settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


@collector.command()
@click.argument("device_id")
@click.option("--rotate", is_flag=True, help="Replace the token of a device that is already registered.")
@_catalogue
def register(device_id: str, rotate: bool, catalogue: Path | None) -> None:
    """Register a device and print its bearer token (shown once, stored hashed).

    Example usage:

    \b
        slm-agent collector register alice-laptop
        # on the device:
        export SLM_AGENT_SYNC_TOKEN=slmdev_...   # and set [sync] device_id = "alice-laptop"
    """
    cat = Catalogue(_settings(catalogue=catalogue).catalogue)
    try:
        token = cat.register(device_id, rotate=rotate)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        cat.close()
    click.echo(token)


@collector.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--keep", is_flag=True, help="Leave imported files in place instead of moving them to imported/."
)
@_data
@_catalogue
def import_(folder: Path, keep: bool, data: str | None, catalogue: Path | None) -> None:
    """Import batch files that devices wrote to a folder (`slm-agent sync push --to DIR`).

    Example usage:

    \b
        slm-agent collector import /mnt/usb/slm-sync
    """
    collector_ = _open(data, catalogue)
    try:
        result = collector_.import_dir(folder, keep=keep)
    finally:
        collector_.catalogue.close()
    click.echo(
        f"imported {result.batches} batches ({result.traces} new rows, {result.duplicates} already stored), "
        f"rejected {len(result.rejected)}"
    )
    for name, why in result.rejected.items():
        click.echo(f"  rejected {name}: {why}", err=True)


@collector.command()
@_catalogue
@json_option(help="Print JSON.")
def devices(catalogue: Path | None, as_json: bool) -> None:
    """List registered devices and what each has sent.

    Example usage:

    \b
        slm-agent collector devices
        slm-agent collector devices --json
    """
    cat = Catalogue(_settings(catalogue=catalogue).catalogue)
    rows = cat.devices()
    cat.close()
    if as_json:
        print_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r.id:24} traces={r.traces:<8} feedback={r.feedback:<6} batches={r.batches:<6} "
            f"last_seen={r.last_seen_at or '-'}{'' if r.has_token else ' (import only)'}"
        )


@collector.command()
@_data
@_catalogue
def stats(data: str | None, catalogue: Path | None) -> None:
    """Totals: devices, batches, traces and feedback stored.

    Example usage:

    \b
        slm-agent collector stats
    """
    collector_ = _open(data, catalogue)
    totals = collector_.catalogue.totals()
    collector_.catalogue.close()
    print_json({**totals, "data": collector_.storage.url})


@collector.command()
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Published name; a new version needs a new name.")
@click.option("--task", "tasks", multiple=True, help="Task this adapter serves (repeatable).")
@click.option("--base-sha256", help="sha256 of the base GGUF it was trained on (devices check it).")
@click.option("--publish-dir", type=click.Path(path_type=Path), help="Folder of published adapters.")
def publish(
    gguf: Path, name: str, tasks: tuple[str, ...], base_sha256: str | None, publish_dir: Path | None
) -> None:
    """Publish a GGUF LoRA adapter for devices to `slm-agent sync pull`.

    Example usage:

    \b
        slm-agent collector publish out/extract.gguf --name extract-v3 --task extract
    """
    folder = _settings(publish_dir=publish_dir).publish_dir
    manifest = publish_adapter(gguf, folder, name=name, tasks=list(tasks), base_sha256=base_sha256)
    click.echo(f"published {manifest.name} ({manifest.sha256[:12]}…) in {folder}")


def _open(data: str | None, catalogue: Path | None) -> Collector:
    settings = _settings(data=data, catalogue=catalogue)
    return Collector(TraceStorage(settings.data), Catalogue(settings.catalogue))


if __name__ == "__main__":
    collector()
