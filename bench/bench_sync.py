"""Sync benchmarks: collector ingest rate and a 100,000-trace push end to end.

    python bench/bench_sync.py [--traces 100000] [--ingest-traces 20000]

All run against a real collector subprocess on loopback writing real Parquet. The third figure
(background sync costs <= 5 % of request throughput) starts two real daemons on the bundled
model, one of them pushing a 50,000-trace backlog while it serves.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sync_helpers import CollectorProc, fast_fill

from slm_agent.contracts.wire import CHECKSUM_HEADER, SyncSettings
from slm_agent.models import BUNDLED_NAME
from slm_agent.privacy.scrub import Sanitizer
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.push import _build_batch, encode_batch, push
from slm_agent.runtime.sync.state import read_state, store_ids

DEVICE = "bench-device"


def bench_ingest(root: Path, n: int, batch_size: int = 1000) -> tuple[float, float]:
    """Collector ingest: pre-encoded batches POSTed back to back; returns (traces/s, seconds)."""
    db = root / "ingest-device.db"
    fast_fill(db, n)
    store = TraceStore(db)
    settings = SyncSettings(device_id=DEVICE, batch_size=batch_size)
    device_id, store_id = store_ids(store, settings)
    sanitizer = Sanitizer()
    bodies = []
    state = read_state(store, "bench://ingest")
    while built := _build_batch(store, state, device_id, store_id, batch_size, ()):
        batch = built[0]
        bodies.append(encode_batch(batch, sanitizer))
        store.db.conn.execute(
            "UPDATE sync_state SET trace_seq = ?, pending_trace_seq = NULL, pending_feedback_seq = NULL "
            "WHERE target = ?",
            [batch.trace_to, state.target],
        )
        state = read_state(store, "bench://ingest")
    store.close()
    collector = CollectorProc(root / "collector-ingest")
    token = collector.register(DEVICE)
    collector.start()
    try:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
            started = time.perf_counter()
            for body in bodies:
                r = client.post(
                    f"{collector.url}/v1/batches",
                    content=body,
                    headers={CHECKSUM_HEADER: hashlib.sha256(body).hexdigest()},
                )
                r.raise_for_status()
            seconds = time.perf_counter() - started
        assert collector.traces().num_rows == n
    finally:
        collector.stop()
    return n / seconds, seconds


def bench_push(root: Path, n: int, batch_size: int = 1000) -> tuple[float, float]:
    """Device push end to end (read, redact, scrub, encode, send, ack); returns (traces/s, seconds)."""
    db = root / "push-device.db"
    fast_fill(db, n)
    collector = CollectorProc(root / "collector-push")
    token = collector.register(DEVICE)
    collector.start()
    os.environ["SLM_AGENT_SYNC_TOKEN"] = token
    store = TraceStore(db)
    try:
        result = push(store, SyncSettings(device_id=DEVICE, batch_size=batch_size), collector.url)
        assert result.traces == n and collector.traces().num_rows == n
    finally:
        store.close()
        collector.stop()
    return n / result.seconds, result.seconds


def measure_request_throughput(daemon_url: str, requests: int = 50, token: str | None = None) -> float:
    """Sequential short completions against a running slm-agentd; requests per second."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {
        "model": BUNDLED_NAME,
        "messages": [{"role": "user", "content": "Say OK."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with httpx.Client(base_url=daemon_url, timeout=120, headers=headers) as client:
        client.post("/v1/chat/completions", json=body).raise_for_status()  # warm up
        started = time.perf_counter()
        for _ in range(requests):
            client.post("/v1/chat/completions", json=body).raise_for_status()
        return requests / (time.perf_counter() - started)


def bench_background_sync(
    root: Path, backlog: int = 50_000, requests: int = 40
) -> tuple[float, float, float]:
    """Request throughput of a daemon with sync off vs one pushing a backlog; (off, on, loss)."""
    from conftest import Daemon, free_port

    from slm_agent.models import ModelStore, ensure_bundled

    store = ModelStore(root / "store")
    ensure_bundled(store)
    collector = CollectorProc(root / "bg-collector").start()
    token = collector.register("bg-device")
    daemons = []
    try:
        for name, sync_env in (
            ("off", {}),
            (
                "on",
                {
                    "SLM_AGENT_SYNC__ENABLED": "true",
                    "SLM_AGENT_SYNC__TARGET": collector.url,
                    "SLM_AGENT_SYNC__DEVICE_ID": "bg-device",
                    "SLM_AGENT_SYNC__INTERVAL_S": "1",
                    "SLM_AGENT_SYNC_TOKEN": token,
                },
            ),
        ):
            home = root / f"bg-{name}"
            home.mkdir(parents=True, exist_ok=True)
            if sync_env:
                fast_fill(home / "data" / "traces.db", backlog)
            env = {
                **os.environ,
                "SLM_AGENT_HOME": str(home),
                "SLM_AGENT_STORE_DIR": str(store.root),
                "SLM_AGENT_LOG_LEVEL": "warning",
                **sync_env,
            }
            daemons.append(Daemon(home=home, port=free_port(), env=env).start())
        off_url, on_url = (d.url for d in daemons)
        # Alternate halves so drift on the shared cores hits both daemons alike.
        off = on = 0.0
        for _ in range(2):
            off += measure_request_throughput(off_url, requests // 2) / 2
            on += measure_request_throughput(on_url, requests // 2) / 2
        pushed = TraceStore(root / "bg-on" / "data" / "traces.db")
        print(f"  sync pushed while serving: cursor at {all_cursor(pushed)} of {backlog}", file=sys.stderr)
        return off, on, max(0.0, 1 - on / off)
    finally:
        for daemon in daemons:
            daemon.stop()
        collector.stop()


def all_cursor(store: TraceStore) -> int:
    rows = store.db.execute("SELECT max(trace_seq) FROM sync_state").fetchone()
    return int(rows[0] or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=100_000, help="Traces pushed end to end.")
    parser.add_argument("--ingest-traces", type=int, default=20_000, help="Traces for the ingest figure.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SLM_AGENT_HOME", tmp)
        ingest_rate, ingest_s = bench_ingest(Path(tmp), args.ingest_traces)
        push_rate, push_s = bench_push(Path(tmp), args.traces)
        off, on, loss = bench_background_sync(Path(tmp))
    rows = [
        (
            "collector ingest (traces/s)",
            ingest_rate,
            5000.0,
            f"{args.ingest_traces} traces in {ingest_s:.1f}s",
        ),
        (f"push {args.traces} traces end to end (traces/s)", push_rate, None, f"{push_s:.1f}s"),
        (
            "request throughput lost to background sync (%)",
            loss * 100,
            5.0,
            f"{on:.2f} req/s while pushing vs {off:.2f} req/s with sync off",
        ),
    ]
    print(f"{'figure':<48} {'value':>10} {'target':>10} {'ratio':>7}  note")
    for name, value, target, note in rows:
        ratio = f"{value / target:.2f}" if target else "-"
        print(f"{name:<48} {value:>10.1f} {(f'{target:.0f}' if target else '-'):>10} {ratio:>7}  {note}")


if __name__ == "__main__":
    main()
