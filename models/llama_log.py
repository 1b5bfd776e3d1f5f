"""llama.cpp's log, routed to Python logging at the level llama.cpp meant.

llama-cpp-python's own handler maps ggml's levels off by one, so with ``verbose=False`` every
warning still reaches stderr raw, e.g. one "cannot use buft 'CPU_REPACK'" line per LoRA tensor on
each adapter load. Here warnings go to the ``llama.cpp`` logger at INFO: llama.cpp warns about
routine fallbacks on every load, while real failures also come back as errors and return codes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("llama.cpp")

# enum ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the last line
GGML_ERROR = 4
_CONTINUATION = 5
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}

Listener = Callable[[int, str], None]
"""Called with (ggml level, line) for every complete line llama.cpp logs."""

_state: dict[str, Any] = {"callback": None, "level": 0, "pending": "", "listeners": []}


def _handle(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # An exception must not cross back into C.
    try:
        if level != _CONTINUATION:
            _state["level"] = level
        _state["pending"] += text.decode("utf-8", errors="replace")
        if "\n" in _state["pending"]:
            *done, _state["pending"] = _state["pending"].split("\n")
            for line in done:
                if line.strip():
                    log.log(_LEVELS.get(_state["level"], logging.DEBUG), "%s", line)
                    for listener in _state["listeners"]:
                        listener(_state["level"], line)
    except Exception:
        pass


def install() -> None:
    """Route llama.cpp's log through :data:`log` (idempotent; call before loading a model)."""
    import llama_cpp  # here, not at the top: only code about to load a model pays for libllama

    if _state["callback"] is None:
        _state["callback"] = llama_cpp.llama_log_callback(_handle)  # kept referenced: C holds it
    llama_cpp.llama_log_set(_state["callback"], ctypes.c_void_p(0))


@contextlib.contextmanager
def capture(listener: Listener) -> Iterator[None]:
    """Also hand every llama.cpp log line to ``listener`` while the block runs (e.g. progress)."""
    install()
    _state["listeners"].append(listener)
    try:
        yield
    finally:
        _state["listeners"].remove(listener)
