"""LangChain integration (layer 8): thin adapters over the engine; no KV logic lives here."""

from .chat_model import KVPackChatModel
from .retriever import KVPackRetriever

__all__ = ["KVPackChatModel", "KVPackRetriever"]
