"""The collector: authentication, refusal of damaged batches, disk full, reconciliation, import."""

from __future__ import annotations

import gzip
import hashlib
import json
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sync_helpers import CollectorProc, fill, read_parts

from slm_agent.collector.catalogue import Catalogue
from slm_agent.collector.cli import collector as collector_group
from slm_agent.collector.ingest import Collector
from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.wire import CHECKSUM_HEADER, SyncSettings, decode_batch
from slm_agent.errors import AuthenticationError, StorageFullError
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.push import push
from slm_agent.runtime.sync.state import read_state

DEVICE = "laptop-1"


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProc]:
    proc = CollectorProc(tmp_path / "collector")
    proc.root.mkdir(parents=True)
    yield proc
    proc.stop()


@pytest.fixture
def device(tmp_path: Path) -> Iterator[TraceStore]:
    store = TraceStore(tmp_path / "device" / "traces.db")
    yield store
    store.close()


def _settings(**kw: object) -> SyncSettings:
    return SyncSettings(**{"device_id": DEVICE, "max_attempts": 2, **kw})  # type: ignore[arg-type]


def test_wrong_token_is_refused_and_nothing_written(collector, device, monkeypatch):
    collector.register(DEVICE)
    collector.start()
    fill(device, 5)
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", "slmdev_not-the-token")
    with pytest.raises(AuthenticationError):
        push(device, _settings(), collector.url)
    assert read_state(device, collector.url).trace_seq == 0
    assert collector.traces().num_rows == 0
    # No token at all: the same 401.
    response = httpx.post(f"{collector.url}/v1/batches", content=b"{}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_token_of_another_device_is_forbidden(collector, device, monkeypatch):
    collector.register(DEVICE)
    other = collector.register("someone-else")
    collector.start()
    fill(device, 3)
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", other)
    with pytest.raises(Exception, match="someone-else"):
        push(device, _settings(), collector.url)
    assert collector.traces().num_rows == 0


def _body(collector: CollectorProc, device: TraceStore) -> bytes:
    """The bytes the device would send for its first batch (written to a folder target)."""
    out = collector.root.parent / "spool"
    push(device, _settings(), str(out))
    return next(out.glob("*.json.gz")).read_bytes()


def test_corrupt_or_truncated_batch_is_refused_then_the_device_retries(collector, device, monkeypatch):
    token = collector.register(DEVICE)
    collector.start()
    fill(device, 20)
    body = _body(collector, device)
    auth = {"Authorization": f"Bearer {token}"}
    truncated = body[: len(body) // 2]
    r = httpx.post(
        f"{collector.url}/v1/batches",
        content=truncated,
        headers={**auth, CHECKSUM_HEADER: hashlib.sha256(truncated).hexdigest()},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_batch"
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 0xFF
    r = httpx.post(
        f"{collector.url}/v1/batches",
        content=bytes(flipped),
        headers={**auth, CHECKSUM_HEADER: hashlib.sha256(body).hexdigest()},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_batch"
    # Well-formed gzip whose rows are not TraceRecords: refused by validation.
    bad = gzip.compress(json.dumps({"batch_id": "x", "traces": [{"seq": 1}]}).encode())
    r = httpx.post(
        f"{collector.url}/v1/batches",
        content=bad,
        headers={**auth, CHECKSUM_HEADER: hashlib.sha256(bad).hexdigest()},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_batch"
    assert collector.traces().num_rows == 0

    # The fault: the network truncates the first request; the device sends the batch again.
    class TruncateOnce(httpx.HTTPTransport):
        calls = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            TruncateOnce.calls += 1
            if TruncateOnce.calls == 1:
                data = request.read()
                headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
                request = httpx.Request(
                    request.method, request.url, headers=headers, content=data[: len(data) // 3]
                )
            return super().handle_request(request)

    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    client = httpx.Client(transport=TruncateOnce())
    result = push(device, _settings(max_attempts=3), collector.url, client=client)
    assert TruncateOnce.calls == 2
    assert result.traces == 20
    ids = collector.traces().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20


def _limit_file_size() -> None:
    # A file-size limit is a disk that fills up at 256 KiB; ignoring SIGXFSZ turns it into EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_disk_full_is_a_clear_error_and_nothing_is_acknowledged(collector, device, monkeypatch):
    token = collector.register(DEVICE)
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    fill(device, 30, big=30_000)  # ~1 MB of incompressible-ish text per batch
    collector.start(preexec_fn=_limit_file_size)
    with pytest.raises(StorageFullError, match="no room"):
        push(device, _settings(batch_size=100), collector.url)
    state = read_state(device, collector.url)
    assert state.trace_seq == 0 and state.pending_trace_seq == 30  # same batch goes again
    assert Catalogue(collector.catalogue).totals()["batches"] == 0
    assert not list(collector.data.rglob("*.parquet"))
    assert not list(collector.data.rglob("*.tmp"))
    # Room again: the very same batch lands, once.
    collector.stop()
    collector.start()
    result = push(device, _settings(batch_size=100), collector.url)
    assert result.traces == 30
    assert sorted(collector.traces().column("seq").to_pylist()) == list(range(1, 31))


def test_orphan_part_files_are_removed_on_restart_then_rewritten_once(
    collector, device, monkeypatch, tmp_path
):
    """The state a SIGKILL between 'Parquet written' and 'catalogue committed' leaves behind."""
    token = collector.register(DEVICE)
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    fill(device, 50)
    batch = decode_batch(_body(collector, device))
    storage = TraceStorage(str(collector.data))
    files = storage.write_batch(batch.batch_id, batch.device_id, batch.store_id, batch.traces, batch.feedback)
    leftover = Path(files[0]).parent / ".part-crashed.tmp"
    leftover.write_bytes(b"half")
    assert read_parts(collector.data / "traces").num_rows == 50
    collector.start()  # reconciles
    assert not Path(files[0]).exists() and not leftover.exists()
    # The device was never acknowledged by this collector: it sends everything, stored once.
    device.db.conn.execute("DELETE FROM sync_state")
    push(device, _settings(), collector.url)
    ids = collector.traces().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 50


def test_import_directory_is_idempotent(tmp_path, device):
    fill(device, 120, feedback_every=10)
    spool = tmp_path / "spool"
    push(device, _settings(batch_size=50), str(spool))
    assert len(list(spool.glob("*.json.gz"))) == 3
    saved = {p.name: p.read_bytes() for p in spool.glob("*.json.gz")}
    col = Collector(TraceStorage(str(tmp_path / "pq")), Catalogue(tmp_path / "cat.db"))
    first = col.import_dir(spool)
    assert (first.batches, first.traces, first.duplicates) == (3, 132, 0)
    for name, data in saved.items():  # the same files delivered again (a second USB copy)
        (spool / name).write_bytes(data)
    (spool / "garbage.json.gz").write_bytes(b"not gzip")
    again = col.import_dir(spool)
    assert (again.batches, again.duplicates, again.traces) == (3, 3, 0)
    assert "garbage.json.gz" in again.rejected and (spool / "rejected" / "garbage.json.gz").exists()
    assert read_parts(tmp_path / "pq" / "traces").num_rows == 120
    assert read_parts(tmp_path / "pq" / "feedback").num_rows == 12


def test_cli_register_devices_stats_and_help(tmp_path):
    runner = CliRunner()
    cat = str(tmp_path / "cat.db")
    out = runner.invoke(collector_group, ["register", "dev-a", "--catalogue", cat])
    assert out.exit_code == 0 and out.output.startswith("slmdev_")
    assert runner.invoke(collector_group, ["register", "dev-a", "--catalogue", cat]).exit_code != 0
    catalogue = Catalogue(Path(cat))
    assert catalogue.device_for_token(out.output.strip()) == "dev-a"
    assert out.output.strip() not in Path(cat).read_bytes().decode("latin-1")  # stored hashed
    listing = runner.invoke(collector_group, ["devices", "--catalogue", cat, "--json"])
    assert json.loads(listing.output)[0]["id"] == "dev-a"
    stats = runner.invoke(collector_group, ["stats", "--catalogue", cat, "--data", str(tmp_path / "pq")])
    assert json.loads(stats.output)["devices"] == 1
    for command in collector_group.commands:
        help_text = runner.invoke(collector_group, [command, "--help"]).output
        assert "Example usage" in help_text, command


def test_serve_help_runs_as_module():
    out = subprocess.run(
        [sys.executable, "-m", "slm_agent.collector.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "serve" in out.stdout
