"""The local model store: manifests, GGUF inspection, the bundled model, downloads, memory."""

from slm_agent.models.bundled import BUNDLED_NAME, ensure_bundled
from slm_agent.models.manifest import ChatTemplate, GGUFInfo, ModelKind, ModelManifest, PromptFormat
from slm_agent.models.memory import MemoryEstimate, estimate
from slm_agent.models.store import ModelStore

__all__ = [
    "BUNDLED_NAME",
    "ChatTemplate",
    "GGUFInfo",
    "MemoryEstimate",
    "ModelKind",
    "ModelManifest",
    "ModelStore",
    "PromptFormat",
    "ensure_bundled",
    "estimate",
]
