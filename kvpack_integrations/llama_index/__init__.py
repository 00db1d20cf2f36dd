"""LlamaIndex integration (layer 8): thin adapters over the engine; no KV logic lives here."""

from .agent import KVPackFunctionAgent, KVRetrievalTool, retrieval_agent
from .llm import KVPackLLM
from .retriever import KVPackLlamaRetriever
from .synthesizer import KVPackQueryEngine, KVPackSynthesizer, text_qa_template
from .usage import record_usage

__all__ = [
    "KVPackFunctionAgent",
    "KVPackLLM",
    "KVPackLlamaRetriever",
    "KVPackQueryEngine",
    "KVPackSynthesizer",
    "KVRetrievalTool",
    "record_usage",
    "retrieval_agent",
    "text_qa_template",
]
