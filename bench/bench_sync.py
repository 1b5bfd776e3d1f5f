"""Sync benchmarks: collector ingest rate and a 100,000-trace push end to end.

    python bench/bench_sync.py [--traces 100000] [--ingest-traces 20000]

Both run against a real collector subprocess on loopback writing real Parquet. The third
figure (background sync costs <= 5 % of request throughput) needs a daemon:
``background_sync_overhead(url_without_sync, url_with_sync)``.
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

from slm_agent.runtime.scrub import Sanitizer
from slm_agent.runtime.sync import _build_batch, push, read_state, store_ids
from slm_agent.runtime.sync_wire import CHECKSUM_HEADER, SyncSettings, encode_batch
from slm_agent.runtime.traces import TraceStore

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
    body = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=daemon_url, timeout=120, headers=headers) as client:
        client.post("/v1/chat/completions", json=body).raise_for_status()  # warm up
        started = time.perf_counter()
        for _ in range(requests):
            client.post("/v1/chat/completions", json=body).raise_for_status()
        return requests / (time.perf_counter() - started)


def background_sync_overhead(
    url_without_sync: str, url_with_sync: str, requests: int = 50, token: str | None = None
) -> float:
    """Fraction of request throughput lost while the daemon's SyncWorker pushes (target <= 0.05).

    Start one daemon with sync disabled and one (same model, same settings) with
    ``[sync] enabled = true`` and a trace backlog to push, then call this with both URLs.
    """
    base = measure_request_throughput(url_without_sync, requests, token)
    with_sync = measure_request_throughput(url_with_sync, requests, token)
    return max(0.0, 1 - with_sync / base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=100_000, help="Traces pushed end to end.")
    parser.add_argument("--ingest-traces", type=int, default=20_000, help="Traces for the ingest figure.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SLM_AGENT_HOME", tmp)
        ingest_rate, ingest_s = bench_ingest(Path(tmp), args.ingest_traces)
        push_rate, push_s = bench_push(Path(tmp), args.traces)
    rows = [
        (
            "collector ingest (traces/s)",
            ingest_rate,
            5000.0,
            f"{args.ingest_traces} traces in {ingest_s:.1f}s",
        ),
        (f"push {args.traces} traces end to end (traces/s)", push_rate, None, f"{push_s:.1f}s"),
    ]
    print(f"{'figure':<48} {'value':>10} {'target':>10} {'ratio':>7}  note")
    for name, value, target, note in rows:
        ratio = f"{value / target:.2f}" if target else "-"
        print(f"{name:<48} {value:>10.0f} {(f'{target:.0f}' if target else '-'):>10} {ratio:>7}  {note}")


if __name__ == "__main__":
    main()
