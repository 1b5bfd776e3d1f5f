"""Pull: install the adapters the training box published, then ask a running daemon to load them.

An adapter for a task discovered on the training box (a chat-shaped task) carries that task's
file; pull writes it to the tasks dir when the device has no file of that name, never over a
user's own, before the daemon is told to load the adapter, so the task is there to bind it to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from slm_agent.atomic import write_atomic
from slm_agent.contracts.tasks import TASK_NAME_RE, parse_task
from slm_agent.contracts.wire import (
    AdapterListing,
    PublishedAdapter,
    PullResult,
    SyncSettings,
    scan_publish_dir,
)
from slm_agent.errors import BadRequestError, ModelStoreError, SlmAgentError, UnavailableError
from slm_agent.runtime.sync.targets import HttpTarget, device_token, is_url, raise_for_response

log = logging.getLogger(__name__)


def list_published(
    source: str, settings: SyncSettings, client: httpx.Client | None = None
) -> list[PublishedAdapter]:
    if is_url(source):
        target = HttpTarget(source, device_token(settings), settings.timeout_s, client)
        try:
            return AdapterListing.model_validate_json(target.get("/v1/adapters").content).adapters
        finally:
            target.close()
    return scan_publish_dir(Path(source).expanduser())


def _fetch(
    source: str, adapter: PublishedAdapter, dest: Path, settings: SyncSettings, client: httpx.Client | None
) -> None:
    """Copy the adapter file to ``dest``, checking its sha256 on the way."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in _chunks(source, adapter, settings, client):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != adapter.sha256:
        raise ModelStoreError(
            f"adapter {adapter.name}: downloaded file has sha256 {digest.hexdigest()[:12]}…, "
            "the manifest says "
            f"{adapter.sha256[:12]}…: refusing it"
        )


def _chunks(
    source: str, adapter: PublishedAdapter, settings: SyncSettings, client: httpx.Client | None
) -> Iterator[bytes]:
    if not is_url(source):
        with (Path(source).expanduser() / adapter.name / adapter.file).open("rb") as fh:
            while block := fh.read(1 << 20):
                yield block
        return
    target = HttpTarget(source, device_token(settings), settings.timeout_s, client)
    try:
        with target.client.stream("GET", f"{target.url}/v1/adapters/{adapter.name}/file") as response:
            if response.status_code >= 400:
                response.read()
                raise_for_response(response, target.url)
            yield from response.iter_bytes(1 << 20)
    except httpx.HTTPError as exc:
        raise UnavailableError(f"collector {source} unreachable: {exc}", code="target_down") from exc
    finally:
        target.close()


def pull(
    source: str,
    settings: SyncSettings,
    model_store: Any,
    base_model: str,
    *,
    daemon_url: str | None = None,
    daemon_token: str | None = None,
    client: httpx.Client | None = None,
    tasks_dir: Path | None = None,
) -> PullResult:
    """Install every published adapter that fits ``base_model``; tell a running daemon to load it.

    A rejected artifact (bad checksum, wrong base, name clash) is reported and leaves whatever is
    installed untouched: the store only ever gains whole, checked adapters. With ``tasks_dir``, the
    task files an installed adapter carries are installed there too (``install_task_files``).
    """
    result = PullResult()
    base = model_store.get(base_model)
    incoming = model_store.root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    for adapter in list_published(source, settings, client):
        try:
            if model_store.has(adapter.name):
                current = model_store.get(adapter.name)
                if current.sha256 == adapter.sha256:
                    result.unchanged.append(adapter.name)
                    continue
                raise ModelStoreError(
                    f"a different {adapter.name!r} is installed: "
                    "published adapters must get a new name per version"
                )
            if adapter.base_sha256 and adapter.base_sha256 != base.sha256:
                raise ModelStoreError(
                    f"{adapter.name} was trained on base {adapter.base_sha256[:12]}…, this device serves "
                    f"{base.name} ({base.sha256[:12]}…)"
                )
            tmp = incoming / f"{adapter.name}.{os.getpid()}.gguf"
            try:
                _fetch(source, adapter, tmp, settings, client)
                model_store.add(
                    tmp,
                    name=adapter.name,
                    base=base.name,
                    tasks=adapter.tasks,
                    origin=f"{source.rstrip('/')}/{adapter.name}",
                    move=True,
                    expected_sha256=adapter.sha256,
                )
            finally:
                tmp.unlink(missing_ok=True)
            result.installed.append(adapter.name)
            if tasks_dir is not None:
                result.tasks_installed += install_task_files(adapter, Path(tasks_dir))
        except SlmAgentError as exc:
            log.warning("rejected adapter %s: %s", adapter.name, exc.message)
            result.rejected[adapter.name] = exc.message
    if result.installed and daemon_url:
        result.daemon_running, result.loaded = notify_daemon(daemon_url, daemon_token, result.installed)
    return result


def install_task_files(adapter: PublishedAdapter, tasks_dir: Path) -> list[str]:
    """Write each task file ``adapter`` carries as ``<tasks_dir>/<task>.toml`` unless that file
    exists; returns the tasks written. A file that does not load as its task is skipped, logged."""
    written = []
    for name, text in adapter.task_files.items():
        target = tasks_dir / f"{name}.toml"
        if not TASK_NAME_RE.match(name) or target.exists():
            continue  # a user's own file of that name is theirs: never replaced
        try:
            data = tomllib.loads(text)
            task = parse_task({**data, "name": data.get("name", name)}, str(target))
            if task.name != name:
                raise BadRequestError(f"the file defines task {task.name!r}, not {name!r}")
        except (tomllib.TOMLDecodeError, BadRequestError) as exc:
            log.warning("adapter %s carries an unusable task file for %s: %s", adapter.name, name, exc)
            continue
        write_atomic(target, text.encode())
        written.append(name)
    return written


def notify_daemon(daemon_url: str, token: str | None, names: list[str]) -> tuple[bool, list[str]]:
    """Ask a running slm-agentd to hot-load adapters; (daemon reachable, names it loaded)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    loaded: list[str] = []
    with httpx.Client(base_url=daemon_url.rstrip("/"), timeout=60, headers=headers) as client:
        for name in names:
            try:
                response = client.post("/v1/admin/adapters", json={"name": name})
            except httpx.HTTPError:
                return False, loaded
            if response.status_code < 300:
                loaded.append(name)
            else:
                log.warning(
                    "daemon refused to load %s (%s): %s", name, response.status_code, response.text[:200]
                )
    return True, loaded
