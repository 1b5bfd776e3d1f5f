"""The whole loop on a generated task: daemon traces with corrections → collector → dataset →
LoRA on CPU → GGUF → eval → publish → sync pull → the daemon serves the adapter and does better."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_task import TASK_TOML, shipments

from slm_agent.cli import main
from slm_agent.collector.catalogue import Catalogue
from slm_agent.collector.ingest import Collector
from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.contracts.wire import SyncSettings
from slm_agent.models.store import ModelStore
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.pull import pull
from slm_agent.runtime.sync.push import push
from slm_agent.train.box import TrainingBox
from slm_agent.train.settings import LoraConfig, TrainSettings

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_adapter_trained_from_corrections_beats_the_base_on_device(
    make_daemon, shared_store, bundled, model_path, tmp_path, train_base_cache
):
    home = Path(os.environ["SLM_AGENT_HOME"])
    tasks_dir = home / "config" / "tasks"
    tasks_dir.mkdir(parents=True)
    (tasks_dir / "shipment.toml").write_text(TASK_TOML)
    device_store = ModelStore(tmp_path / "device-store")
    device_store.add(model_path, name=bundled.name, expected_sha256=bundled.sha256)
    daemon = make_daemon(env={"SLM_AGENT_STORE_DIR": str(device_store.root)})

    # 1. An agent uses the task; a user corrects the answers it gets wrong, rates the right ones
    #    good and rejects one without saying why. Most calls are capped at a few tokens to keep the
    #    test short (the base's grammar-constrained answers take seconds); capped answers fail
    #    (422), and a correction on a failed call teaches as well as any.
    data = shipments(72, seed=7)
    started = time.perf_counter()
    with daemon.client() as http:
        for i, (sentence, truth) in enumerate(data):
            request = {"input": sentence} if i % 12 == 0 else {"input": sentence, "max_tokens": 4}
            reply = http.post("/v1/tasks/shipment", json=request)
            assert reply.status_code in (200, 422), reply.text
            trace_id = reply.headers["X-SLM-Trace-Id"]  # failed calls are traced too
            right = reply.status_code == 200 and reply.json()["output"] == truth
            if i == 1:
                feedback = {"rating": "bad"}
            elif right:
                feedback = {"rating": "good"}
            else:
                feedback = {"rating": "bad", "correction": json.dumps(truth)}
            assert http.post(f"/v1/traces/{trace_id}/feedback", json=feedback).status_code == 201
        print(f"served {len(data)} task calls in {time.perf_counter() - started:.1f}s")
        # 2. Traces go to the training box (a folder the collector imports).
        outbox = tmp_path / "outbox"
        store = TraceStore(daemon.db_path)
        try:
            pushed = push(store, SyncSettings(device_id="laptop-1"), str(outbox))
        finally:
            store.close()
        assert pushed.traces == len(data)
        collected = tmp_path / "collected"
        collector = Collector(TraceStorage(str(collected)), Catalogue(tmp_path / "catalogue.db"))
        assert collector.import_dir(outbox).batches == pushed.batches

        # 3. dataset → lora → eval → publish.
        settings = TrainSettings(
            data=str(collected),
            workdir=tmp_path / "train",
            publish_dir=tmp_path / "published",
            base_cache=train_base_cache,
            min_examples=30,
        )
        box = TrainingBox(settings, device_store, TaskRegistry(tasks_dir))
        card = box.dataset("shipment")
        assert card.dropped.get("negative feedback") == 1
        assert card.by_source["correction"] > 0 and card.examples == len(data) - 1
        report = box.lora("shipment", LoraConfig(max_steps=12, batch_size=8, eval_every=4, seed=1))
        assert report.parity["passed"] and report.train.best_val_loss < report.train.base_val_loss
        evaluation = box.evaluate("shipment")
        base = evaluation.get(bundled.name)
        adapter = evaluation.get(f"shipment-{report.run}")
        assert base is not None and adapter is not None
        assert adapter.metrics.exact_match > base.metrics.exact_match + settings.margin
        assert (settings.workdir / "shipment" / "eval" / "eval.png").read_bytes()[:4] == b"\x89PNG"
        published = box.publish("shipment").published
        assert published.metrics and published.dataset_sha256 == card.dataset_sha256

        # 4. The device pulls it, the daemon hot-loads it and serves the task with it.
        pulled = pull(
            str(settings.publish_dir), SyncSettings(), device_store, bundled.name, daemon_url=daemon.url
        )
        assert pulled.installed == [published.name] and pulled.loaded == [published.name]
        right = 0
        for sentence, truth in shipments(10, seed=99):
            reply = http.post("/v1/tasks/shipment", json={"input": sentence}).json()
            right += reply["output"] == truth
        assert right >= 8
        trace = http.get(f"/v1/traces/{reply['id']}").json()["trace"]
        assert trace["adapter"] == published.name

    # 5. Later the loop retrains; a short run does not beat the published adapter by the margin,
    #    so nothing new ships and the device keeps what it has.
    result = CliRunner().invoke(
        main,
        [
            "train",
            "loop",
            "--data",
            str(collected),
            "--workdir",
            str(settings.workdir),
            "--publish-dir",
            str(settings.publish_dir),
            "--tasks-dir",
            str(tasks_dir),
            "--max-steps",
            "2",
            "--json",
        ],
        env={"SLM_AGENT_STORE_DIR": str(device_store.root), "SLM_TRAIN_BASE_CACHE": str(train_base_cache)},
    )
    assert result.exit_code == 0, result.output
    (outcome,) = json.loads(result.stdout)["tasks"]
    assert outcome["task"] == "shipment" and outcome["outcome"] == "not_better", outcome
    assert [p.name for p in settings.publish_dir.iterdir()] == [published.name]
