"""kvpack-integrations: retrieved knowledge as pre-computed KV-cache segments for local transformers models."""

from .engine import Engine, GenerationResult, GenerationSettings, Usage
from .errors import KVPackError
from .knowledge import build_pack, knowledge_prompt, load_pack, read_facts
from .prompts import KnowledgeFormat, render_messages
from .runtime import LoadedModel, load_model, wrap_model
from .segments import KVSegment, PackStore

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "GenerationResult",
    "GenerationSettings",
    "KVPackError",
    "KVSegment",
    "KnowledgeFormat",
    "LoadedModel",
    "PackStore",
    "Usage",
    "build_pack",
    "knowledge_prompt",
    "load_model",
    "load_pack",
    "read_facts",
    "render_messages",
    "wrap_model",
]
