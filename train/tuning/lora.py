"""`train lora TASK`: a PEFT LoRA adapter fine-tuned on a task's dataset.

A step computes only what the loss needs. The output layer runs only at the answer positions:
on gemma-3-270m the 262k-token vocabulary projection costs more than the whole decoder, and a
task answer is a small part of each sequence. The task's fixed prompt prefix, the same in every
example, goes through the decoder once per batch instead of once per example. Runs checkpoint at every val check and resume from the
last one; the same seed, data and config give the same adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from slm_agent.errors import BadRequestError
from slm_agent.train.data.dataset import Example
from slm_agent.train.settings import LoraConfig

LossMode = Literal["answer", "full"]


class StepReport(BaseModel):
    step: int
    total: int
    loss: float
    val_loss: float | None = None
    seconds: float
    eta_s: float


class TrainResult(BaseModel):
    run: str
    steps: int
    total_steps: int
    stopped_early: bool
    best_step: int
    best_val_loss: float = Field(description="Answer loss on eval_set() with the best adapter.")
    base_val_loss: float = Field(description="The same loss with the adapter off.")
    final_train_loss: float
    seconds: float
    seconds_per_step: float
    resumed_from: int | None = None
    trainable_params: int
    history: list[dict[str, float]] = Field(default_factory=list)
    config: LoraConfig
    dataset_sha256: str
    device: str


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shared_prefix(examples: Sequence[Example]) -> int:
    """How many leading prompt tokens every example of the batch has in common.

    A task's prompt starts with its fixed instructions and few-shot examples, identical in every
    call. Their hidden states (and so their keys and values) are identical too: the decoder runs
    them once per batch, not once per example. At least one prompt token stays per example, since
    the last prompt position predicts the first answer token.
    """
    if len(examples) < 2:
        return 0
    first = examples[0].prompt_ids
    limit = min(len(e.prompt_ids) for e in examples) - 1
    for i in range(limit):
        token = first[i]
        if any(e.prompt_ids[i] != token for e in examples):
            return i
    return max(0, limit)


def collate(examples: Sequence[Example], device: str = "cpu", *, share_prefix: bool = True) -> dict[str, Any]:
    """Right-padded ids after the shared prefix, and the positions whose next token is an answer token."""
    import torch

    shared = shared_prefix(examples) if share_prefix else 0
    seqs = [(e.prompt_ids + e.answer_ids[:-1])[shared:] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    where = torch.zeros_like(ids, dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    targets: list[int] = []
    for row, (seq, e) in enumerate(zip(seqs, examples, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, shared : shared + len(seq)] = 1
        start = len(e.prompt_ids) - 1 - shared  # the last prompt position predicts the first answer token
        where[row, start : start + len(e.answer_ids)] = True
        labels[row, start : start + len(e.answer_ids)] = torch.tensor(e.answer_ids)
        targets.extend(e.answer_ids)
    prefix = torch.tensor([examples[0].prompt_ids[:shared]], dtype=torch.long) if shared else None
    return {
        "prefix": prefix.to(device) if prefix is not None else None,
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "where": where.to(device),
        "labels": labels.to(device),
        "targets": torch.tensor(targets, dtype=torch.long, device=device),
    }


def can_share_prefix(model: Any, examples: Sequence[Example]) -> bool:
    """Sharing needs the model's KV cache to hold whole sequences (no sliding window cut-off)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    window = getattr(lm.config, "sliding_window", None)
    longest = max((len(e.prompt_ids) + len(e.answer_ids) for e in examples), default=0)
    return window is None or longest <= window


def batch_loss(model: Any, batch: dict[str, Any], mode: LossMode = "answer") -> Any:
    """Mean cross-entropy over the answer tokens of a batch.

    ``answer`` runs the decoder (the shared prefix once, into a KV cache every row attends to;
    gradients flow back through it), then the output layer on the answer positions only.
    ``full`` is the usual causal-LM forward, logits everywhere with masked labels: the
    benchmark's anchor, on a batch collated without prefix sharing.
    """
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode == "full":
        if batch["prefix"] is not None:
            raise ValueError("full-logits loss needs a batch collated with share_prefix=False")
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    cache = None
    if batch["prefix"] is not None:
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.config)
        lm.model(input_ids=batch["prefix"], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    hidden = lm.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        past_key_values=cache,
        use_cache=cache is not None,
    ).last_hidden_state
    logits = lm.lm_head(hidden[batch["where"]])
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = (logits / cap).tanh() * cap
    return F.cross_entropy(logits.float(), batch["targets"])


def mean_loss(model: Any, examples: Sequence[Example], batch_size: int, device: str) -> float:
    """Token-weighted mean answer loss over ``examples`` (no gradients)."""
    import torch

    share = can_share_prefix(model, examples)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            n = sum(len(e.answer_ids) for e in chunk)
            total += float(batch_loss(model, collate(chunk, device, share_prefix=share))) * n
            count += n
    return total / max(1, count)


def add_lora(base: Any, config: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, peft_config)


