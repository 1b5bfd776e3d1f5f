"""The product's promise, end to end: an unmodified OpenAI-SDK agent calling ``model="gpt-4o"``
through the daemon. Its recurring calls are proxied and traced, pushed to the training box,
discovered as chat-shaped tasks, distilled into adapters from the remote's own answers, pulled
back, verified against the remote on live traffic (shadow), promoted, answered on the laptop —
and demoted when the remote's answers drift.

The remote is the scripted teacher (tests/teacher.py): the test needs a remote that answers the
subtasks correctly from known ground truth, and one whose answers change on demand.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agent_sim import PLANNING, SUBTASKS, AgentCall, AgentResult, generate_calls, run_agent
from remote_fixtures import provider, remote_env
from teacher import Teacher

from slm_agent.collector.catalogue import Catalogue
from slm_agent.collector.ingest import Collector
from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.centroids import MATCH_MAX_TOKENS
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.contracts.wire import SyncSettings
from slm_agent.models.encoder import Encoder
from slm_agent.models.store import ModelStore
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.pull import pull
from slm_agent.runtime.sync.push import push
from slm_agent.train.box import TrainingBox
from slm_agent.train.data.collected import read_traces
from slm_agent.train.discovery.discover import accept, discover
from slm_agent.train.settings import LoraConfig, TrainSettings

pytestmark = pytest.mark.slow

# Promotion settings a user would tune for a quick trial: fewer pairs, a bigger live sample.
PROMOTION = "\n[promotion]\ntarget = 0.8\nmin_pairs = 24\nshadow_sample = 0.5\ndrift_window = 6\n"


def rate(results: list[AgentResult], subtask: str) -> float:
    mine = [r for r in results if r.call.subtask == subtask]
    return sum(r.correct for r in mine) / len(mine)


def states(daemon_url: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{daemon_url}/v1/admin/task-states", timeout=10).json()
    return {s["task"]: s for s in body}


def wait_until(condition: Any, timeout: float, step: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


@pytest.mark.timeout(3600)
def test_unmodified_agent_calls_move_to_the_laptop_and_back_on_drift(
    make_daemon: Any,
    bundled: Any,
    model_path: Path,
    tmp_path: Path,
    train_base_cache: Path,
    int8_encoder: Encoder,
) -> None:
    loop_started = time.perf_counter()
    home = Path(os.environ["SLM_AGENT_HOME"])
    tasks_dir = home / "config" / "tasks"
    device_store = ModelStore(tmp_path / "device-store")
    device_store.add(model_path, name=bundled.name, expected_sha256=bundled.sha256)
    with Teacher(latency_s=0.4) as teacher:
        env = remote_env([provider("teacher", teacher.url, ["gpt-4o"])])
        env["SLM_AGENT_STORE_DIR"] = str(device_store.root)
        env["SLM_AGENT_ENCODER_DIR"] = str(int8_encoder.folder)
        daemon = make_daemon(env=env)
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)

        # 1. The agent as it is: every call proxied to the remote, traced on the device.
        before = run_agent(client, generate_calls(40, 12, seed=1))
        assert {r.route for r in before} == {"remote"}
        assert {r.route_reason for r in before} == {"proxy"}

        # 2. Traces go to the training box, which discovers one chat task per agent step.
        outbox, collected = tmp_path / "outbox", tmp_path / "collected"
        store = TraceStore(daemon.db_path)
        try:
            pushed = push(store, SyncSettings(device_id="laptop-1"), str(outbox))
        finally:
            store.close()
        assert pushed.traces == len(before)
        collector = Collector(TraceStorage(str(collected)), Catalogue(tmp_path / "catalogue.db"))
        collector.import_dir(outbox)
        encoder = Encoder(int8_encoder.folder, max_length=MATCH_MAX_TOKENS)  # as the device embeds
        report = discover(read_traces(str(collected)), encoder=encoder, data=str(collected))
        assert report.planning == 12 and len(report.proposals) == len(SUBTASKS), report.proposals
        train_tasks = tmp_path / "train-tasks"
        train_tasks.mkdir()
        names = []
        for proposal in report.proposals:
            assert proposal.form == "chat" and proposal.size == 40
            path = accept(proposal, train_tasks, data=str(collected))
            path.write_text(path.read_text() + PROMOTION)
            names.append(path.stem)

        # 3. dataset -> lora -> eval -> publish, per task, from the remote's own answers.
        settings = TrainSettings(
            data=str(collected),
            workdir=tmp_path / "train",
            publish_dir=tmp_path / "published",
            base_cache=train_base_cache,
            min_examples=20,
        )
        box = TrainingBox(settings, device_store, TaskRegistry(train_tasks))
        for name in names:
            card = box.dataset(name)
            assert card.examples >= 30, card
            box.lora(name, LoraConfig(max_steps=30, batch_size=8, eval_every=10, seed=1))
            box.evaluate(name)
            box.publish(name)

        # 4. The device pulls adapters and task definitions; the daemon serves them in shadow.
        pulled = pull(
            str(settings.publish_dir),
            SyncSettings(),
            device_store,
            bundled.name,
            daemon_url=daemon.url,
            tasks_dir=tasks_dir,
        )
        assert len(pulled.installed) == len(names) and len(pulled.loaded) == len(names)
        assert {p.stem for p in tasks_dir.glob("*.toml")} == set(names)

        # 5. The agent keeps calling; the remote answers, the adapters are compared while idle.
        #    Traffic goes on until every task has earned promotion (the shadow queue keeps only the
        #    newest jobs, so pairs come from calls, not from waiting).
        seed = 2
        while not all(states(daemon.url)[n]["state"] == "live" for n in names):
            assert seed < 8, states(daemon.url)
            shadowed = run_agent(client, generate_calls(12, 2, seed=seed))
            assert {r.route for r in shadowed if r.call.subtask == PLANNING} == {"remote"}
            wait_until(lambda: all(states(daemon.url)[n]["state"] == "live" for n in names), 60)
            seed += 1

        # 6. Promoted: the same agent's new calls are answered on the laptop, correctly.
        after = run_agent(client, generate_calls(30, 8, seed=3))
        for subtask in SUBTASKS:
            mine = [r for r in after if r.call.subtask == subtask]
            local = [r for r in mine if r.route == "local"]
            assert len(local) >= 0.8 * len(mine), (subtask, [r.route_reason for r in mine])
            assert {r.route_reason for r in local} == {"promoted"}
            assert rate(after, subtask) >= 0.95 * rate(before, subtask), subtask
        assert {r.route for r in after if r.call.subtask == PLANNING} == {"remote"}

        # 7. The remote's answers change: live samples disagree, and the tasks are demoted.
        teacher.drift(True)
        drifted: list[AgentCall] = generate_calls(20, 0, seed=4)
        run_agent(client, drifted)
        assert wait_until(lambda: all(states(daemon.url)[n]["state"] == "demoted" for n in names), 120), (
            states(daemon.url)
        )
        print(f"whole loop on 2 cores: {time.perf_counter() - loop_started:.0f} s")
