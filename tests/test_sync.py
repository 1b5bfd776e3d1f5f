"""Device side of sync: exactly-once push through crashes, privacy, opt-out, worker, pull."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sync_helpers import SEEDED, CollectorProc, everything_stored, fill, set_env, sync_cli

from slm_agent.contracts.wire import SyncSettings
from slm_agent.errors import UnavailableError
from slm_agent.models import BUNDLED_NAME, ModelStore
from slm_agent.runtime.cli.sync import sync as sync_group
from slm_agent.runtime.config import Settings
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.pull import pull
from slm_agent.runtime.sync.push import push
from slm_agent.runtime.sync.state import read_state
from slm_agent.runtime.sync.worker import SyncWorker

DEVICE = "laptop-1"


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProc]:
    proc = CollectorProc(tmp_path / "collector", publish_dir=tmp_path / "published")
    proc.root.mkdir(parents=True)
    yield proc
    proc.stop()


@pytest.fixture
def home_store(_isolated_home: Path) -> Iterator[TraceStore]:
    """The device's own trace DB, where the CLI (SLM_AGENT_HOME) looks for it."""
    store = TraceStore(_isolated_home / "data" / "traces.db")
    yield store
    store.close()


def _settings(**kw: object) -> SyncSettings:
    return SyncSettings(**{"device_id": DEVICE, "max_attempts": 3, **kw})  # type: ignore[arg-type]


def _assert_exactly_once(collector: CollectorProc, expected_ids: list[str]) -> None:
    ids = collector.traces().column("id").to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} traces stored twice"
    assert set(ids) == set(expected_ids), f"{len(set(expected_ids) - set(ids))} traces missing"


def test_migration_adds_sync_tables(tmp_path):
    store = TraceStore(tmp_path / "t.db")
    cols = [r[1] for r in store.db.conn.execute("PRAGMA table_info(sync_state)")]
    assert cols == [
        "target",
        "trace_seq",
        "feedback_seq",
        "pending_trace_seq",
        "pending_feedback_seq",
        "pushed_traces",
        "pushed_feedback",
        "last_attempt_at",
        "last_success_at",
        "last_error",
    ]
    meta = dict(store.db.conn.execute("SELECT key, value FROM sync_meta").fetchall())
    assert set(meta) == {"store_id", "device_id"} and len(meta["store_id"]) == 16
    store.close()
    assert Settings().sync.enabled is False


def test_push_is_incremental_private_and_respects_opt_out(collector, tmp_path, monkeypatch):
    store = TraceStore(tmp_path / "device.db")
    token = collector.register(DEVICE)
    collector.start()
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    shared = fill(store, 230, feedback_every=20)
    private = fill(store, 25, task="private", feedback_every=5)
    result = push(store, _settings(batch_size=100), collector.url, excluded_tasks={"private"})
    assert (result.traces, result.skipped, result.feedback) == (230, 25, 12)
    assert push(store, _settings(batch_size=100), collector.url).batches == 0  # nothing new
    later = fill(store, 7)
    assert push(store, _settings(batch_size=100), collector.url, excluded_tasks={"private"}).traces == 7
    _assert_exactly_once(collector, shared + later)
    feedback = collector.feedback()
    assert feedback.num_rows == 12 and not set(feedback.column("trace_id").to_pylist()) & set(private)
    row = collector.traces().to_pylist()[0]
    assert row["device"] == DEVICE and row["endpoint"] == "/v1/chat/completions"
    stored = everything_stored(collector)
    for kind, value in SEEDED.items():
        assert value not in stored, f"{kind} reached the collector"
    assert "4111111111111111" not in stored and token not in stored
    store.close()


