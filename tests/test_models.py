"""The model store: add, inspect, verify, remove; refusing bad files with clear messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from lora import make_lora

from slm_agent.cli import main as cli
from slm_agent.errors import (
    ConflictError,
    InsufficientMemoryError,
    ModelStoreError,
    NotFoundError,
    OfflineError,
)
from slm_agent.models import BUNDLED_NAME, ModelKind, ModelStore, estimate
from slm_agent.models.hub import download
from slm_agent.models.memory import ensure_fits


@pytest.fixture
def store(tmp_path: Path, model_path: Path) -> ModelStore:
    """A private store holding (a hard link to) the bundled base model."""
    store = ModelStore(tmp_path / "store")
    store.add(model_path, name=BUNDLED_NAME, origin="test")
    return store


def test_bundled_model_is_assembled_and_verified(shared_store: ModelStore) -> None:
    manifest = shared_store.get(BUNDLED_NAME)
    assert manifest.kind is ModelKind.base
    assert manifest.architecture == "gemma3"
    assert manifest.file_type == "Q4_K_M"
    assert manifest.context_length == 32768
    assert manifest.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert manifest.prompt_format is not None
    assert shared_store.verify(BUNDLED_NAME) == (True, "ok")


def test_add_adapter_records_base_rank_and_alpha(store: ModelStore, model_path: Path, tmp_path: Path) -> None:
    path = make_lora(tmp_path / "extract-lora.gguf", model_path, rank=4, alpha=8)
    manifest = store.add(path, tasks=["extract"])
    assert manifest.kind is ModelKind.lora_adapter
    assert manifest.base == BUNDLED_NAME
    assert (manifest.lora_rank, manifest.lora_alpha) == (4, 8.0)
    assert manifest.tasks == ["extract"]
    assert [m.name for m in store.list(ModelKind.lora_adapter)] == ["extract-lora"]
    with pytest.raises(ConflictError, match="already in the store"):
        store.add(path)
    with pytest.raises(ConflictError, match="adapters extract-lora are built for it"):
        store.rm(BUNDLED_NAME)
    store.rm("extract-lora")
    with pytest.raises(NotFoundError, match="not in the store"):
        store.get("extract-lora")


def test_refuses_file_that_is_not_gguf(store: ModelStore, tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelStoreError, match="is not a GGUF file"):
        store.add(bogus)


def test_refuses_truncated_gguf(store: ModelStore, model_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(ModelStoreError, match="is truncated"):
        store.add(truncated)
    header_only = tmp_path / "header.gguf"
    with model_path.open("rb") as src, header_only.open("wb") as dst:
        dst.write(src.read(2000))
    with pytest.raises(ModelStoreError, match="truncated inside its GGUF header"):
        store.add(header_only)
    assert [m.name for m in store.list()] == [BUNDLED_NAME]


def test_refuses_adapter_for_another_architecture(
    store: ModelStore, model_path: Path, tmp_path: Path
) -> None:
    path = make_lora(tmp_path / "llama-lora.gguf", model_path, architecture="llama")
    with pytest.raises(ModelStoreError, match="no base model with architecture 'llama'"):
        store.add(path)
    with pytest.raises(ModelStoreError, match="is for architecture 'llama'"):
        store.add(path, base=BUNDLED_NAME)


def test_refuses_adapter_with_wrong_shapes(store: ModelStore, model_path: Path, tmp_path: Path) -> None:
    path = make_lora(tmp_path / "bad-shape.gguf", model_path, wrong_shape=True)
    with pytest.raises(ModelStoreError, match="do not fit the base tensor"):
        store.add(path)


def test_verify_detects_corruption(store: ModelStore, model_path: Path, tmp_path: Path) -> None:
    path = make_lora(tmp_path / "a.gguf", model_path)
    manifest = store.add(path)
    stored = store.path_of(manifest)
    stored.unlink()  # the store linked it; write a private corrupted copy
    shutil.copy(path, stored)
    with stored.open("r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"\xff" * 10)
    ok, message = store.verify("a")
    assert not ok and "sha256" in message


def test_memory_estimate_and_refusal(shared_store: ModelStore) -> None:
    manifest = shared_store.get(BUNDLED_NAME)
    small, large = estimate(manifest, 2048), estimate(manifest, 32768)
    assert small.weights_bytes == manifest.size
    assert large.kv_cache_bytes == 16 * small.kv_cache_bytes > 0
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* MiB but only 100 MiB"):
        ensure_fits(small.total_bytes, "gemma", limit_bytes=100 * 2**20)


def test_pull_offline_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache"):
        download("someone/some-model-GGUF:model.gguf", cache_dir=tmp_path)
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE is set"):
        download("someone/some-model-GGUF")
    with pytest.raises(ModelStoreError, match="expected HF_REPO"):
        download("not-a-repo")


def test_models_cli(
    shared_store: ModelStore, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = tmp_path / "cli-store"
    monkeypatch.setenv("SLM_AGENT_STORE_DIR", str(store_dir))
    ModelStore(store_dir).add(model_path, name=BUNDLED_NAME)
    runner = CliRunner()
    adapter = make_lora(tmp_path / "cli-lora.gguf", model_path)
    result = runner.invoke(cli, ["models", "add", str(adapter), "--name", "cli-lora", "--task", "extract"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["models", "list"])
    assert "cli-lora" in result.output and "lora-adapter" in result.output
    result = runner.invoke(cli, ["models", "inspect", BUNDLED_NAME, "--n-ctx", "8192"])
    assert result.exit_code == 0 and "kv_cache (n_ctx=8192)" in result.output
    result = runner.invoke(cli, ["models", "verify"])
    assert result.exit_code == 0 and result.output.count("ok") >= 2
    bogus = tmp_path / "bogus.gguf"
    bogus.write_text("hello")
    result = runner.invoke(cli, ["models", "add", str(bogus)])
    assert result.exit_code == 1 and "is not a GGUF file" in result.output
    result = runner.invoke(cli, ["models", "pull", "someone/x-GGUF:x.gguf"])
    assert result.exit_code == 1 and "Hugging Face cache" in result.output
    result = runner.invoke(cli, ["models", "rm", "cli-lora"])
    assert result.exit_code == 0 and "removed lora-adapter cli-lora" in result.output


def test_offline_is_honoured_even_if_the_hub_library_was_imported_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants, file_download

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub was asked while HF_HUB_OFFLINE is set")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported before the variable was set
    monkeypatch.setattr(file_download, "get_hf_file_metadata", no_network)
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache"):
        download("someone/some-model-GGUF:model.gguf", cache_dir=tmp_path)
