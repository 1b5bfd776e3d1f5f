"""Real collector subprocesses and seeded trace databases for the sync tests and benchmark."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.dataset as ds

from slm_agent.contracts.records import Feedback, TraceRecord, encode_column
from slm_agent.runtime.store.traces import TraceStore

# Personal data and secrets seeded into traces; none may reach the collector.
SEEDED = {
    "email": "jane.doe@example.com",
    "card": "4111 1111 1111 1111",
    "openai_key": "sk-proj-Zk3j9XQ2mB7vL1pR8sT4wY6u",
    "aws_key": "AKIAIOSFODNN7EXAMPLE",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "basic": "dXNlcjpwYXNzd29yZDEyMzQ1",
    "password": "hunter2-correct-horse",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seeded_trace(i: int, task: str | None = "extract", big: int = 0) -> TraceRecord:
    return TraceRecord(
        endpoint="/v1/chat/completions",
        task=task,
        client="agent-x",
        request={
            "messages": [
                {"role": "system", "content": "You extract fields."},
                {
                    "role": "user",
                    "content": f"Order {i}: email {SEEDED['email']}, card {SEEDED['card']}, "
                    f"use key {SEEDED['openai_key']} and password={SEEDED['password']}",
                },
            ],
            "headers": {"Authorization": f"Bearer {SEEDED['bearer']}", "X-Api-Key": SEEDED["aws_key"]},
        },
        params={"temperature": 0.0, "api_key": SEEDED["openai_key"]},
        response=f"Authorization: Basic {SEEDED['basic']}\nDone with order {i}." + _words(big, seed=i),
        output={"order": i, "contact": SEEDED["email"]},
        prompt_tokens=40,
        completion_tokens=8,
        latency_ms=12.5,
    )


def _words(n_chars: int, seed: int) -> str:
    if not n_chars:
        return ""
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words, size = [], 0
    while size < n_chars:
        word = "".join(rnd.choice(letters) for _ in range(rnd.randint(2, 9)))
        words.append(word)
        size += len(word) + 1
    return " " + " ".join(words)


def fill(
    store: TraceStore, n: int, *, task: str | None = "extract", feedback_every: int = 0, big: int = 0
) -> list[str]:
    ids = []
    for i in range(n):
        trace = store.insert(seeded_trace(i, task, big))
        ids.append(trace.id)
        if feedback_every and i % feedback_every == 0:
            store.add_feedback(trace.id, Feedback(rating="bad", correction=f"mail {SEEDED['email']}"))
    return ids


def fast_fill(db_path: Path, n: int, task: str = "extract") -> None:
    """Bulk insert of ``n`` traces through the store's schema in one transaction (for benchmarks)."""
    store = TraceStore(db_path)
    template = seeded_trace(0, task)
    store.close()
    columns = [name for name in TraceRecord.model_fields if name != "seq"]
    conn = sqlite3.connect(db_path)
    base = {name: encode_column(name, getattr(template, name)) for name in columns}
    rows = []
    for i in range(n):
        base["id"] = f"tr_bench{i:012d}"
        rows.append([base[c] for c in columns])
    conn.executemany(
        f"INSERT INTO traces ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        rows,
    )
    conn.commit()
    conn.close()


@dataclass
class CollectorProc:
    """A real `slm-agent collector serve` subprocess on a loopback port."""

    root: Path
    port: int = field(default_factory=free_port)
    publish_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> Path:
        return self.root / "parquet"

    @property
    def catalogue(self) -> Path:
        return self.root / "catalogue.db"

    @property
    def log_path(self) -> Path:
        return self.root / "collector.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "slm_agent.collector.cli",
            "serve",
            "--data",
            str(self.data),
            "--catalogue",
            str(self.catalogue),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        if self.publish_dir:
            cmd += ["--publish-dir", str(self.publish_dir)]
        return cmd

    def start(self, preexec_fn: Callable[[], None] | None = None, timeout: float = 30) -> CollectorProc:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"collector not ready after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def register(self, device_id: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "slm_agent.collector.cli",
                "register",
                device_id,
                "--catalogue",
                str(self.catalogue),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def traces(self) -> pa.Table:
        return read_parts(self.data / "traces")

    def feedback(self) -> pa.Table:
        return read_parts(self.data / "feedback")


def read_parts(folder: Path) -> pa.Table:
    if not folder.exists() or not any(folder.rglob("*.parquet")):
        return pa.table({"id": pa.array([], pa.string()), "seq": pa.array([], pa.int64())})
    return ds.dataset(str(folder), format="parquet", partitioning="hive").to_table()


def catalogue_rows(path: Path) -> dict[str, list[dict[str, Any]]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: [dict(r) for r in conn.execute(f"SELECT * FROM {t}")] for t in tables}
    conn.close()
    return out


def everything_stored(collector: CollectorProc) -> str:
    """All the collector kept, decoded: Parquet values, catalogue rows and raw file bytes."""
    parts = [
        json.dumps(read_parts(collector.data / kind).to_pylist(), default=str)
        for kind in ("traces", "feedback")
    ]
    parts.append(json.dumps(catalogue_rows(collector.catalogue), default=str))
    for path in collector.root.rglob("*"):
        if path.is_file() and path.suffix != ".log":
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def sync_cli(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    """`slm-agent sync ...` in a subprocess (the group, as the lead wires it into the CLI)."""
    code = "from slm_agent.runtime.cli.sync import sync; sync()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def set_env(env: dict[str, str], **values: str) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(env)
    merged.update(values)
    return merged
