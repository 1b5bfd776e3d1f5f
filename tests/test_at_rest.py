"""Data at rest: models load only from inside the store, files are owner-only, traces age out,
and ``store_redacted`` keeps raw secrets and personal data off the disk."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import Daemon, free_port
from lora import make_lora

from slm_agent.cli import main as cli
from slm_agent.contracts.records import Feedback, TraceRecord
from slm_agent.contracts.wire import BATCH_SUFFIX, SyncBatch, SyncSettings
from slm_agent.models import BUNDLED_NAME, ModelStore
from slm_agent.runtime.store.retention import PruneResult, SyncedUpTo, prune, synced_up_to
from slm_agent.runtime.store.settings import TraceSettings
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.state import record_acknowledged
from slm_agent.runtime.sync.targets import normalize_target

EMAIL = "alice.liddell@example.com"
SECRET = "sk-proj-Zx9Qw8Er7Ty6Ui5Op4As3Df2"
OLD = "2020-01-01T00:00:00.000Z"
CHAT = {"model": BUNDLED_NAME, "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def private_store(tmp_path_factory: pytest.TempPathFactory, shared_store: ModelStore) -> ModelStore:
    """The bundled model hard-linked into a store of this module's own, free to fill with junk."""
    store = ModelStore(tmp_path_factory.mktemp("rest-store"))
    source = shared_store.root / BUNDLED_NAME
    target = store.root / BUNDLED_NAME
    target.mkdir()
    for file in source.iterdir():
        os.link(file, target / file.name)
    return store


@pytest.fixture(scope="module")
def rest_daemon(tmp_path_factory: pytest.TempPathFactory, private_store: ModelStore) -> Iterator[Daemon]:
    """One daemon with everything at-rest on: redaction, sync to a folder, a fast retention loop.

    Its database is seeded with a trace from 2020 that retention must delete once sync has it.
    """
    home = tmp_path_factory.mktemp("rest-home")
    seeded = TraceStore(home / "data" / "traces.db")
    seeded.insert(TraceRecord(endpoint="tasks", created_at=OLD, request={"input": "from 2020"}))
    seeded.close()
    env = dict(os.environ)
    env.update(
        {
            "SLM_AGENT_HOME": str(home),
            "SLM_AGENT_STORE_DIR": str(private_store.root),
            "SLM_AGENT_N_THREADS": "2",
            "SLM_AGENT_N_CTX": "2048",
            "HF_HUB_OFFLINE": "1",
            "SLM_AGENT_SYNC__ENABLED": "true",
            "SLM_AGENT_SYNC__TARGET": str(home / "outbox"),
            "SLM_AGENT_SYNC__INTERVAL_S": "0.5",
            "SLM_AGENT_TRACES__STORE_REDACTED": "true",
            "SLM_AGENT_TRACES__RETENTION_DAYS": "30",
            "SLM_AGENT_TRACES__PRUNE_INTERVAL_S": "0.5",
        }
    )
    daemon = Daemon(home=home, port=free_port(), env=env).start()
    yield daemon
    daemon.stop()


def assert_refused_cleanly(response: httpx.Response, *absolute: Path) -> None:
    """A 4xx whose body names no path on the daemon's machine."""
    assert 400 <= response.status_code < 500, response.text
    for path in absolute:
        assert str(path) not in response.text
    assert "/etc/passwd" not in response.text


