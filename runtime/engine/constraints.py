"""What constrained output is sampled under: an llguidance grammar (token masks computed per step in
microseconds), or a llama.cpp GBNF grammar for the few schemas llguidance cannot express.

Schemas are tightened first, the way agents expect tool calls to behave (OpenAI strict style):
objects that list properties are closed, and strings, numbers and arrays get upper bounds, so a
model stuck in a loop ends a value instead of running to ``max_tokens``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

from slm_agent.errors import SchemaError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

ConstraintEngine = Literal["llguidance", "gbnf"]

# Bounds added where a schema sets none. A value longer than these is a loop, not an answer.
MAX_STRING_CHARS = 512
MAX_ARRAY_ITEMS = 64
MAX_INTEGER = 10**15
NUMBER_STEP = 1e-6  # at most six decimals
# Larger schemas are refused outright: compiling one would hold a request thread for seconds.
MAX_SCHEMA_CHARS = 256 * 1024

# One spelling of JSON: json.dumps's separators, no other whitespace. Training labels are written
# with json.dumps, and fixed separators leave more text to fast-forward.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    # Tool calls are a oneOf over distinct names; anyOf is the same set and compiles without proof.
    "coerce_one_of": True,
}


class Constraint:
    """A compiled output constraint. ``llg`` is the llguidance grammar, None where only GBNF works;
    the GBNF grammar is built on first use (the engine falls back to it, or is set to use it)."""

    def __init__(self, key: str, llg: str | None, build_gbnf: Callable[[], Any]) -> None:
        self.key = key
        self.llg = llg
        self._build_gbnf = build_gbnf
        self._gbnf: Any = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> ConstraintEngine:
        return "llguidance" if self.llg is not None else "gbnf"

    def gbnf(self) -> Any:
        """The llama_cpp.LlamaGrammar for this constraint (raises SchemaError if it has none)."""
        with self._lock:
            if self._gbnf is None:
                self._gbnf = self._build_gbnf()
            return self._gbnf

    def __repr__(self) -> str:
        return f"Constraint({self.engine}, {self.key[:60]!r})"


def tighten(schema: Any) -> Any:
    """A copy of ``schema`` with closed objects and bounded strings, numbers and arrays."""
    if isinstance(schema, list):
        return [tighten(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _LITERAL_KEYS else tighten(v)) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out = _tighten_map(out, "properties")
    for key in ("$defs", "definitions", "patternProperties", "dependentSchemas"):
        if isinstance(out.get(key), dict):
            out = _tighten_map(out, key)
    if _typed(out, "object") and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if "enum" in out or "const" in out:
        return out
    if _typed(out, "string") and not {"maxLength", "format", "pattern"} & out.keys():
        out["maxLength"] = MAX_STRING_CHARS
    if _typed(out, "integer") or _typed(out, "number"):
        if not {"maximum", "exclusiveMaximum"} & out.keys():
            out["maximum"] = MAX_INTEGER
        if not {"minimum", "exclusiveMinimum"} & out.keys():
            out["minimum"] = -MAX_INTEGER
    if _typed(out, "number") and not _typed(out, "integer") and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP
    if _typed(out, "array") and "maxItems" not in out:
        out["maxItems"] = max(MAX_ARRAY_ITEMS, out.get("minItems", 0))
    return out


# Keys whose values are data or names, not subschemas: never rewritten.
_LITERAL_KEYS = frozenset(
    {"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"}
    | {"enum", "const", "default", "examples", "required", "description", "title"}
)


def _tighten_map(schema: dict[str, Any], key: str) -> dict[str, Any]:
    return {**schema, key: {name: tighten(sub) for name, sub in schema[key].items()}}


def _typed(schema: dict[str, Any], kind: str) -> bool:
    declared = schema.get("type")
    if declared is None:
        return kind == "object" and "properties" in schema
    return declared == kind or (isinstance(declared, list) and kind in declared)


def json_grammar(schema: dict[str, Any], options: dict[str, Any] = JSON_OPTIONS) -> str | None:
    """The llguidance grammar for ``schema``, None when it is not JSON llguidance can read. Not yet
    checked: building the engine's matcher checks it (a second pass here would double the cost)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides=cast("JsonCompileOptions", options)
        )
    except ValueError:
        return None


def json_rule(schema: dict[str, Any], options: dict[str, Any] = JSON_OPTIONS) -> str:
    """A Lark rule body matching ``schema``, spelled as ``json_grammar`` spells it."""
    return "%json " + json.dumps({**schema, "x-guidance": options})


def lark_grammar(lark: str, param: str = "response_format") -> str:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=limits())
    if error:
        raise SchemaError(f"this grammar cannot be compiled: {error}", param=param)
    return grammar


def check_size(schema: Any, param: str) -> str:
    """The canonical text of ``schema`` (the cache key); SchemaError when it is too large."""
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(key) > MAX_SCHEMA_CHARS:
        raise SchemaError(
            f"the JSON schema is {len(key) // 1024} KB; the limit is {MAX_SCHEMA_CHARS // 1024} KB. "
            "Send fewer tools or shorter descriptions",
            param=param,
        )
    return key


def limits() -> Any:
    """Parser limits: a schema past them fails to compile (and falls back) instead of stalling
    the engine on one token's mask."""
    import llguidance

    # Above the defaults for wide objects: a flat object of 1,100 optional properties needs twice
    # the initial lexer fuel (~40 ms, spent on the request's thread) and ~4,400 items in a row.
    return llguidance.LLParserLimits(
        max_items_in_row=10_000,
        initial_lexer_fuel=2_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_grammar_size=500_000,
    )
