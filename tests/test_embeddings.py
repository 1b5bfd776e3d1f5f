"""/v1/embeddings on a real daemon with the int8 encoder, through the official openai client; an
unknown model id passed through to a real remote (llama-cpp-python's server in embedding mode)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import Daemon, free_port
from remote_fixtures import provider, remote_env, start_daemon, stop_process

from slm_agent.models import ModelStore
from slm_agent.models.encoder import Encoder

LOCAL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embedding_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real remote that serves /v1/embeddings: llama-cpp-python's server with --embedding."""
    import subprocess
    import sys
    import time

    port = free_port()
    log_path = tmp_path_factory.mktemp("embedding-server") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--embedding", "true",
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
    shared_store: ModelStore,
    int8_encoder: Encoder,
    embedding_server: str,
) -> Iterator[Daemon]:
    env = {
        "SLM_AGENT_ENCODER_DIR": str(int8_encoder.folder),
        **remote_env([provider("embedder", embedding_server, ["text-embedding-3-small"])]),
    }
    d = start_daemon(tmp_path_factory.mktemp("embeddings-home"), shared_store, env)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_single_input(client: openai.OpenAI, int8_encoder: Encoder) -> None:
    result = client.embeddings.create(model=LOCAL, input="The cat sat on the mat.", encoding_format="float")
    assert result.model == LOCAL and len(result.data) == 1
    vector = np.array(result.data[0].embedding)
    assert vector.shape == (int8_encoder.dim,)
    assert abs(np.linalg.norm(vector) - 1) < 1e-4
    assert result.usage.prompt_tokens == result.usage.total_tokens == 9  # [CLS] + 7 tokens + [SEP]


def test_batch_keeps_order_and_ranks_paraphrases(client: openai.OpenAI) -> None:
    texts = [
        "How do I reset my password?",
        "I forgot my password and need to change it.",
        "The weather in Lisbon is sunny today.",
    ]
    result = client.embeddings.create(model=LOCAL, input=texts, encoding_format="float")
    assert [d.index for d in result.data] == [0, 1, 2]
    rows = np.array([d.embedding for d in result.data])
    paraphrase, unrelated = rows[0] @ rows[1], rows[0] @ rows[2]
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)
    # Alone or in a batch, the same text embeds (nearly) the same: padding is masked out of the
    # mean, but int8 dynamic quantization takes its activation range over the whole batch.
    alone = np.array(
        client.embeddings.create(model=LOCAL, input=texts[2], encoding_format="float").data[0].embedding
    )
    assert alone @ rows[2] > 0.99


def test_base64_is_the_float32_bytes(client: openai.OpenAI, daemon: Daemon) -> None:
    floats = (
        client.embeddings.create(model=LOCAL, input="hello world", encoding_format="float").data[0].embedding
    )
    with daemon.client() as http:
        raw = http.post(
            "/v1/embeddings", json={"model": LOCAL, "input": ["hello world"], "encoding_format": "base64"}
        ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats, atol=1e-6)
    # The SDK decodes base64 itself (its default when numpy is installed).
    assert np.allclose(
        client.embeddings.create(model=LOCAL, input="hello world").data[0].embedding, floats, atol=1e-6
    )


def test_refusals_say_what_to_send(daemon: Daemon, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model=LOCAL, input=[[101, 7592, 102]])
    assert tokens.value.body["param"] == "input" and "token arrays" in tokens.value.body["message"]
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=LOCAL, input="x", dimensions=128)
    assert dims.value.body["param"] == "dimensions" and "384" in dims.value.body["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="text-embedding-ada-002", input="x")
    assert "all-minilm-l6-v2" in unknown.value.body["message"]


def test_listed_and_counted_not_traced(daemon: Daemon, client: openai.OpenAI) -> None:
    client.embeddings.create(model=LOCAL, input=["a", "b"], encoding_format="float")
    cards = {m.id: m for m in client.models.list().data}
    assert cards[LOCAL].model_extra and cards[LOCAL].model_extra["kind"] == "embedding"
    with daemon.client() as http:
        metrics = http.get("/metrics").text
    assert 'slm_embedding_requests_total{route="local",status="200"}' in metrics
    assert 'slm_embedding_inputs_total{route="local"}' in metrics
    assert daemon.query("SELECT count(*) FROM traces")[0][0] == 0


def test_unknown_model_passes_through_to_the_remote(client: openai.OpenAI) -> None:
    result = client.embeddings.create(
        model="text-embedding-3-small", input=["first text", "second text"], encoding_format="float"
    )
    assert len(result.data) == 2 and result.data[0].embedding


def test_no_encoder_is_a_clear_503(make_daemon: object) -> None:
    daemon = make_daemon()  # type: ignore[operator]
    with daemon.client() as http:
        response = http.post("/v1/embeddings", json={"model": LOCAL, "input": "x"})
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert response.status_code == 503
    assert "encoder" in response.json()["error"]["message"]
    assert LOCAL not in ids