@pytest.mark.slow
def test_sigkill_of_pusher_and_collector_mid_batch_loses_and_doubles_nothing(collector, home_store):
    token = collector.register(DEVICE)
    collector.start()
    ids = fill(home_store, 3000, feedback_every=50)
    env = set_env(
        {},
        SLM_AGENT_HOME=os.environ["SLM_AGENT_HOME"],
        SLM_AGENT_SYNC__DEVICE_ID=DEVICE,
        SLM_AGENT_SYNC__BATCH_SIZE="40",
        SLM_AGENT_SYNC__MAX_ATTEMPTS="50",
        SLM_AGENT_SYNC_TOKEN=token,
    )
    db = sqlite3.connect(home_store.path)

    def acked() -> int:
        row = db.execute("SELECT trace_seq FROM sync_state WHERE target = ?", [collector.url]).fetchone()
        return int(row[0]) if row else 0

    kills = 0
    for round_ in range(12):
        pusher = sync_cli("push", "--to", collector.url, env=env)
        before = acked()
        deadline = time.monotonic() + 20
        while (
            acked() <= before + 40 * (1 + round_ % 3)
            and pusher.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        if pusher.poll() is not None:
            break
        if round_ % 2:
            collector.stop(signal.SIGKILL)  # the collector dies mid-batch; the pusher backs off
            time.sleep(0.3)
            collector.start()
        else:
            pusher.send_signal(signal.SIGKILL)
            pusher.wait()
        kills += 1
    final = sync_cli("push", "--to", collector.url, env=env)
    output, _ = final.communicate(timeout=120)
    if pusher.poll() is None:
        pusher.wait(120)
    assert final.returncode == 0, output
    assert kills >= 4
    assert acked() == 3000
    _assert_exactly_once(collector, ids)
    assert collector.feedback().num_rows == 60
    db.close()


def test_sigkill_of_pusher_resends_the_same_batch(collector, home_store, monkeypatch):
    """Deterministic half of the crash test: a batch recorded as in flight goes again unchanged."""
    token = collector.register(DEVICE)
    collector.start()
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    ids = fill(home_store, 30)
    # The pusher delivered batch 1 and died before recording the acknowledgement.
    push(home_store, _settings(batch_size=20), collector.url, max_batches=1)
    home_store.db.conn.execute(
        "UPDATE sync_state SET trace_seq = 0, feedback_seq = 0, "
        "pending_trace_seq = 20, pending_feedback_seq = 0"
    )
    ids += fill(home_store, 5)  # new traces meanwhile must not change the batch's bounds
    result = push(home_store, _settings(batch_size=20), collector.url)
    assert result.duplicates == 1 and result.traces == 35
    _assert_exactly_once(collector, ids)


def test_directory_target_writes_whole_files_and_cli_push_reports(home_store, tmp_path):
    fill(home_store, 45)
    spool = tmp_path / "spool"
    runner = CliRunner()
    out = runner.invoke(sync_group, ["push", "--to", str(spool), "--batch-size", "20"])
    assert out.exit_code == 0, out.output
    assert "pushed 45 traces" in out.output
    files = sorted(p.name for p in spool.iterdir())
    assert len(files) == 3 and all(f.endswith(".json.gz") and not f.startswith(".") for f in files)
    status = runner.invoke(sync_group, ["status"])
    assert status.exit_code == 0 and "acknowledged up to trace 45, 0 waiting" in status.output
    for command in sync_group.commands:
        assert "Example usage" in runner.invoke(sync_group, [command, "--help"]).output


def test_push_backs_off_while_offline(home_store, tmp_path):
    fill(home_store, 3)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="unreachable"):
        push(home_store, _settings(max_attempts=3), "http://127.0.0.1:9")
    assert time.monotonic() - started > 0.6  # 0.5 s then 1 s, with jitter
    assert read_state(home_store, "http://127.0.0.1:9").trace_seq == 0


def test_worker_delivers_once_the_collector_comes_up(collector, home_store, monkeypatch):
    token = collector.register(DEVICE)
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    ids = fill(home_store, 60)
    settings = _settings(
        enabled=True, target=collector.url, interval_s=0.5, batch_size=25, max_attempts=1, backoff_max_s=0.5
    )
    worker = SyncWorker(settings, home_store.path, excluded_tasks=lambda: {"private"})
    worker.start()
    try:
        time.sleep(0.5)
        assert worker.last_error and "unreachable" in worker.last_error
        collector.start()
        ids += fill(home_store, 10)
        fill(home_store, 5, task="private")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and collector.traces().num_rows < 70:
            time.sleep(0.2)
    finally:
        worker.stop()
    _assert_exactly_once(collector, ids)


