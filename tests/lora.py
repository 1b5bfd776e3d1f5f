"""Real GGUF LoRA adapters for tests, written with the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_lora(
    path: Path,
    base_path: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 8.0,
    layers: tuple[int, ...] = (0, 1, 2, 3),
    targets: tuple[str, ...] = ("attn_q", "ffn_down"),
    std: float = 0.05,
    architecture: str | None = None,
    wrong_shape: bool = False,
) -> Path:
    """Write a random LoRA adapter for the base model at ``base_path``.

    Shapes follow the base tensors: lora_a is (rank x in), lora_b is (out x rank) in numpy order.
    """
    import gguf

    from slm_agent.models.gguf_info import read_header

    header = read_header(base_path)
    arch = architecture or str(header.fields["general.architecture"])
    shapes = {name: dims for name, (dims, _, _) in header.tensors.items()}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for layer in layers:
        for target in targets:
            name = f"blk.{layer}.{target}.weight"
            n_in, n_out = shapes[name]
            if wrong_shape:
                n_in += 1
            writer.add_tensor(f"{name}.lora_a", rng.normal(0, std, (rank, n_in)).astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", rng.normal(0, std, (n_out, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