def eval_set(train_set: Sequence[Example], val_set: Sequence[Example], config: LoraConfig) -> list[Example]:
    """What val loss is measured on: the val split, or a slice of train when val is empty."""
    return list(val_set) or list(train_set)[: config.batch_size * 2]


def plan_batches(n: int, config: LoraConfig) -> list[list[int]]:
    """Every step's example indices, fixed up front by the seed, so a resumed run continues exactly."""
    steps = config.max_steps or max(1, math.ceil(config.epochs * n / config.batch_size))
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    while len(order) < steps * config.batch_size:
        order.extend(int(i) for i in rng.permutation(n))
    return [order[s * config.batch_size : (s + 1) * config.batch_size] for s in range(steps)]


def config_key(config: LoraConfig, dataset_sha256: str) -> str:
    payload = config.model_dump(exclude={"eval_every", "patience", "device"})
    return hashlib.sha256(json.dumps([payload, dataset_sha256], sort_keys=True).encode()).hexdigest()[:16]


def train(
    base: Any,
    train_set: Sequence[Example],
    val_set: Sequence[Example],
    run_dir: Path,
    config: LoraConfig,
    *,
    dataset_sha256: str,
    device: str = "cpu",
    on_step: Callable[[StepReport], None] | None = None,
) -> tuple[TrainResult, Any]:
    """Fine-tune ``base`` with LoRA; the best adapter (lowest val loss) lands in ``run_dir/peft``.

    Returns the result and the PEFT model holding the best adapter's weights.
    """
    import torch
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    if len(train_set) < 1:
        raise BadRequestError("the training split is empty: build a larger dataset", code="dataset_too_small")
    seed_everything(config.seed)
    model = add_lora(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    plan = plan_batches(len(train_set), config)
    total = len(plan)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        return max(0.05, 1 - (step - config.warmup_steps) / max(1, total - config.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    evaluate = eval_set(train_set, val_set, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    key = config_key(config, dataset_sha256)
    state: dict[str, Any] = {
        "step": 0,
        "best_val": None,
        "best_step": 0,
        "bad": 0,
        "history": [],
        "base_val": None,
    }
    resumed_from = None
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        if saved.get("key") != key:
            raise BadRequestError(
                f"{run_dir} holds a run with another config or dataset; start a new run (--run) instead",
                code="run_mismatch",
            )
        set_peft_model_state_dict(model, saved["lora"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        resumed_from = state["step"]
    if state["base_val"] is None:
        with model.disable_adapter():
            state["base_val"] = mean_loss(model, evaluate, config.batch_size, device)

    share = can_share_prefix(model, train_set)
    started = time.perf_counter()
    steps_done_here = 0
    loss_value = float("nan")
    stopped_early = state["bad"] >= config.patience  # a resumed run that had stopped stays stopped
    model.train()
    step = state["step"]
    while step < total and not stopped_early:
        batch = collate([train_set[i] for i in plan[step]], device, share_prefix=share)
        loss = batch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_done_here += 1
        loss_value = loss.item()
        val = None
        if step % config.eval_every == 0 or step == total:
            model.eval()
            val = mean_loss(model, evaluate, config.batch_size, device)
            model.train()
            state["history"].append({"step": step, "loss": loss_value, "val_loss": val})
            if state["best_val"] is None or val < state["best_val"]:
                state["best_val"], state["best_step"], state["bad"] = val, step, 0
                model.save_pretrained(str(run_dir / "peft"))
            else:
                state["bad"] += 1
            state["step"] = step
            _checkpoint(ckpt_path, key, get_peft_model_state_dict(model), optimizer, scheduler, state)
            if state["bad"] >= config.patience:
                stopped_early = True
        elapsed = time.perf_counter() - started
        if on_step:
            per_step = elapsed / steps_done_here
            on_step(
                StepReport(
                    step=step,
                    total=total,
                    loss=loss_value,
                    val_loss=val,
                    seconds=elapsed,
                    eta_s=per_step * (total - step),
                )
            )
        if stopped_early:
            break
    elapsed = time.perf_counter() - started
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(run_dir / "peft" / "adapter_model.safetensors")))
    model.eval()
    result = TrainResult(
        run=run_dir.name,
        steps=step,
        total_steps=total,
        stopped_early=stopped_early,
        best_step=state["best_step"],
        best_val_loss=state["best_val"],
        base_val_loss=state["base_val"],
        final_train_loss=loss_value
        if steps_done_here
        else (state["history"][-1]["loss"] if state["history"] else float("nan")),
        seconds=round(elapsed, 2),
        seconds_per_step=round(elapsed / max(1, steps_done_here), 3),
        resumed_from=resumed_from,
        trainable_params=sum(p.numel() for p in trainable),
        history=state["history"],
        config=config,
        dataset_sha256=dataset_sha256,
        device=device,
    )
    return result, model


def _checkpoint(
    path: Path, key: str, lora: dict[str, Any], optimizer: Any, scheduler: Any, state: dict[str, Any]
) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {
            "key": key,
            "lora": lora,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "state": state,
        },
        tmp,
    )
    tmp.replace(path)
