"""Tokenize training data exactly as the daemon does when it serves the adapter.

The daemon feeds llama.cpp ``tokenize(prefix, bos, special) + tokenize(body, special)`` and then
samples the answer token by token. transformers' tokenizer derived from the same GGUF splits some
text differently, so training on its ids would teach the adapter sequences it never sees.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from slm_agent.contracts.tasks import Task
from slm_agent.models import llama_log


class ServingTokenizer:
    """llama.cpp's tokenizer for one GGUF, loaded without weights (vocab_only)."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = Path(model_path)

    @cached_property
    def _model(self) -> Any:
        # The model object Llama.tokenize delegates to, without a context (which needs weights).
        # llama_cpp is imported here, on first use: loading libllama costs ~0.1 s.
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        llama_log.install()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        return LlamaModel(path_model=str(self.model_path), params=params, verbose=False)

    @property
    def eos(self) -> int:
        return int(self._model.token_eos())

    def tokenize(self, text: str, *, bos: bool = False, special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def prompt(self, prefix: str, body: str) -> list[int]:
        """The prompt's ids as runtime.engine.Engine.prepare builds them."""
        return self.tokenize(prefix, bos=True) + (self.tokenize(body) if body else [])

    def answer(self, text: str, *, eos: bool) -> list[int]:
        # The answer is model output, never parsed for special tokens.
        ids = self.tokenize(text, special=False)
        return [*ids, self.eos] if eos else ids

    def detokenize(self, ids: list[int]) -> str:
        return bytes(self._model.detokenize(ids)).decode("utf-8", errors="replace")


def answer_text(task: Task, label: str) -> tuple[str, bool]:
    """The exact text the served model emits for ``label``, and whether it ends with EOS.

    JSON grammars start at "{" with no space; label grammars allow the space the base model puts
    after "Output:"; structured answers end at the "\\n" stop string, free text at EOS.
    """
    if task.kind in ("json", "tool_call"):
        return label + "\n", False
    if task.kind == "label":
        return " " + label + "\n", False
    return " " + label, True
