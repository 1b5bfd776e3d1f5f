"""Task names for discovered clusters: the words most distinctive of a cluster."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from slm_agent.contracts.tasks import TASK_NAME_RE, builtin_tasks
from slm_agent.train.data.contract import is_tool_call


class TaskNames:
    """Names from the words most distinctive of a cluster against the rest (document frequency
    inside minus outside), unique across proposals and clear of built-in tasks.

    A trace's words are its input's plus its answer's structure (JSON keys, the tool called):
    templated inputs share few words, while one task's answers share their whole shape.
    """

    def __init__(self, inputs: list[str], answers: list[Any]) -> None:
        self.words = [
            list(dict.fromkeys(_words(text) + _words(" ".join(_structure(answer)))))
            for text, answer in zip(inputs, answers, strict=True)
        ]
        self.builtin = {t.name for t in builtin_tasks()}
        self.used: set[str] = set()

    def suggest(self, members: list[int], existing: str | None) -> tuple[str, list[str]]:
        member_set = set(members)
        inside = Counter(w for i in members for w in self.words[i])  # first-seen order breaks ties
        outside = Counter(w for i, ws in enumerate(self.words) if i not in member_set for w in ws)
        n_in, n_out = len(members), max(len(self.words) - len(members), 1)
        scores = {w: inside[w] / n_in - outside[w] / n_out for w in inside if inside[w] / n_in >= 0.2}
        keywords = [w for w in sorted(scores, key=lambda w: -scores[w]) if scores[w] > 0][:5]
        # Traces that already carry a task name keep it (even a built-in's): that task is what they are.
        if existing and TASK_NAME_RE.match(existing) and existing not in self.used:
            self.used.add(existing)
            return existing, keywords
        taken = self.used | self.builtin
        candidates = ["-".join(keywords[:2])] if keywords else []
        candidates += ["-".join(keywords[:3])] if len(keywords) > 2 else []
        base = next((c for c in candidates if c not in taken), candidates[0] if candidates else "task")
        name, n = base, 2
        while name in taken or not TASK_NAME_RE.match(name):
            name, n = f"{base[:56]}-{n}", n + 1
        self.used.add(name)
        return name, keywords


def _structure(answer: Any) -> list[str]:
    if is_tool_call(answer):
        return [str(answer["name"]).replace("_", " ")]
    return [str(k).replace("_", " ") for k in answer] if isinstance(answer, dict) else []


_STOP_WORDS: frozenset[str] | None = None


def _words(text: str) -> list[str]:
    global _STOP_WORDS
    if _STOP_WORDS is None:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        _STOP_WORDS = frozenset(ENGLISH_STOP_WORDS)
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    # Words of letters only: numbers, ids and e-mail hosts vary per request and name nothing.
    return [w for w in re.findall(r"(?<![\w@.])[a-z]{3,}(?![\w@])", ascii_text) if w not in _STOP_WORDS]
