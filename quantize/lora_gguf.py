"""PEFT LoRA adapter (safetensors) -> GGUF LoRA adapter that llama.cpp loads.

llama.cpp's layout: ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``;
per target tensor ``<gguf base name>.lora_a`` shaped like PEFT's ``lora_A`` (r x in) and
``.lora_b`` (out x r). llama.cpp scales by alpha / r like PEFT, so alpha carries over as is.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from slm_agent.errors import BadRequestError
from slm_agent.models.gguf_info import read_header

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class ConvertedAdapter(BaseModel):
    path: str
    architecture: str
    rank: int
    alpha: float
    tensors: int
    size: int


def _arch_enum(arch: str) -> object:
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise BadRequestError(f"the gguf package knows no architecture {arch!r}; cannot name its tensors")
    return by_name[arch]


def convert_peft_adapter(peft_dir: Path, base_gguf: Path, out: Path) -> ConvertedAdapter:
    """Write ``out`` from the adapter in ``peft_dir``; every tensor is checked against the base."""
    import gguf
    from safetensors.numpy import load_file

    peft_dir = Path(peft_dir)
    config_path = peft_dir / "adapter_config.json"
    weights_path = peft_dir / "adapter_model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise BadRequestError(
            f"{peft_dir} is not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)"
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise BadRequestError(f"only LoRA adapters convert to GGUF, not {config.get('peft_type')}")
    if config.get("use_rslora") or config.get("use_dora"):
        raise BadRequestError("rsLoRA and DoRA adapters have no GGUF form llama.cpp loads; train plain LoRA")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    header = read_header(Path(base_gguf))
    arch = str(header.fields["general.architecture"])
    n_blocks = int(header.fields.get(f"{arch}.block_count", 0))
    names = gguf.get_tensor_name_map(_arch_enum(arch), n_blocks)  # type: ignore[arg-type]
    shapes = {name: dims for name, (dims, _, _) in header.tensors.items()}

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(weights_path)).items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise BadRequestError(
                f"unexpected tensor {key!r} in the PEFT adapter (only lora_A/lora_B convert)"
            )
        target = names.get_name(match["module"] + ".weight", try_suffixes=(".weight",))
        if target is None or target not in shapes:
            raise BadRequestError(f"adapter tensor {key!r} has no counterpart in the base model {base_gguf}")
        pairs.setdefault(target, {})[match["ab"]] = value.astype(np.float32)

    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for target in sorted(pairs):
            a, b = pairs[target].get("A"), pairs[target].get("B")
            if a is None or b is None:
                raise BadRequestError(f"adapter tensor {target} has only one of lora_A/lora_B")
            n_in, n_out = shapes[target]
            if a.shape != (rank, n_in) or b.shape != (n_out, rank):
                raise BadRequestError(
                    f"adapter tensor {target}: lora_A {a.shape} / lora_B {b.shape} do not fit the base's "
                    f"({n_out} x {n_in}) at rank {rank}"
                )
            writer.add_tensor(f"{target}.lora_a", a)
            writer.add_tensor(f"{target}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ConvertedAdapter(
        path=str(out),
        architecture=arch,
        rank=rank,
        alpha=alpha,
        tensors=2 * len(pairs),
        size=out.stat().st_size,
    )
