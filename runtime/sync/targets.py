"""Where a push goes and a pull comes from: a collector over HTTP(S) or a folder it imports."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import httpx

from slm_agent.atomic import write_atomic
from slm_agent.contracts.wire import BATCH_SUFFIX, CHECKSUM_HEADER, SyncAck, SyncBatch, SyncSettings
from slm_agent.errors import (
    AuthenticationError,
    BadRequestError,
    StorageFullError,
    UnavailableError,
)


class Target(Protocol):
    def send(self, batch: SyncBatch, body: bytes) -> SyncAck: ...

    def close(self) -> None: ...


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def normalize_target(target: str) -> str:
    if is_url(target):
        return target.rstrip("/")
    return str(Path(target).expanduser().resolve())


def device_token(settings: SyncSettings) -> str | None:
    return os.environ.get(settings.token_env) or None


class HttpTarget:
    """A collector over HTTP(S), authenticated with this device's bearer token."""

    def __init__(
        self, url: str, token: str | None, timeout_s: float, client: httpx.Client | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owned = client is None
        self.client = client or httpx.Client(timeout=timeout_s)
        self.client.headers.update(headers)

    def send(self, batch: SyncBatch, body: bytes) -> SyncAck:
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            CHECKSUM_HEADER: hashlib.sha256(body).hexdigest(),
        }
        response = self._request("POST", "/v1/batches", content=body, headers=headers)
        return SyncAck.model_validate_json(response.content)

    def get(self, path: str) -> httpx.Response:
        return self._request("GET", path)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise UnavailableError(f"collector {self.url} unreachable: {exc}", code="target_down") from exc
        raise_for_response(response, self.url)
        return response

    def close(self) -> None:
        if self._owned:
            self.client.close()


def raise_for_response(response: httpx.Response, url: str) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
        message, code = error.get("message", response.text), error.get("code")
    except ValueError:
        message, code = response.text[:200], None
    status = response.status_code
    if status == 401:
        raise AuthenticationError(f"collector {url} refused this device's token: {message}")
    if status == 507:
        raise StorageFullError(f"collector {url} is out of storage: {message}")
    if status in (400, 422) and code == "corrupt_batch":
        # Damaged in transit: sending the same batch again is the cure.
        raise UnavailableError(f"collector {url} received a damaged batch: {message}", code="corrupt_batch")
    if status >= 500 or status == 429:
        raise UnavailableError(f"collector {url} answered {status}: {message}", code="target_down")
    raise BadRequestError(f"collector {url} refused the batch ({status}): {message}", code=code)


_FULL_ERRNOS = {28, 27, 122}  # ENOSPC, EFBIG, EDQUOT


class DirectoryTarget:
    """A folder the collector imports later (``slm-agent collector import DIR``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def send(self, batch: SyncBatch, body: bytes) -> SyncAck:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / f"{batch.batch_id}{BATCH_SUFFIX}", body)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StorageFullError(f"no room in {self.path} for batch {batch.batch_id}: {exc}") from exc
            raise UnavailableError(f"cannot write to {self.path}: {exc}", code="target_down") from exc
        # A durable file under its final name is the acknowledgement; a re-sent batch overwrites it
        # under the same name, and the collector imports each batch id once.
        return SyncAck(batch_id=batch.batch_id, trace_seq=batch.trace_to, feedback_seq=batch.feedback_to)

    def close(self) -> None:
        pass


def open_target(target: str, settings: SyncSettings, client: httpx.Client | None = None) -> Target:
    if is_url(target):
        return HttpTarget(target, device_token(settings), settings.timeout_s, client)
    return DirectoryTarget(Path(target).expanduser())