def write_manifest(folder: Path, name: str, file: str, **extra: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": name,
        "kind": "lora-adapter",
        "file": file,
        "sha256": "0" * 64,
        "size": 0,
        "architecture": "gemma3",
        "base": BUNDLED_NAME,
        "tasks": ["extract"],
        **extra,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


# -- adapters and models load only from the store ------------------------------------------------


def test_hostile_adapter_names_and_manifests_are_refused(
    rest_daemon: Daemon, private_store: ModelStore, tmp_path: Path, model_path: Path
) -> None:
    root = private_store.root
    lora = make_lora(tmp_path / "outside.gguf", model_path, seed=3)
    # A manifest outside the store, reached by climbing out of it.
    write_manifest(tmp_path / "x" / "real", "real", "outside.gguf")
    climb = os.path.relpath(tmp_path / "x" / "real", root)
    # In the store: an absolute file, a file above the folder, a symlinked folder, a symlinked file.
    write_manifest(root / "abs-file", "abs-file", "/etc/passwd")
    write_manifest(root / "up-file", "up-file", "../../outside.gguf")
    write_manifest(tmp_path / "linked", "linked-folder", "outside.gguf")
    shutil.copy(lora, tmp_path / "linked" / "outside.gguf")
    (root / "linked-folder").symlink_to(tmp_path / "linked", target_is_directory=True)
    write_manifest(root / "linked-file", "linked-file", "a.gguf", size=lora.stat().st_size)
    (root / "linked-file" / "a.gguf").symlink_to(lora)
    write_manifest(root / "renamed", "gemma-3-270m-q4_k_m", "x.gguf")
    with rest_daemon.client() as http:
        for name in (
            climb,
            "/etc",
            "..",
            "a/b",
            "a\\b",
            "abs-file",
            "up-file",
            "linked-folder",
            "linked-file",
            "renamed",
        ):
            refused = http.post("/v1/admin/adapters", json={"name": name})
            assert_refused_cleanly(refused, root, tmp_path)
        assert http.post("/v1/admin/adapters", json={"name": climb}).json()["error"]["param"] == "name"
        assert http.delete("/v1/admin/adapters/..%2F..%2Fetc").status_code in (400, 404)
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["adapters"] == []


def test_corrupt_adapter_file_is_a_clear_4xx_and_the_daemon_keeps_serving(
    rest_daemon: Daemon, private_store: ModelStore
) -> None:
    folder = private_store.root / "corrupt-lora"
    junk = b"GGUF" + os.urandom(4096)
    write_manifest(folder, "corrupt-lora", "corrupt.gguf", size=len(junk))
    (folder / "corrupt.gguf").write_bytes(junk)
    with rest_daemon.client() as http:
        refused = http.post("/v1/admin/adapters", json={"name": "corrupt-lora"})
        assert_refused_cleanly(refused, private_store.root)
        assert "corrupt-lora" in refused.json()["error"]["message"]
        assert http.get("/healthz").json()["status"] == "ok"
        answer = http.post(
            "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert answer.status_code == 200


def test_unloading_an_adapter_unbinds_its_tasks(
    rest_daemon: Daemon, private_store: ModelStore, model_path: Path, tmp_path: Path
) -> None:
    lora = make_lora(tmp_path / "rest-lora.gguf", model_path, seed=5)
    private_store.add(lora, name="rest-lora", tasks=["extract"])

    def extract_adapter(http: httpx.Client) -> str | None:
        tasks = {t["name"]: t for t in http.get("/v1/admin/tasks").json()}
        return tasks["extract"]["adapter"]

    with rest_daemon.client() as http:
        loaded = http.post("/v1/admin/adapters", json={"name": "rest-lora"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["tasks"] == ["extract"] and extract_adapter(http) == "rest-lora"
        unloaded = http.delete("/v1/admin/adapters/rest-lora")
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["unbound"] == ["extract"] and unloaded.json()["adapters"] == []
        assert extract_adapter(http) is None
        assert http.delete("/v1/admin/adapters/rest-lora").status_code == 404


# -- owner-only files -------------------------------------------------------------------------------


def test_every_file_the_daemon_writes_is_owner_only(rest_daemon: Daemon) -> None:
    with rest_daemon.client() as http:
        assert http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200  # fmt: skip
    outbox = rest_daemon.home / "outbox"
    deadline = time.monotonic() + 20
    while not list(outbox.glob(f"*{BATCH_SUFFIX}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    batches = list(outbox.glob(f"*{BATCH_SUFFIX}"))
    assert batches, "the sync worker wrote no batch"
    db = rest_daemon.db_path
    journals = [db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    written = [p for p in rest_daemon.home.rglob("*") if p.is_file() and not p.name.startswith("daemon-")]
    for path in [db, *journals, *batches, *written]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"


def test_an_existing_database_and_its_journals_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()  # the -wal and -shm exist, as readable as the umask left them
    for file in tmp_path.iterdir():
        file.chmod(0o644)
    store = TraceStore(path)
    store.insert(TraceRecord(endpoint="tasks"))
    assert {stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()} == {0o600}
    store.close()
    conn.close()


def test_exports_are_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    TraceStore(db).insert(TraceRecord(endpoint="tasks", request={"input": "x"}))
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"export.{fmt}"
        result = CliRunner().invoke(
            cli, ["traces", "export", "--db", str(db), "--format", fmt, "-o", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(out.stat().st_mode) == 0o600


# -- redaction at rest -----------------------------------------------------------------------------


def test_store_redacted_keeps_no_raw_email_or_secret_on_disk(rest_daemon: Daemon) -> None:
    text = f"Write to {EMAIL} with the key {SECRET} and repeat both."
    with rest_daemon.client() as http:
        answer = http.post(
            "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": text}]}
        )
        assert answer.status_code == 200
        trace_id = answer.json()["id"]
        given = http.post(f"/v1/traces/{trace_id}/feedback", json={"correction": f"mail {EMAIL}"})
        assert given.status_code == 201
        stored = http.get(f"/v1/traces/{trace_id}").json()
    assert "<EMAIL_1>" in json.dumps(stored["trace"]["request"])
    assert "<EMAIL_1>" in stored["feedback"][0]["correction"]
    db = rest_daemon.db_path
    for file in (db, db.with_name(db.name + "-wal")):
        data = file.read_bytes()
        assert EMAIL.encode() not in data and SECRET.encode() not in data, f"raw text in {file.name}"


def test_store_redacted_covers_spans_shadow_pairs_and_stored_responses(tmp_path: Path) -> None:
    """Every table that quotes a prompt or an answer keeps the redacted form, not only traces."""
    from slm_agent.contracts.responses_api import ResponseObject
    from slm_agent.runtime.shadow.records import PairRecord
    from slm_agent.runtime.shadow.states import TaskStates
    from slm_agent.runtime.store.responses import ResponseStore, StoredResponse
    from slm_agent.runtime.store.spans import Span, SpanStore

    db = tmp_path / "traces.db"
    TraceStore(db).close()  # creates the tables
    text = f"Write to {EMAIL} with the key {SECRET}"
    spans = SpanStore(db, store_redacted=True)
    spans.save(Span(run_id="run_1", kind="task", input={"text": text}, output=text))
    states = TaskStates(db, store_redacted=True)
    message = {"role": "assistant", "content": text}
    states.add_pair(
        PairRecord(
            trace_id="tr_1", task="t", kind="text", agreed=True, local_output=message, remote_output=message
        )
    )
    responses = ResponseStore(db, store_redacted=True)
    responses.save(
        StoredResponse(
            id="resp_1",
            model="m",
            input=[{"role": "user", "content": text}],
            response=ResponseObject(model="m"),
        )
    )
    for store in (spans, states, responses):
        store.close()
    for file in (db, db.with_name(db.name + "-wal")):
        data = file.read_bytes() if file.exists() else b""
        assert EMAIL.encode() not in data and SECRET.encode() not in data, f"raw text in {file.name}"
    conn = sqlite3.connect(db)
    try:
        assert "<EMAIL_1>" in conn.execute("SELECT input FROM spans").fetchone()[0]
        assert "<EMAIL_1>" in conn.execute("SELECT remote_output FROM shadow_pairs").fetchone()[0]
        assert "<EMAIL_1>" in conn.execute("SELECT input FROM responses").fetchone()[0]
    finally:
        conn.close()


# -- retention -------------------------------------------------------------------------------------


def seed(store: TraceStore, ages_days: list[float]) -> list[TraceRecord]:
    now = datetime.now(UTC)
    return [
        store.insert(
            TraceRecord(
                endpoint="tasks",
                created_at=(now - timedelta(days=age))
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                request={"input": "x" * 2000},
            )
        )
        for age in ages_days
    ]


def test_prune_deletes_by_age_and_never_unsynced_traces(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    traces = seed(store, [40, 35, 31, 2, 1])
    store.add_feedback(traces[1].id, Feedback(rating="good"))
    policy = TraceSettings(retention_days=30)
    dry = prune(store, policy, None, dry_run=True)
    assert (dry.by_age, store.count()) == (3, 5)
    # Synced up to the second trace: the third is due but the collector does not have it.
    result = prune(store, policy, SyncedUpTo(trace_seq=traces[1].seq, feedback_seq=1))
    assert (result.by_age, result.feedback, result.kept_unsynced) == (2, 1, 1)
    assert [t.seq for t in store.list()] == [5, 4, 3]
    # Feedback past the cursor holds its trace back too.
    store.add_feedback(traces[2].id, Feedback(rating="bad"))
    held = prune(store, policy, SyncedUpTo(trace_seq=traces[2].seq, feedback_seq=1))
    assert (held.by_age, held.kept_unsynced) == (0, 1)
    assert prune(store, policy, None).by_age == 1 and store.count() == 2


def test_prune_by_size_deletes_the_oldest_synced_first(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    seed(store, [5.0 - i / 100 for i in range(400)])
    policy = TraceSettings(max_db_mb=0.4)
    estimate = prune(store, policy, None, dry_run=True)
    assert estimate.by_size > 0 and store.count() == 400
    result: PruneResult = prune(store, policy, SyncedUpTo(trace_seq=350, feedback_seq=0))
    assert 0 < result.by_size < 350 and result.used_mb_after <= 0.4
    assert min(t.seq for t in store.list(limit=400)) == result.by_size + 1  # the oldest went
    starved = prune(store, TraceSettings(max_db_mb=0.01), SyncedUpTo(trace_seq=350, feedback_seq=0))
    assert store.count() == 50 and starved.kept_unsynced == 50


def test_sync_cursor_guards_prune_only_when_sync_is_configured(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    seed(store, [40, 40])
    assert synced_up_to(store, SyncSettings()) is None
    configured = SyncSettings(target=str(tmp_path / "outbox"))
    assert synced_up_to(store, configured) == SyncedUpTo()
    batch = SyncBatch(
        batch_id="b1",
        device_id="dev-1",
        store_id="0" * 16,
        trace_from=0,
        trace_to=1,
        feedback_from=0,
        feedback_to=0,
    )
    record_acknowledged(store, normalize_target(str(tmp_path / "outbox")), batch)
    assert synced_up_to(store, configured) == SyncedUpTo(trace_seq=1)


def test_prune_cli_dry_run_then_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "t.db"
    store = TraceStore(db)
    seed(store, [40, 1])
    store.close()
    runner = CliRunner()
    dry = runner.invoke(cli, ["traces", "prune", "--db", str(db), "--older-than-days", "30", "--dry-run"])
    assert dry.exit_code == 0 and "would delete 1 traces" in dry.output, dry.output
    assert TraceStore(db).count() == 2
    monkeypatch.setenv("SLM_AGENT_SYNC__TARGET", str(tmp_path / "outbox"))
    kept = runner.invoke(cli, ["traces", "prune", "--db", str(db), "--older-than-days", "30"])
    assert "deleted 0 traces" in kept.output and "kept 1 traces" in kept.output, kept.output
    monkeypatch.delenv("SLM_AGENT_SYNC__TARGET")
    done = runner.invoke(cli, ["traces", "prune", "--db", str(db), "--older-than-days", "30"])
    assert done.exit_code == 0 and "deleted 1 traces" in done.output, done.output
    assert TraceStore(db).count() == 1
    assert runner.invoke(cli, ["traces", "prune", "--db", str(db)]).exit_code == 2


def test_daemon_prunes_old_traces_once_synced(rest_daemon: Daemon) -> None:
    with rest_daemon.client() as http:
        today = http.post(
            "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "Hi"}]}
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not rest_daemon.query("SELECT id FROM traces WHERE created_at = ?", (OLD,)):
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"the 2020 trace was not pruned:\n{rest_daemon.log()[-3000:]}")
    assert rest_daemon.query("SELECT id FROM traces WHERE id = ?", (today.json()["id"],))
