"""Fine-tune, convert, parity: PEFT and llama.cpp must agree on what the adapter does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_task import TASK_TOML, shipments

from slm_agent.collector.storage import TraceStorage
from slm_agent.contracts.records import FeedbackRecord, TraceRecord
from slm_agent.contracts.tasks import TaskRegistry
from slm_agent.errors import BadRequestError, ConflictError, NotFoundError
from slm_agent.quantize.lora_gguf import convert_peft_adapter
from slm_agent.quantize.parity import check_parity
from slm_agent.train.box import ParityFailed, TrainingBox
from slm_agent.train.data.dataset import load_split
from slm_agent.train.settings import LoraConfig, TrainSettings
from slm_agent.train.tuning.base import load_base

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("collected")
    traces, feedback = [], []
    for sentence, truth in shipments(48, seed=5):
        t = TraceRecord(endpoint="tasks", task="shipment", request=sentence, output={"order": 0})
        traces.append(t)
        feedback.append(FeedbackRecord(trace_id=t.id, correction=json.dumps(truth)))
    TraceStorage(str(root)).write_batch("b1", "laptop-1", "0" * 16, traces, feedback)
    return str(root)


@pytest.fixture
def box(tmp_path, shared_store, collected, train_base_cache) -> TrainingBox:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shipment.toml").write_text(TASK_TOML)
    settings = TrainSettings(
        data=collected,
        workdir=tmp_path / "work",
        publish_dir=tmp_path / "published",
        base_cache=train_base_cache,
        min_examples=20,
    )
    box = TrainingBox(settings, shared_store, TaskRegistry(tasks))
    box.dataset("shipment")
    return box


def _random_lora(base, seed: int = 0):
    from slm_agent.train.tuning.lora import add_lora

    torch.manual_seed(seed)
    model = add_lora(base, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_converted_adapter_moves_llama_cpp_loss_as_it_moves_peft_loss(box, model_path, bundled, tmp_path):
    from slm_agent.train.tuning.lora import mean_loss

    examples = load_split(box.workspace("shipment").dataset, "train")[:8]
    base = load_base(model_path, bundled.sha256, box.settings.base_cache)
    model = _random_lora(base)
    model.save_pretrained(str(tmp_path / "peft"))
    peft_loss = mean_loss(model, examples, 8, "cpu")
    with model.disable_adapter():
        base_loss = mean_loss(model, examples, 8, "cpu")
    converted = convert_peft_adapter(tmp_path / "peft", model_path, tmp_path / "a.gguf")
    assert converted.rank == 4 and converted.alpha == 8 and converted.tensors == 2 * 7 * 18
    report = check_parity(
        model_path,
        tmp_path / "a.gguf",
        [(e.prompt_ids, e.answer_ids) for e in examples],
        peft_loss,
        tolerance=0.05,
        base_peft_loss=base_loss,
    )
    # The adapter changes the loss a lot; both runtimes agree on the base and on the adapter.
    assert abs(peft_loss - base_loss) > 0.3 and abs(peft_loss - base_loss) > 5 * report.difference
    assert abs(report.base_llama_loss - report.base_peft_loss) < 0.05
    assert report.passed, report


def test_training_resumes_where_it_stopped_and_is_reproducible(box, model_path, bundled, tmp_path):
    from slm_agent.train.tuning import lora

    ws = box.workspace("shipment")
    train_set, val_set = load_split(ws.dataset, "train")[:12], load_split(ws.dataset, "val")[:4]
    config = LoraConfig(rank=4, batch_size=4, max_steps=4, eval_every=2, seed=3)

    def weights(model) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in model.named_parameters() if "lora_" in k}

    def run(folder: Path, stop_at: int | None = None):
        base = load_base(model_path, bundled.sha256, box.settings.base_cache)

        def on_step(step: lora.StepReport) -> None:
            if step.step == stop_at:
                raise KeyboardInterrupt

        return lora.train(base, train_set, val_set, folder, config, dataset_sha256="d", on_step=on_step)

    whole, whole_model = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=2)
    resumed, resumed_model = run(tmp_path / "b")
    assert resumed.resumed_from == 2 and resumed.steps == whole.steps == 4
    assert resumed.best_val_loss == pytest.approx(whole.best_val_loss, rel=1e-4)
    a, b = weights(whole_model), weights(resumed_model)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(BadRequestError, match="another config or dataset"):
        base = load_base(model_path, bundled.sha256, box.settings.base_cache)
        lora.train(
            base,
            train_set,
            val_set,
            tmp_path / "b",
            config.model_copy(update={"rank": 8}),
            dataset_sha256="d",
        )


def test_an_adapter_that_fails_parity_is_neither_kept_nor_published(box):
    box.settings.parity_tolerance = 1e-9
    with pytest.raises(ParityFailed, match="does not match PEFT"):
        box.lora("shipment", LoraConfig(max_steps=1, batch_size=4, eval_every=1))
    ws = box.workspace("shipment")
    (run,) = ws.runs.iterdir()
    assert not list(run.glob("*.gguf")) and (run / "lora.md").exists()
    with pytest.raises(NotFoundError, match="no eval report"):
        box.publish("shipment")
    assert not box.settings.publish_dir.exists() or not list(box.settings.publish_dir.iterdir())


def test_a_dataset_built_for_an_older_task_definition_is_refused(box):
    tasks_dir = box.tasks.tasks_dir
    (tasks_dir / "shipment.toml").write_text(TASK_TOML.replace("as JSON.", "as JSON, please."))
    box.tasks.reload()
    with pytest.raises(ConflictError, match="changed since its dataset was built"):
        box.lora("shipment", LoraConfig(max_steps=1))
    assert not box.workspace("shipment").runs.exists()


def test_a_base_without_trainable_weights_is_refused(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BadRequestError, match="no weights transformers can train") as err:
        load_base(path, "f" * 64, tmp_path / "cache")
    assert err.value.code == "no_training_weights" and not (tmp_path / "cache").exists()


def test_converter_refuses_what_is_not_a_fitting_lora(box, model_path, bundled, tmp_path):
    with pytest.raises(BadRequestError, match="not a PEFT adapter folder"):
        convert_peft_adapter(tmp_path, model_path, tmp_path / "x.gguf")
    base = load_base(model_path, bundled.sha256, box.settings.base_cache)
    model = _random_lora(base)
    model.save_pretrained(str(tmp_path / "peft"))
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = np.zeros((4, 17), dtype=np.float32)
    save_file(weights, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(BadRequestError, match="do not fit the base"):
        convert_peft_adapter(tmp_path / "peft", model_path, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_shared_prefix_and_answer_only_logits_give_the_full_loss_and_gradients(box, model_path, bundled):
    from slm_agent.train.tuning.lora import batch_loss, collate, shared_prefix

    examples = load_split(box.workspace("shipment").dataset, "train")[:4]
    model = _random_lora(load_base(model_path, bundled.sha256, box.settings.base_cache))
    assert shared_prefix(examples) >= 8  # the instructions and "Input:" are the same in every call
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for mode, share in (("full", False), ("answer", False), ("answer", True)):
        loss = batch_loss(model, collate(examples, share_prefix=share), mode)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in params]).clone()))
        for p in params:
            p.grad = None
    (full, g_full), *rest = results
    for loss, grad in rest:
        assert loss == pytest.approx(full, rel=1e-4)
        assert float((grad - g_full).norm() / g_full.norm()) < 1e-3
