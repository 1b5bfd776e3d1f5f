"""Read and check GGUF headers with the ``gguf`` package, without loading weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_agent.errors import ModelStoreError
from slm_agent.models.manifest import GGUFInfo

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorShape:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (input dim) first


def _reader(path: Path) -> Any:
    import gguf  # imported lazily: numpy + gguf cost ~100 ms that the daemon's fast path does not need

    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelStoreError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises ValueError, IndexError, struct errors...
        raise ModelStoreError(f"{path} is not a readable GGUF file (truncated or corrupt header): {exc}") from exc
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelStoreError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
            "download or copy it again"
        )
    return reader


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:
        return None


def read_info(path: Path) -> GGUFInfo:
    """Return the header metadata of a GGUF file, refusing anything that is not a whole GGUF."""
    import gguf

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelStoreError(f"{path} has no general.architecture: not a model or adapter GGUF")
    file_type = _field(reader, "general.file_type")
    file_type_name = None
    if file_type is not None:
        try:
            file_type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type_name = str(file_type)
    rank = None
    for tensor in reader.tensors:
        if tensor.name.endswith(".lora_a"):
            rank = int(tensor.shape[1])
            break

    def arch_key(suffix: str) -> Any:
        return _field(reader, f"{arch}.{suffix}")

    return GGUFInfo(
        architecture=str(arch),
        file_type=file_type_name,
        tensor_count=len(reader.tensors),
        context_length=arch_key("context_length"),
        general_type=_field(reader, "general.type"),
        name=_field(reader, "general.name"),
        lora_alpha=_field(reader, "adapter.lora.alpha"),
        lora_rank=rank,
        block_count=arch_key("block_count"),
        embedding_length=arch_key("embedding_length"),
        head_count=arch_key("attention.head_count"),
        head_count_kv=arch_key("attention.head_count_kv"),
        key_length=arch_key("attention.key_length"),
        value_length=arch_key("attention.value_length"),
    )


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    reader = _reader(path)
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


def is_adapter(info: GGUFInfo) -> bool:
    return info.general_type == "adapter" or info.lora_rank is not None


def check_adapter_fits(adapter_path: Path, adapter: GGUFInfo, base_path: Path, base: GGUFInfo) -> None:
    """Refuse an adapter whose architecture or tensor shapes do not match the base model.

    A LoRA pair for base weight W (GGUF shape [in, out]) is lora_a [in, r] and lora_b [r, out].
    """
    if adapter.architecture != base.architecture:
        raise ModelStoreError(
            f"adapter {adapter_path.name} is for architecture {adapter.architecture!r}, "
            f"but the base model is {base.architecture!r}"
        )
    base_shapes = tensor_shapes(base_path)
    adapter_shapes = tensor_shapes(adapter_path)
    pairs = 0
    for name, a_shape in adapter_shapes.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        b_shape = adapter_shapes.get(target + ".lora_b")
        if b_shape is None:
            raise ModelStoreError(f"adapter {adapter_path.name}: {target}.lora_a has no matching lora_b")
        w_shape = base_shapes.get(target)
        if w_shape is None:
            raise ModelStoreError(
                f"adapter {adapter_path.name} targets tensor {target!r}, which the base model does not have"
            )
        if len(w_shape) != 2 or a_shape[0] != w_shape[0] or b_shape[1] != w_shape[1] or a_shape[1] != b_shape[0]:
            raise ModelStoreError(
                f"adapter {adapter_path.name}: {target} lora_a {list(a_shape)} / lora_b {list(b_shape)} "
                f"do not fit the base tensor {list(w_shape)}"
            )
        pairs += 1
    if pairs == 0:
        raise ModelStoreError(f"adapter {adapter_path.name} has no lora_a/lora_b tensor pairs")
