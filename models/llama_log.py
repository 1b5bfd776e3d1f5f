"""llama.cpp's log, routed to Python logging at the level llama.cpp meant.

llama-cpp-python's own handler maps ggml's levels off by one, so with ``verbose=False`` every
warning still reaches stderr raw, e.g. one "cannot use buft 'CPU_REPACK'" line per LoRA tensor on
each adapter load. Here warnings go to the ``llama.cpp`` logger at INFO: llama.cpp warns about
routine fallbacks on every load, while real failures also come back as errors and return codes.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("llama.cpp")

# enum ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the last line
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}

_state: dict[str, Any] = {"callback": None, "level": logging.DEBUG, "pending": ""}


def _handle(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # An exception must not cross back into C.
    try:
        if level != 5:
            _state["level"] = _LEVELS.get(level, logging.DEBUG)
        _state["pending"] += text.decode("utf-8", errors="replace")
        if "\n" in _state["pending"]:
            *done, _state["pending"] = _state["pending"].split("\n")
            for line in done:
                if line.strip():
                    log.log(_state["level"], "%s", line)
    except Exception:
        pass


def install() -> None:
    """Route llama.cpp's log through :data:`log` (idempotent; call before loading a model)."""
    import llama_cpp

    if _state["callback"] is None:
        _state["callback"] = llama_cpp.llama_log_callback(_handle)  # kept referenced: C holds it
    llama_cpp.llama_log_set(_state["callback"], ctypes.c_void_p(0))
