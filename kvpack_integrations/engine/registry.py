"""One engine per loaded model, shared by every integration object on the same weights.

LangChain's standard tests (and real applications) construct many chat-model instances; they must
share the weights (loaded once by `load_model`) and one prefix tree, so an agent step by one instance
reuses what another cached.
"""

from __future__ import annotations

import threading
import weakref

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
