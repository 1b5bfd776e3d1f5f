"""Shared fixtures: real model, real daemon subprocess, real SQLite, state in tmp dirs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from slm_agent.models import BUNDLED_NAME, ModelManifest, ModelStore, ensure_bundled
from slm_agent.models.encoder import Encoder
from slm_agent.quantize.encoder import build_encoder, default_source
from slm_agent.runtime.engine import Engine, EngineConfig

# The remote LLM (llama-cpp-python's server) and the fault server, for every test module.
pytest_plugins = ["remote_fixtures"]

# No test reaches the Hugging Face Hub. Set before any fixture runs: session fixtures (the
# encoder export) import huggingface_hub, which reads this variable once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own SLM_AGENT_HOME, so nothing touches the user's files."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SLM_AGENT_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("SLM_AGENT_") and name != "SLM_AGENT_HOME":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """One store holding the assembled bundled model, shared read-only by the whole session."""
    store = ModelStore(tmp_path_factory.mktemp("store"))
    ensure_bundled(store)
    return store


@pytest.fixture(scope="session")
def bundled(shared_store: ModelStore) -> ModelManifest:
    return shared_store.get(BUNDLED_NAME)


@pytest.fixture(scope="session")
def model_path(shared_store: ModelStore, bundled: ModelManifest) -> Path:
    return shared_store.path_of(bundled)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    """A real slm-agentd subprocess on a loopback port."""

    home: Path
    port: int
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    preexec_fn: Callable[[], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.home / "data" / "traces.db"

    def start(self, wait: bool = True, timeout: float = 60) -> Daemon:
        self.log_path = self.home / f"daemon-{self.port}.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slm_agent.runtime.daemon", "--port", str(self.port), *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Rows of `sql` from the daemon's trace database: the one reader every test uses.

        Read-only, so a test can never change what the daemon wrote; closed every call, so no
        connection outlives the query.
        """
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def trace(self, trace_id: str) -> sqlite3.Row:
        """The `traces` row with this id, failing the test (with the id and the file) if it is absent."""
        found = self.query("SELECT * FROM traces WHERE id = ?", (trace_id,))
        assert found, f"trace {trace_id} not in {self.db_path}"
        return found[0]


@pytest.fixture
def make_daemon(_isolated_home: Path, shared_store: ModelStore) -> Iterator[object]:
    """Factory: ``make_daemon(*args, env={...})`` starts a daemon on the shared bundled store."""
    started: list[Daemon] = []

    def factory(
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Daemon:
        full_env = dict(os.environ)
        full_env.update(
            {
                "SLM_AGENT_HOME": str(_isolated_home),
                "SLM_AGENT_STORE_DIR": str(shared_store.root),
                "SLM_AGENT_N_THREADS": "2",
                "SLM_AGENT_N_CTX": "2048",
            }
        )
        full_env.update(env or {})
        daemon = Daemon(
            home=_isolated_home, port=free_port(), env=full_env, args=list(args), preexec_fn=preexec_fn
        )
        started.append(daemon)
        return daemon.start(wait=wait)

    yield factory
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, shared_store: ModelStore) -> Iterator[Daemon]:
    """One daemon shared by a test module (its own home and trace database)."""
    home = tmp_path_factory.mktemp("daemon-home")
    env = dict(os.environ)
    env.update(
        {
            "SLM_AGENT_HOME": str(home),
            "SLM_AGENT_STORE_DIR": str(shared_store.root),
            "SLM_AGENT_N_THREADS": "2",
            "SLM_AGENT_N_CTX": "2048",
            "HF_HUB_OFFLINE": "1",
        }
    )
    d = Daemon(home=home, port=free_port(), env=env).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def two_loras(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random LoRA adapters of the bundled base, lora1 and lora2: each changes greedy output."""
    from lora import make_lora

    folder = tmp_path_factory.mktemp("adapters")
    return {f"lora{i}": make_lora(folder / f"lora{i}.gguf", model_path, seed=i, std=0.08) for i in (1, 2)}


def engine_with(model_path: Path, adapters: dict[str, Path], **config: Any) -> Iterator[Engine]:
    """A loaded engine on 2 threads with ``adapters`` loaded, shut down after (for fixtures)."""
    engine = Engine(EngineConfig(model_path=model_path, n_threads=2, **config))
    engine.load()
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def train_base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dequantized base weights for training tests: made once a session (~40 s), then ~3 s a load."""
    return tmp_path_factory.mktemp("train-base-cache")


@pytest.fixture(scope="session")
def int8_encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    """The int8 ONNX MiniLM that `slm-agent quantize encoder` builds, made once a session."""
    source, origin = default_source()
    folder = tmp_path_factory.mktemp("encoder") / "minilm-int8"
    build_encoder(source, folder, origin=origin)
    return Encoder(folder)
