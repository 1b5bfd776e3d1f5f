"""Proxy pass-through overhead: the daemon relaying a model id it does not serve to the remote that
does, against calling that remote directly.

The remote is llama-cpp-python's OpenAI server on the bundled model (loopback); the daemon is a
real ``slm-agentd`` subprocess configured with it as a provider. Requests alternate between the
two paths so drift hits both alike. Prints one table: figure, anchor (direct), proxy, ratio or
delta, target.

    python bench/bench_proxy.py --n 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from slm_agent import locations
from slm_agent.models import ModelStore, ensure_bundled

log = logging.getLogger("bench_proxy")
TARGET_RATIO = 1.05
TARGET_TTFT_DELTA_MS = 5.0
BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "The capital of France is"}],
    "max_tokens": 16,
    "temperature": 0,
    "seed": 1,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready at {url}")


def start(model_path: Path, home: Path) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    rport, dport = free_port(), free_port()
    remote = subprocess.Popen(
        [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
            "--port", str(rport), "--n_ctx", "1024", "--n_threads", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    remote_url = f"http://127.0.0.1:{rport}/v1"
    wait_for(f"{remote_url}/models", remote, "llama server")
    env = dict(os.environ)
    env.update(
        {
            "SLM_AGENT_HOME": str(home),
            "SLM_AGENT_STORE_DIR": str(locations.default_store_dir()),
            "SLM_AGENT_N_THREADS": "1",
            "SLM_AGENT_N_CTX": "1024",
            "SLM_AGENT_REMOTE__PROVIDERS": json.dumps(
                [{"name": "llama", "base_url": remote_url, "models": ["gpt-4o"], "max_retries": 0}]
            ),
        }
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "slm_agent.runtime.daemon", "--port", str(dport)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon_url = f"http://127.0.0.1:{dport}"
    wait_for(f"{daemon_url}/healthz", daemon, "daemon")
    return [remote, daemon], remote_url, f"{daemon_url}/v1"


def once(client: httpx.Client, base: str) -> float:
    started = time.perf_counter()
    r = client.post(f"{base}/chat/completions", json=BODY)
    r.raise_for_status()
    return (time.perf_counter() - started) * 1000


def ttft(client: httpx.Client, base: str) -> float:
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", f"{base}/chat/completions", json={**BODY, "stream": True}) as r:
        r.raise_for_status()
        # Read to the end, so the next request starts on an idle server.
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and _has_content(line):
                first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError("the stream sent no content")
    return first


def _has_content(line: str) -> bool:
    payload = line[6:]
    if payload.strip() == "[DONE]":
        return False
    choices = json.loads(payload).get("choices") or []
    return any((c.get("delta") or {}).get("content") for c in choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="requests per path and figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the table
    store = ModelStore(locations.default_store_dir())
    model_path = store.path_of(ensure_bundled(store))
    with tempfile.TemporaryDirectory() as home:
        procs, direct, proxy = start(model_path, Path(home))
        try:
            with httpx.Client(timeout=120) as client:
                for base in (direct, proxy):  # warm both paths (connections, prompt cache)
                    once(client, base)
                    ttft(client, base)
                lat = {direct: [], proxy: []}
                first = {direct: [], proxy: []}
                for _ in range(args.n):
                    for base in (direct, proxy):
                        lat[base].append(once(client, base))
                        first[base].append(ttft(client, base))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    d_lat, p_lat = statistics.median(lat[direct]), statistics.median(lat[proxy])
    d_ttft, p_ttft = statistics.median(first[direct]), statistics.median(first[proxy])
    rows = [
        ("non-stream latency p50 (ms)", d_lat, p_lat, f"{p_lat / d_lat:.3f}x", f"<= {TARGET_RATIO}x"),
        (
            "stream TTFT p50 (ms)",
            d_ttft,
            p_ttft,
            f"{p_ttft - d_ttft:+.1f} ms",
            f"<= +{TARGET_TTFT_DELTA_MS} ms",
        ),
    ]
    header = f"{'figure':<30} {'anchor (direct)':>16} {'proxy':>10} {'ratio/delta':>12} {'target':>12}"
    lines = [header, "-" * len(header)]
    lines += [f"{f:<30} {a:>16.1f} {p:>10.1f} {r:>12} {t:>12}" for f, a, p, r, t in rows]
    sys.stdout.write("\n".join(lines) + f"\n(n={args.n} requests per path and figure)\n")


if __name__ == "__main__":
    main()
