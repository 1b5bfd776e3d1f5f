"""The base model's trainable weights: the very GGUF the daemon serves, dequantized once.

transformers reads GGUF weights correctly (same loss as llama.cpp) but slowly (~40 s for the
270M model, most of it parsing the 262k-entry vocabulary), so the dequantized model is cached as
safetensors next to the runs, keyed by the GGUF's sha256.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from slm_agent.atomic import replace_dir
from slm_agent.errors import BadRequestError

log = logging.getLogger(__name__)


def require_training_stack() -> None:
    """A clear error instead of an ImportError when the box lacks the `[train]` extra."""
    import importlib

    for module in ("torch", "transformers", "peft", "safetensors"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise BadRequestError(
                f"training needs {module}, which is not installed: pip install 'slm-agent[train]'",
                code="missing_dependency",
            ) from exc


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise BadRequestError("device=cuda was asked for, but torch sees no GPU", param="device")
    return wanted


def load_base(
    gguf_path: Path,
    sha256: str,
    cache_root: Path,
    *,
    hf_path: Path | None = None,
    qlora: bool = False,
    device: str = "cpu",
) -> Any:
    """A transformers causal LM with the base's weights (the HF original when given)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if qlora:
        if device != "cuda":
            raise BadRequestError("QLoRA (4-bit base) needs a CUDA GPU; train without --qlora on CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise BadRequestError(
                "QLoRA needs bitsandbytes on the GPU box: pip install bitsandbytes"
            ) from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["dtype"] = torch.bfloat16
    if hf_path is None:
        cache = cache_root / sha256[:16]
        if not (cache / "config.json").exists():
            _dequantize_to(gguf_path, cache)
    model = AutoModelForCausalLM.from_pretrained(str(hf_path or cache), **kwargs)
    # bitsandbytes places a 4-bit model itself
    return model if qlora else model.to(device)  # type: ignore[arg-type]


def _dequantize_to(gguf_path: Path, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s for training (once; cached in %s)", gguf_path.name, cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        raise BadRequestError(
            f"the base model {gguf_path.name} has no weights transformers can train ({exc}); train on a "
            "full GGUF of a supported architecture, or pass its Hugging Face original with --hf",
            code="no_training_weights",
        ) from exc
    tmp = cache.with_name(f".{cache.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    replace_dir(tmp, cache)
