"""The local engine: llama.cpp model and adapters, decoding, prefix cache, grammars."""

from slm_agent.runtime.engine.llama import Engine
from slm_agent.runtime.engine.types import EngineConfig, GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult"]
