"""Real remotes for escalation tests: llama-cpp-python's OpenAI server on the bundled model, the
fault server, and a daemon configured to use them (conftest.py registers this module as a plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, free_port
from faultserver import FaultServer

from slm_agent.models import ModelStore

API_KEY_ENV = "SLM_TEST_REMOTE_KEY"


def start_llama_server(
    model_path: Path, log_dir: Path, n_ctx: int = 2048
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log_path = log_dir / f"llama-server-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama server exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llama server not ready:\n{log_path.read_text()}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def llama_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real 'remote': llama-cpp-python's OpenAI-compatible server on the bundled model."""
    proc, url = start_llama_server(model_path, tmp_path_factory.mktemp("llama-server"))
    try:
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as fs:
        yield fs


@pytest.fixture
def fs(fault_server: FaultServer) -> FaultServer:
    fault_server.reset()
    return fault_server


def provider(name: str, url: str, models: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "base_url": url, "models": models, "max_retries": 0, "timeout_s": 60, **extra}


def remote_env(providers: list[dict[str, Any]], **remote: Any) -> dict[str, str]:
    """Daemon env vars configuring ``settings.remote`` (nested via ``__``)."""
    env = {"SLM_AGENT_REMOTE__PROVIDERS": json.dumps(providers), API_KEY_ENV: "sk-test-not-a-real-key"}
    for key, value in remote.items():
        env[f"SLM_AGENT_REMOTE__{key.upper()}"] = str(value)
    return env


def start_daemon(home: Path, store: ModelStore, env: dict[str, str]) -> Daemon:
    """A daemon with its own home, for module-scoped fixtures (``make_daemon`` is per test)."""
    full = dict(os.environ)
    full.update(
        {
            "SLM_AGENT_HOME": str(home),
            "SLM_AGENT_STORE_DIR": str(store.root),
            "SLM_AGENT_N_THREADS": "2",
            "SLM_AGENT_N_CTX": "2048",
            "HF_HUB_OFFLINE": "1",
        }
    )
    full.update(env)
    return Daemon(home=home, port=free_port(), env=full).start()


def write_task(tasks_dir: Path, name: str, toml: str) -> None:
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / f"{name}.toml").write_text(f'name = "{name}"\n' + toml)
