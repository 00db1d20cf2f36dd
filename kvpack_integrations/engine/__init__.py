"""Layer 7: the generation engine."""

from .engine import STRATEGIES, Engine, Prefilled
from .settings import GenerationSettings
from .usage import GenerationResult, StreamChunk, Usage

__all__ = ["STRATEGIES", "Engine", "GenerationResult", "GenerationSettings", "Prefilled", "StreamChunk", "Usage"]
