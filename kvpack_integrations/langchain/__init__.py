"""LangChain integration (layer 8): thin adapters over the engine; no KV logic lives here."""

from .chat_model import KVPackChatModel
from .retriever import KVPackRetriever
from .steering_callback import KVPackSteeringCallback

__all__ = ["KVPackChatModel", "KVPackRetriever", "KVPackSteeringCallback"]
