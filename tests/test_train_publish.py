"""`train publish`: only an adapter that beats base and the published one by the margin ships."""

from __future__ import annotations

import json

import pytest
from lora import make_lora
from train_task import TASK_TOML, shipment_task

from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.errors import BadRequestError, ConflictError
from slm_agent.train.box import LoraReport, TrainingBox
from slm_agent.train.data.dataset import DatasetCard, LengthStats, task_sha256
from slm_agent.train.evaluation.evaluate import CandidateResult, EvalReport, select
from slm_agent.train.evaluation.metrics import TaskMetrics
from slm_agent.train.settings import LoraConfig, TrainSettings
from slm_agent.train.tuning.lora import TrainResult


def _metrics(exact: float) -> TaskMetrics:
    return TaskMetrics(n=20, valid_rate=1.0, exact_match=exact, f1=exact, primary=exact)


@pytest.fixture
def box(tmp_path, shared_store, model_path, bundled) -> TrainingBox:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shipment.toml").write_text(TASK_TOML)
    settings = TrainSettings(data=str(tmp_path / "c"), workdir=tmp_path / "w", publish_dir=tmp_path / "pub")
    box = TrainingBox(settings, shared_store, TaskRegistry(tasks))
    ws = box.workspace("shipment")
    stats = LengthStats(min=1, mean=1, p95=1, max=1)
    card = DatasetCard(
        task="shipment",
        task_sha256=task_sha256(shipment_task()),
        base_model=bundled.name,
        tokenizer="x",
        dataset_sha256="d1",
        traces=30,
        examples=30,
        by_source={"correction": 30},
        by_split={"train": 20, "val": 2, "test": 8},
        dropped={},
        redactions=0,
        prompt_tokens=stats,
        answer_tokens=stats,
        created_at="now",
    )
    ws.dataset.mkdir(parents=True)
    (ws.dataset / "card.json").write_text(card.model_dump_json())
    for run in ("r1", "r2"):
        ws.run(run).mkdir(parents=True)
        make_lora(ws.run(run) / "adapter.gguf", model_path, seed=len(run))
        train = TrainResult(
            run=run,
            steps=1,
            total_steps=1,
            stopped_early=False,
            best_step=1,
            best_val_loss=0.1,
            base_val_loss=1.0,
            final_train_loss=0.1,
            seconds=1,
            seconds_per_step=1,
            trainable_params=1,
            config=LoraConfig(),
            dataset_sha256="d1",
            device="cpu",
        )
        report = LoraReport(
            task="shipment",
            run=run,
            base_model=bundled.name,
            base_sha256=bundled.sha256,
            train=train,
            parity={"passed": True},
            adapter="adapter.gguf",
            adapter_bytes=1,
        )
        (ws.run(run) / "lora.json").write_text(report.model_dump_json())
    return box


def _eval(box: TrainingBox, base: float, r1: float, r2: float, dataset: str = "d1") -> None:
    results = [
        CandidateResult(name="gemma", kind="base", metrics=_metrics(base), size_bytes=100),
        CandidateResult(name="shipment-r1", kind="adapter", metrics=_metrics(r1), size_bytes=110),
        CandidateResult(name="shipment-r2", kind="adapter", metrics=_metrics(r2), size_bytes=110),
    ]
    report = EvalReport(
        task="shipment",
        dataset_sha256=dataset,
        examples=20,
        bar=0.9,
        candidates=results,
        selected=select(results, 0.9),
        seconds=1,
    )
    folder = box.workspace("shipment").eval
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(report.model_dump_json())


def test_publishes_the_best_run_with_its_numbers_and_refuses_what_is_not_better(box, bundled):
    _eval(box, base=0.50, r1=0.51, r2=0.51)
    with pytest.raises(BadRequestError, match=r"does not beat its rivals by the margin 0\.02") as err:
        box.publish("shipment")
    assert err.value.code == "not_better" and not box.settings.publish_dir.exists()
    _eval(box, base=0.50, r1=0.70, r2=0.90, dataset="old")
    with pytest.raises(ConflictError, match="predates the current dataset"):
        box.publish("shipment")
    _eval(box, base=0.50, r1=0.70, r2=0.90)
    result = box.publish("shipment")
    published = result.published
    assert published.name == "shipment-r2" and published.tasks == ["shipment"]
    assert published.metrics == {"exact_match": 0.9, "f1": 0.9, "valid_rate": 1.0, "test_examples": 20.0}
    assert published.dataset_sha256 == "d1" and published.base_sha256 == bundled.sha256
    assert published.training and published.training["rank"] == 8
    manifest = json.loads((box.settings.publish_dir / "shipment-r2" / "manifest.json").read_text())
    assert manifest["sha256"] == published.sha256
    assert (box.workspace("shipment").run("r2") / "publish.md").exists()
    # The published adapter is now the one to beat: r1 is scored against it.
    assert box.published("shipment") is not None
    kinds = {c.name: c.kind for c in box.candidates("shipment")}
    assert (
        kinds["shipment-r2"] == "published"
        and kinds["shipment-r1"] == "adapter"
        and kinds["remote"] == "remote"
    )


def test_selection_picks_the_smallest_candidate_that_meets_the_bar():
    big = CandidateResult(name="big", kind="other_base", metrics=_metrics(0.95), size_bytes=900)
    small = CandidateResult(name="small+lora", kind="adapter", metrics=_metrics(0.92), size_bytes=300)
    weak = CandidateResult(name="tiny", kind="base", metrics=_metrics(0.4), size_bytes=100)
    remote = CandidateResult(name="remote", kind="remote", metrics=_metrics(1.0), size_bytes=0)
    assert select([big, small, weak, remote], bar=0.9) == "small+lora"
    assert select([weak, remote], bar=0.9) is None
