"""Prompting a model with its own chat template, and reading its tool calls back as OpenAI's.

The template is the Jinja2 text in the GGUF (``tokenizer.chat_template``), rendered the way
llama.cpp's ``--jinja`` and transformers render it: in an immutable sandbox (a model file is
untrusted input), with ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps
non-ASCII text. A template without a tools block gets the tools in a system turn instead, in
the ``<tool_call>`` syntax SmolLM2 and Hermes-style models were trained on.
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slm_agent.contracts.api import ChatMessage, ToolCall, ToolCallFunction
from slm_agent.errors import BadRequestError, ModelStoreError
from slm_agent.models.manifest import ChatTemplate

# End-of-turn markers of the common template families; the ones a template uses end its answers.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>")

TOOLS_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions. Based on the question, you will need to make one or more function/tool calls to achieve the purpose. If none of the functions can be used, answer the question directly.

You have access to the following tools:
<tools>{tools}</tools>

To call tools, answer with only:
<tool_call>[{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}]</tool_call>"""

_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class _Raised(Exception):
    """A template's own ``raise_exception``: it refuses the conversation, not a broken template."""


def _raise_exception(message: str) -> NoReturn:
    raise _Raised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &), which models were never trained on.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ModelStoreError(f"the model's chat template does not compile: {exc}") from exc


def _render(
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    generation_prompt: bool,
) -> str:
    try:
        return _compiled(template.source).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=generation_prompt,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
        )
    except _Raised as exc:
        raise BadRequestError(
            f"the model's chat template refuses this conversation: {exc}", param="messages"
        ) from exc
    except jinja2.TemplateError as exc:  # a sandbox refusal (SecurityError) included
        raise ModelStoreError(f"the model's chat template cannot be rendered: {exc}") from exc


def render(
    template: ChatTemplate, messages: list[ChatMessage], tools: list[dict[str, Any]] | None
) -> tuple[str, str]:
    """The prompt as (cacheable prefix, body): the prefix is the leading system turns (and the
    tools, where the template puts them there) when the template renders them as the prompt's start."""
    turns = [_turn(m, native_calls="tool_calls" in template.source) for m in messages]
    if tools and "tools" not in template.source:
        turns = _with_tools_turn(turns, tools)
        tools = None
    prompt = _strip_bos(template, _render(template, turns, tools, generation_prompt=True))
    n_system = next((i for i, t in enumerate(turns) if t["role"] != "system"), len(turns))
    if n_system == 0:
        return "", prompt
    try:
        prefix = _strip_bos(template, _render(template, turns[:n_system], tools, generation_prompt=False))
    except (BadRequestError, ModelStoreError):
        return "", prompt  # some templates insist on a user turn; then nothing is cached apart
    if not prompt.startswith(prefix):
        return "", prompt
    return prefix, prompt[len(prefix) :]


def stop_strings(template: ChatTemplate) -> list[str]:
    """Where an answer ends: the template's end-of-turn markers and EOS, should the tokenizer not
    already stop there (llama.cpp stops at end-of-generation tokens by itself)."""
    stops = [m for m in END_OF_TURN if m in template.source]
    if template.eos_token and template.eos_token not in stops:
        stops.append(template.eos_token)
    return stops


def tool_calls(text: str, tools: list[dict[str, Any]] | None) -> list[ToolCall]:
    """The calls in a model's answer: ``<tool_call>`` blocks (one call or a list of them each),
    else an answer that is wholly a JSON call. Only calls to offered tools count; anything else
    is text."""
    offered = {(t.get("function") or t).get("name") for t in tools or []}
    blocks = _TAGGED_CALL.findall(text)
    if not blocks:
        stripped = text.strip()
        fenced = _FENCE.match(stripped)
        blocks = [fenced.group(1) if fenced else stripped]
    calls: list[ToolCall] = []
    for block in blocks:
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            continue
        for item in value if isinstance(value, list) else [value]:
            call = _call(item)
            if call is not None and call.function.name in offered:
                calls.append(call)
    return calls


def _call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # OpenAI's own shape, as some models echo it
        item = item["function"]
    name = item.get("name")
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(name, str):
        return None
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=ToolCallFunction(name=name, arguments=arguments))


def _turn(message: ChatMessage, *, native_calls: bool) -> dict[str, Any]:
    """A message as templates expect it (transformers' shape): text content, call arguments as objects."""
    turn: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": message.text(),
    }
    if message.tool_calls:
        calls = [_template_call(c) for c in message.tool_calls]
        if native_calls:
            turn["tool_calls"] = calls
        else:  # the template would drop them: write them as the model is told to call
            functions = [c["function"] for c in calls]
            turn["content"] = (turn["content"] + "\n" if turn["content"] else "") + (
                f"<tool_call>{_tojson(functions)}</tool_call>"
            )
    for key in ("tool_call_id", "name"):
        if getattr(message, key):
            turn[key] = getattr(message, key)
    return turn


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with suppress(json.JSONDecodeError):  # else templates print it as it came
            arguments = json.loads(arguments)
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": function.get("name"), "arguments": arguments},
    }


def _with_tools_turn(turns: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listed = "\n".join(_tojson(t.get("function", t)) for t in tools)
    text = TOOLS_PROMPT.format(tools=listed)
    if turns and turns[0]["role"] == "system":
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def _strip_bos(template: ChatTemplate, prompt: str) -> str:
    """The tokenizer adds BOS to the prompt itself when the model wants one: never twice."""
    if template.add_bos and template.bos_token and prompt.startswith(template.bos_token):
        return prompt[len(template.bos_token) :]
    return prompt
