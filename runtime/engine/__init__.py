"""The local engine: llama.cpp model and adapters, continuous batching, prefix cache, grammars."""

import os

# llama.cpp's CPU threads meet at a barrier after every operation, and OpenMP lets a thread that
# arrives first spin there for ~300k iterations. On a laptop another process holds a core now and
# then; the spinning thread then burns the core its partner needs. Measured here (2 cores, 2
# threads, one plain Python spin loop beside): decode fell to 0.35x of idle under the default
# and to 0.53x with a 1,000-iteration spin, at no cost idle. libgomp reads this once, when it
# loads, so it is set before anything imports llama_cpp; a user's own OpenMP setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from slm_agent.runtime.engine.llama import Engine
from slm_agent.runtime.engine.types import EngineConfig, GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult"]