# -- pull ----------------------------------------------------------------------------------------
def _adapter(base_path: Path, out: Path, *, fit: bool = True) -> Path:
    """A real GGUF LoRA adapter for one tensor of the base model (rank 2)."""
    import gguf

    from slm_agent.models.gguf_info import tensor_shapes

    name, (n_in, n_out) = next(
        (n, s) for n, s in tensor_shapes(base_path).items() if n.endswith("attn_q.weight")
    )
    writer = gguf.GGUFWriter(str(out), "gemma3")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 4.0)
    writer.add_tensor(f"{name}.lora_a", np.zeros((2, n_in if fit else n_in + 1), dtype=np.float32))
    writer.add_tensor(f"{name}.lora_b", np.zeros((n_out, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture
def device_store(tmp_path: Path, shared_store: ModelStore, bundled) -> ModelStore:
    store = ModelStore(tmp_path / "device-models")
    store.add(shared_store.path_of(bundled), name=BUNDLED_NAME, expected_sha256=bundled.sha256)
    return store


def test_pull_installs_checked_adapters_and_rejects_bad_ones(
    collector, device_store, bundled, tmp_path, monkeypatch
):
    from slm_agent.collector.publish import publish_adapter

    base_path = device_store.path_of(bundled)
    published = collector.publish_dir
    assert published
    good = publish_adapter(
        _adapter(base_path, tmp_path / "good.gguf"),
        published,
        name="extract-v1",
        tasks=["extract"],
        base_sha256=bundled.sha256,
    )
    publish_adapter(
        _adapter(base_path, tmp_path / "misfit.gguf", fit=False), published, name="misfit-v1", tasks=[]
    )
    publish_adapter(
        _adapter(base_path, tmp_path / "other.gguf"),
        published,
        name="other-base-v1",
        tasks=[],
        base_sha256="0" * 64,
    )
    tampered = publish_adapter(
        _adapter(base_path, tmp_path / "t.gguf"), published, name="tampered-v1", tasks=[]
    )
    (published / "tampered-v1" / tampered.file).write_bytes(b"GGUF" + b"\0" * 100)
    token = collector.register(DEVICE)
    collector.start()
    monkeypatch.setenv("SLM_AGENT_SYNC_TOKEN", token)
    result = pull(collector.url, _settings(), device_store, BUNDLED_NAME, daemon_url="http://127.0.0.1:9")
    assert result.installed == ["extract-v1"]
    assert set(result.rejected) == {"misfit-v1", "other-base-v1", "tampered-v1"}
    assert "do not fit" in result.rejected["misfit-v1"] and "sha256" in result.rejected["tampered-v1"]
    assert result.daemon_running is False
    manifest = device_store.get("extract-v1")
    assert manifest.sha256 == good.sha256 and manifest.base == BUNDLED_NAME and manifest.tasks == ["extract"]
    assert not [p for p in device_store.root.rglob("*") if p.is_file() and ".incoming" in p.parts]
    again = pull(collector.url, _settings(), device_store, BUNDLED_NAME)
    assert again.unchanged == ["extract-v1"] and not again.installed
    # From a folder too (a copy of the publish dir on a USB stick).
    monkeypatch.delenv("SLM_AGENT_SYNC_TOKEN")
    other = ModelStore(tmp_path / "second-device")
    other.add(base_path, name=BUNDLED_NAME, expected_sha256=bundled.sha256)
    assert pull(str(published), _settings(), other, BUNDLED_NAME).installed == ["extract-v1"]


def test_worker_yields_to_requests_while_the_daemon_serves(tmp_path: Path) -> None:
    """After each batch the worker rests long enough to stay under max_share of the time."""
    serving = SyncWorker(SyncSettings(), tmp_path / "t.db", busy=lambda: True, max_share=0.25)
    started = time.monotonic()
    serving._rest(0.1)
    assert 0.29 <= time.monotonic() - started < 1.0
    idle = SyncWorker(SyncSettings(), tmp_path / "t.db", busy=lambda: False)
    started = time.monotonic()
    idle._rest(0.1)
    assert time.monotonic() - started < 0.05
