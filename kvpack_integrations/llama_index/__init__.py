"""LlamaIndex integration (layer 8): thin adapters over the engine; no KV logic lives here."""

from .llm import KVPackLLM
from .retriever import KVPackLlamaRetriever
from .synthesizer import KVPackQueryEngine, KVPackSynthesizer, text_qa_template
from .usage import record_usage

__all__ = [
    "KVPackLLM",
    "KVPackLlamaRetriever",
    "KVPackQueryEngine",
    "KVPackSynthesizer",
    "record_usage",
    "text_qa_template",
]
