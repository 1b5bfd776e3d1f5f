"""The training box, measured: step time with answer-only logits vs full logits, converter parity,
and the eval table of base vs adapter on the generated shipment task.

1. Step time: the same LoRA training steps (batch 8, rank 8, all linear layers) with the loss
   computed the usual way (logits at every position: ``model(..., labels=...)``), with
   answer-only logits, and with answer-only logits plus the task's shared prompt prefix run once
   per batch (what ``train lora`` does), on two tasks: the short generated one and the built-in
   ``extract`` with its few-shot prompt. Target: >= 3x faster than full logits.
2. Parity: val loss of the trained adapter in PEFT vs in llama.cpp (GGUF base + GGUF adapter).
3. Eval: base vs the adapter on the held-out test set, run through the daemon's engine.

    python bench/bench_train.py [--steps 20] [--examples 80]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from train_task import shipment_task, shipments

from slm_agent.contracts.tasks import Task, builtin_tasks
from slm_agent.models.bundled import BUNDLED_NAME, ensure_bundled
from slm_agent.models.store import ModelStore
from slm_agent.runtime.config import load_settings
from slm_agent.train.data.dataset import Example
from slm_agent.train.data.dedup import stable_split
from slm_agent.train.data.labels import canonical
from slm_agent.train.data.tokenizer import ServingTokenizer, answer_text
from slm_agent.train.settings import LoraConfig, TrainSettings

EXTRACT_INPUTS = [
    ("Hi, this is {n} from {c} in {city}; mail me at {e}.", True),
    ("{n} ({city}) called about the invoice. No e-mail left.", False),
    ("Forwarding {e}: {n} runs the {c} office in {city}.", True),
]
NAMES = ["Ana Silva", "Tom Berg", "Li Wei", "Sara Khan", "Omar Haddad", "Eva Novak", "Raj Patel", "Mia Rossi"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay"]
CITIES = ["Lisbon", "Oslo", "Osaka", "Lima", "Cairo", "Prague", "Pune", "Turin"]


def examples(task: Task, pairs: Sequence[tuple[str, object]], tok: ServingTokenizer) -> list[Example]:
    out = []
    for i, (text, answer) in enumerate(pairs):
        label = canonical(task, answer)
        assert label is not None, answer
        body, eos = answer_text(task, label)
        out.append(
            Example(
                id=str(i),
                input=text,
                label=label,
                source="correction",
                split=stable_split(text, 0.1, 0.2),
                created_at="",
                prompt_ids=tok.prompt(task.prefix(), task.body(text)),
                answer_ids=tok.answer(body, eos=eos),
            )
        )
    return out


def extract_pairs(n: int) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    for i in range(n):
        name, company, city = NAMES[i % 8], COMPANIES[i % 6], CITIES[(i * 3) % 8]
        email = name.lower().replace(" ", ".") + f"{i}@{company.lower()}.example"
        template, has_email = EXTRACT_INPUTS[i % 3]
        text = template.format(n=name, c=company, city=city, e=email)
        pairs.append(
            (
                text,
                {
                    "name": name,
                    "email": email if has_email else None,
                    "city": city,
                    "company": company if "{c}" in template else None,
                },
            )
        )
    return pairs


def step_times(model, batch_examples: list[Example], mode: str, share: bool, steps: int) -> list[float]:
    import torch

    from slm_agent.train.tuning.lora import batch_loss, collate

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = collate(batch_examples, share_prefix=share)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators
        started = time.perf_counter()
        loss = batch_loss(model, batch, mode)  # type: ignore[arg-type]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="Training steps for the parity/eval run.")
    parser.add_argument("--examples", type=int, default=80)
    args = parser.parse_args()

    import torch

    from slm_agent.quantize.lora_gguf import convert_peft_adapter
    from slm_agent.quantize.parity import check_parity
    from slm_agent.train.evaluation.evaluate import Candidate, run_candidates
    from slm_agent.train.tuning import lora
    from slm_agent.train.tuning.base import load_base

    store = ModelStore(load_settings().store_dir)
    base_manifest = ensure_bundled(store) if not store.has(BUNDLED_NAME) else store.get(BUNDLED_NAME)
    gguf = store.path_of(base_manifest)
    tok = ServingTokenizer(gguf)
    cache = TrainSettings().base_cache
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; base {gguf.name}")

    # 1. step time, answer-only vs full logits
    ship = shipment_task()
    extract = next(t for t in builtin_tasks() if t.name == "extract")
    rows = []
    for task, pairs in ((ship, shipments(8, seed=1)), (extract, extract_pairs(8))):
        batch = examples(task, pairs, tok)
        tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for e in batch) / len(batch)
        answer = sum(len(e.answer_ids) for e in batch) / len(batch)
        model = lora.add_lora(load_base(gguf, base_manifest.sha256, cache), LoraConfig())
        model.train()
        full = statistics.median(step_times(model, batch, "full", False, args.timing_steps))
        answer_only = statistics.median(step_times(model, batch, "answer", False, args.timing_steps))
        ours = statistics.median(step_times(model, batch, "answer", True, args.timing_steps))
        rows.append((task.name, tokens, answer, lora.shared_prefix(batch), full, answer_only, ours))
        del model
    print(
        "\n| task | tokens/seq | answer tokens | shared prefix | full logits s/step | answer-only s/step "
        "| + shared prefix (train lora) s/step | speed-up vs full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, tokens, answer, shared, full, answer_only, ours in rows:
        print(
            f"| {name} | {tokens:.0f} | {answer:.0f} | {shared} | {full:.2f} | {answer_only:.2f} "
            f"({full / answer_only:.2f}x) | {ours:.2f} | {full / ours:.2f}x |"
        )

    # 2 + 3. train on the generated task, convert, parity, eval
    data = examples(ship, shipments(args.examples, seed=7), tok)
    train_set = [e for e in data if e.split == "train"]
    val_set = [e for e in data if e.split == "val"]
    test_set = [e for e in data if e.split == "test"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        config = LoraConfig(max_steps=args.steps, eval_every=5)
        started = time.perf_counter()
        result, _ = lora.train(
            load_base(gguf, base_manifest.sha256, cache),
            train_set,
            val_set,
            run,
            config,
            dataset_sha256="bench",
        )
        trained_s = time.perf_counter() - started
        convert_peft_adapter(run / "peft", gguf, run / "adapter.gguf")
        parity = check_parity(
            gguf,
            run / "adapter.gguf",
            [(e.prompt_ids, e.answer_ids) for e in lora.eval_set(train_set, val_set, config)],
            result.best_val_loss,
            0.1,
            result.base_val_loss,
        )
        print(
            f"\ntrained {result.steps} steps on {len(train_set)} examples in {trained_s:.0f}s "
            f"({result.seconds_per_step:.2f} s/step)"
        )
        print("\n| val loss | PEFT (dequantized weights) | llama.cpp (GGUF) | abs diff |")
        print("|---|---|---|---|")
        print(
            f"| base | {parity.base_peft_loss:.4f} | {parity.base_llama_loss:.4f} | "
            f"{abs(parity.base_peft_loss - parity.base_llama_loss):.4f} |"
        )
        print(
            f"| base + adapter | {parity.peft_loss:.4f} | {parity.llama_loss:.4f} | {parity.difference:.4f} |"
        )
        results = run_candidates(
            ship,
            test_set,
            [
                Candidate(name="base", kind="base", model_path=gguf, size_bytes=base_manifest.size),
                Candidate(
                    name="base + adapter",
                    kind="adapter",
                    model_path=gguf,
                    adapter_path=run / "adapter.gguf",
                    size_bytes=base_manifest.size + (run / "adapter.gguf").stat().st_size,
                ),
            ],
        )
    print(f"\n| {len(test_set)} held-out examples | exact match | field F1 | valid | p50 ms |")
    print("|---|---|---|---|---|")
    for r in results:
        m = r.metrics
        print(
            f"| {r.name} | {m.exact_match:.2f} | {m.f1:.2f} | {m.valid_rate:.2f} | {m.latency_ms_p50:.0f} |"
        )
    print(json.dumps({"step_time": rows, "parity": parity.model_dump()}, default=str))


if __name__ == "__main__":
    main()
