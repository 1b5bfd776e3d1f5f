"""Read and check GGUF headers without loading weights: metadata, tensor table, completeness."""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_agent.errors import ModelStoreError
from slm_agent.models.manifest import ChatTemplate, GGUFInfo

GGUF_MAGIC = b"GGUF"


# GGUF value types -> struct format (8 = string, 9 = array are handled apart).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (the tokenizer's 262k-entry vocab) are skipped unless a caller names them.
_MAX_DECODED_ARRAY = 64
_TOKENS = "tokenizer.ggml.tokens"


@dataclass
class GGUFHeader:
    fields: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (shape in GGUF order, ggml type, offset)
    data_start: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as exc:
            raise ModelStoreError(f"{self.path} is truncated inside its GGUF header") from exc
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelStoreError(f"{self.path} is truncated inside its GGUF header")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, whole: bool = False) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if whole or count <= _MAX_DECODED_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ModelStoreError(f"{self.path} has an unknown GGUF value type {vtype}: corrupt header")


def read_header(path: Path, arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    """Parse a GGUF header (fields and tensor table) without the weights, in milliseconds.

    The ``gguf`` package's reader decodes every tokenizer entry (seconds for a 262k vocab);
    this parser skips long arrays other than the ``arrays`` named.
    """
    path = Path(path)
    with path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelStoreError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.take("<I")
            if version not in (2, 3):
                raise ModelStoreError(
                    f"{path} is GGUF version {version}; only versions 2 and 3 are supported"
                )
            n_tensors, n_fields = cur.take("<Q"), cur.take("<Q")
            fields = {}
            for _ in range(n_fields):
                key = cur.string()
                fields[key] = cur.value(cur.take("<I"), whole=key in arrays)
            tensors = {}
            for _ in range(n_tensors):
                name = cur.string()
                dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
                tensors[name] = (dims, cur.take("<I"), cur.take("<Q"))
            align = int(fields.get("general.alignment") or 32)
            data_start = (cur.pos + align - 1) // align * align
    header = GGUFHeader(fields=fields, tensors=tensors, data_start=data_start)
    _check_complete(path, header)
    return header


def _check_complete(path: Path, header: GGUFHeader) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    end = header.data_start
    for name, (dims, ggml_type, offset) in header.tensors.items():
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as exc:
            raise ModelStoreError(
                f"{path}: tensor {name} has unknown type {ggml_type}: corrupt file"
            ) from exc
        n = 1
        for d in dims:
            n *= d
        end = max(end, header.data_start + offset + n * type_size // block)
    size = path.stat().st_size
    if end > size:
        raise ModelStoreError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; download or copy it again"
        )


def read_info(path: Path) -> GGUFInfo:
    """Return the header metadata of a GGUF file, refusing anything that is not a whole GGUF."""
    from gguf.constants import LlamaFileType

    header = read_header(path)
    fields = header.fields
    arch = fields.get("general.architecture")
    if not arch:
        raise ModelStoreError(f"{path} has no general.architecture: not a model or adapter GGUF")
    file_type = fields.get("general.file_type")
    file_type_name = None
    if file_type is not None:
        try:
            file_type_name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type_name = str(file_type)
    rank = next((dims[1] for name, (dims, _, _) in header.tensors.items() if name.endswith(".lora_a")), None)

    def arch_key(suffix: str) -> Any:
        return fields.get(f"{arch}.{suffix}")

    return GGUFInfo(
        architecture=str(arch),
        file_type=file_type_name,
        tensor_count=len(header.tensors),
        context_length=arch_key("context_length"),
        general_type=fields.get("general.type"),
        name=fields.get("general.name"),
        lora_alpha=fields.get("adapter.lora.alpha"),
        lora_rank=rank,
        block_count=arch_key("block_count"),
        embedding_length=arch_key("embedding_length"),
        head_count=arch_key("attention.head_count"),
        head_count_kv=arch_key("attention.head_count_kv"),
        key_length=arch_key("attention.key_length"),
        value_length=arch_key("attention.value_length"),
    )


def read_chat_template(path: Path) -> ChatTemplate | None:
    """The GGUF's ``tokenizer.chat_template`` with its BOS and EOS token texts; None when it has none."""
    source = read_header(path).fields.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source.strip():
        return None
    # Decoding the vocabulary costs a few hundred ms: only for a model that has a template.
    fields = read_header(path, arrays=frozenset({_TOKENS})).fields
    tokens = fields.get(_TOKENS) or []

    def token(key: str) -> str:
        index = fields.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    return ChatTemplate(
        source=source,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        # When the key is absent llama.cpp adds BOS for SentencePiece ("llama") vocabularies only.
        add_bos=bool(
            fields.get("tokenizer.ggml.add_bos_token", fields.get("tokenizer.ggml.model") == "llama")
        ),
    )


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    stat = Path(path).stat()
    return dict(_tensor_shapes(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _tensor_shapes(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, ...]]:
    """Cached per file version: every adapter a daemon loads on first use is checked against the
    same base, whose header (a 262k-entry vocabulary to step over) takes ~0.2 s to read."""
    return {name: dims for name, (dims, _, _) in read_header(Path(path)).tensors.items()}


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
        if (
            len(w_shape) != 2
            or a_shape[0] != w_shape[0]
            or b_shape[1] != w_shape[1]
            or a_shape[1] != b_shape[0]
        ):
            raise ModelStoreError(
                f"adapter {adapter_path.name}: {target} lora_a {list(a_shape)} / lora_b {list(b_shape)} "
                f"do not fit the base tensor {list(w_shape)}"
            )
        pairs += 1
    if pairs == 0:
        raise ModelStoreError(f"adapter {adapter_path.name} has no lora_a/lora_b tensor pairs")
