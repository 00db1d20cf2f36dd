"""One engine per loaded model, shared by every integration object on the same weights.

LangChain's standard tests (and real applications) construct many chat-model instances; they must
share the weights (loaded once by `load_model`) and one prefix tree, so an agent step by one instance
reuses what another cached.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

from ..packet.composer import PacketComposer
from ..runtime.loader import LoadedModel
from .engine import Engine

_ENGINES: weakref.WeakKeyDictionary[object, Engine] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def shared_engine(loaded: LoadedModel) -> Engine:
    """The engine for `loaded`'s model object, created on first use."""
    with _GUARD:
        engine = _ENGINES.get(loaded.model)
        if engine is None:
            engine = Engine(loaded)
            _ENGINES[loaded.model] = engine
        return engine


_COMPOSERS: weakref.WeakKeyDictionary[object, dict[tuple[str | None, str | None], PacketComposer]] = (
    weakref.WeakKeyDictionary()
)


def shared_packet_composer(loaded: LoadedModel, store: str | None, adapter: str | None) -> PacketComposer:
    """The packet composer for a packet store and adapter (both None: the engine's own), one per process.

    Integration objects (chat models, LLMs, retrievers) name their packets by paths; the adapter is
    loaded and checked against the model once, not at every call.
    """
    if store is None and adapter is None:
        return shared_engine(loaded).packets
    store, adapter = _resolved(store), adapter if adapter in (None, "shipped") else _resolved(adapter)
    with _GUARD:
        composers = _COMPOSERS.setdefault(loaded.model, {})
        composer = composers.get((store, adapter))
        if composer is None:
            composer = composers[(store, adapter)] = PacketComposer(loaded, store, adapter or "shipped")
        return composer


def _resolved(path: str | None) -> str | None:
    """One spelling per file (`~/p`, `./p` and `/home/u/p` are the same store)."""
    return None if path is None else str(Path(path).expanduser().resolve())
