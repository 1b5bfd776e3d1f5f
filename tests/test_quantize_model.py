"""Re-quantizing the real bundled GGUF with llama.cpp's quantizer, and ``slm-agent quantize model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slm_agent import locations
from slm_agent.errors import BadRequestError, ConflictError, ModelStoreError, NotFoundError
from slm_agent.models import BUNDLED_NAME, ModelStore
from slm_agent.models.gguf_info import read_info
from slm_agent.models.hashing import sha256_file
from slm_agent.quantize.cli import output_name, quantize
from slm_agent.quantize.model import QUANT_TYPES, QuantizeResult, ftype_of, quantize_model


@pytest.fixture(scope="module")
def q8(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[QuantizeResult, list[tuple[int, int]]]:
    steps: list[tuple[int, int]] = []
    dst = tmp_path_factory.mktemp("q8") / "gemma-q8_0.gguf"
    result = quantize_model(model_path, dst, "q8_0", threads=2, on_progress=lambda d, t: steps.append((d, t)))
    return result, steps


def test_requantizes_the_bundled_model_to_q8_0(
    model_path: Path, q8: tuple[QuantizeResult, list[tuple[int, int]]]
) -> None:
    result, steps = q8
    out = Path(result.output)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left beside it
    info = read_info(out)
    assert info.file_type == result.file_type == result.qtype == "Q8_0"
    assert info.architecture == read_info(model_path).architecture == result.architecture == "gemma3"
    assert info.tensor_count == read_info(model_path).tensor_count
    assert result.source_bytes == model_path.stat().st_size
    assert result.output_bytes == out.stat().st_size > result.source_bytes  # 8 bits > ~4.5 bits a weight
    assert result.sha256 == sha256_file(out)
    assert result.seconds > 0
    assert steps and steps[-1][0] == steps[-1][1] == info.tensor_count


def test_quantized_model_generates(q8: tuple[QuantizeResult, list[tuple[int, int]]]) -> None:
    from llama_cpp import Llama

    llm = Llama(q8[0].output, n_ctx=128, n_threads=2, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0, stream=False)
    assert isinstance(out, dict) and out["choices"][0]["text"].strip()


def test_type_names() -> None:
    assert ftype_of("Q4_K_M") == ftype_of("q4_k_m") == ftype_of(" q4_k_m ")
    assert len({ftype_of(t) for t in QUANT_TYPES}) == len(QUANT_TYPES)
    with pytest.raises(
        BadRequestError, match="unknown quantization type 'Q9_9'; valid types: F16, BF16, Q8_0"
    ):
        ftype_of("Q9_9")
    with pytest.raises(BadRequestError, match="unknown quantization type"):
        ftype_of("IQ2_XS")  # needs an importance matrix: not offered
    assert output_name("gemma-3-270m-q4_k_m", "Q8_0") == "gemma-3-270m-q8_0.gguf"
    assert output_name("qwen2.5-0.5b-instruct-f16.gguf", "Q4_K_M") == "qwen2.5-0.5b-instruct-q4_k_m.gguf"


def test_bad_sources(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        quantize_model(tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q8_0")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ModelStoreError, match="not a GGUF file"):
        quantize_model(not_gguf, tmp_path / "out.gguf", "Q8_0")
    with pytest.raises(BadRequestError, match="valid types"):
        quantize_model(model_path, tmp_path / "out.gguf", "Q7")
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"x")
    with pytest.raises(ConflictError, match="--force"):
        quantize_model(model_path, existing, "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf", "notes.gguf"]


def test_llama_cpp_failure_leaves_nothing(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ModelStoreError, match=r"requantizing from type \w+ is disabled"):
        quantize_model(model_path, tmp_path / "out.gguf", "Q8_0", allow_requantize=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_type() -> None:
    result = CliRunner().invoke(quantize, ["model", BUNDLED_NAME, "--type", "Q9"])
    assert result.exit_code == 1
    assert "unknown quantization type 'Q9'" in result.output and "Q4_K_M" in result.output


def test_cli_quantizes_a_store_model_into_the_store(model_path: Path) -> None:
    store = ModelStore(locations.default_store_dir())  # under this test's SLM_AGENT_HOME
    store.add(model_path, name=BUNDLED_NAME, origin="bundled")
    result = CliRunner().invoke(
        quantize, ["model", BUNDLED_NAME, "--type", "q8_0", "--add", "gemma-q8", "--threads", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["added"] == "gemma-q8" and data["file_type"] == "Q8_0"
    manifest = store.get("gemma-q8")
    assert manifest.file_type == "Q8_0" and manifest.sha256 == data["sha256"]
    assert manifest.prompt_format == store.get(BUNDLED_NAME).prompt_format
    assert sorted(p.name for p in store.root.iterdir()) == [BUNDLED_NAME, "gemma-q8"]  # staging removed
