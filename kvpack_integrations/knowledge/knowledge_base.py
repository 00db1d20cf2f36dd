"""`KnowledgeBase`: facts and their embeddings in Chroma, grouped into k-means banks for routing.

Layout, per knowledge base NAME: a collection `NAME-facts` (text, embedding, `bank` and user metadata
per fact) and a collection `NAME-banks` (one centroid per bank, with its size). The embedder's name
and dimension are recorded in the facts collection, and a knowledge base refuses to be queried with
another embedder. Embedded `chromadb.PersistentClient` by default; `host=` uses a Chroma server
(`chroma run --path DIR --port N`) shared by many processes.

Routing follows the Knowledge Packs paper: B = ceil(N / bank_size) banks by k-means (MiniBatchKMeans
past 10,000 facts); a query is embedded, sent to its nearest centroid(s) (`probes`), and facts are
ranked within those banks only (a Chroma `where` on the bank id). New facts join their nearest bank;
`rebalance()` re-clusters everything. KV for routed facts is computed lazily by the engine.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import EmptyKnowledgeError, InvalidInputError, KnowledgeBaseUnavailableError, UnknownKnowledgeBaseError
from ..runtime.default_model import kvpack_home
from ..runtime.embedder import Embedder, load_embedder
from .search import check_k

FORMAT = "kvpack-kb/1"
DEFAULT_BANK_SIZE = 20
_MINIBATCH_FROM = 10_000
_PAGE = 5_000
_RESERVED = ("bank", "kvpack_order")


@dataclass(frozen=True)
class RoutedFact:
    id: str
    text: str
    score: float  # cosine similarity to the query
    bank: int
    metadata: Mapping[str, Any]


def default_kb_dir() -> Path:
    """`$KVPACK_KB`, else `$KVPACK_HOME/kb` (~/.cache/kvpack/kb)."""
    env = os.environ.get("KVPACK_KB")
    return Path(env).expanduser() if env else kvpack_home() / "kb"


def _client(path: str | Path | None, host: str | None, port: int) -> Any:
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host is None:
        root = Path(path).expanduser() if path is not None else default_kb_dir()
        root.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(root), settings=settings)
    try:
        client = chromadb.HttpClient(host=host, port=port, settings=settings)
        client.heartbeat()
    except Exception as exc:  # chromadb raises ValueError, httpx errors, ...: all mean "not reachable"
        raise KnowledgeBaseUnavailableError(
            f"cannot reach a Chroma server at {host}:{port} ({exc}); start one with "
            f"`chroma run --path DIR --port {port}` or leave host unset for the embedded store"
        ) from exc
    return client


class KnowledgeBase:
    """Facts in Chroma with banked routing. `create=False` refuses a name that does not exist yet."""

    def __init__(
        self,
        name: str,
        path: str | Path | None = None,
        *,
        host: str | None = None,
        port: int = 8000,
        embedder: str | None = None,
        bank_size: int = DEFAULT_BANK_SIZE,
        create: bool = True,
    ) -> None:
        if (
            not isinstance(name, str)
            or not 2 <= len(name) <= 60
            or not name.replace("-", "").replace("_", "").isalnum()
        ):
            raise InvalidInputError(f"invalid knowledge-base name {name!r}: 2-60 letters, digits, '-' or '_'")
        if bank_size < 1:
            raise InvalidInputError(f"bank_size must be >= 1, got {bank_size}")
        self.name = name
        self.where = f"{host}:{port}" if host else str(Path(path).expanduser() if path else default_kb_dir())
        self._path = None if host else Path(self.where)
        self._client = _client(path, host, port)
        self.embedder: Embedder = load_embedder(embedder)
        existing = {c.name if hasattr(c, "name") else str(c) for c in self._client.list_collections()}
        if f"{name}-facts" not in existing and not create:
            raise UnknownKnowledgeBaseError(f"no knowledge base named {name!r} at {self.where}")
        dim = self.embedder.dimension
        self._facts = self._client.get_or_create_collection(
            f"{name}-facts",
            metadata={
                "hnsw:space": "cosine",
                "format": FORMAT,
                "embedder": self.embedder.name,
                "dim": dim,
                "bank_size": bank_size,
            },
            embedding_function=None,
        )
        meta = dict(self._facts.metadata or {})
        if meta.get("format") != FORMAT:
            raise InvalidInputError(f"collection {name}-facts at {self.where} is not a kvpack knowledge base")
        if meta.get("embedder") != self.embedder.name or int(meta.get("dim", -1)) != dim:
            raise InvalidInputError(
                f"knowledge base {name!r} was built with embedder {meta.get('embedder')!r} ({meta.get('dim')} dims); "
                f"it cannot be queried with {self.embedder.name!r} ({dim} dims): pass embedder="
                f"{meta.get('embedder')!r} or rebuild it"
            )
        self.bank_size = int(meta.get("bank_size", bank_size))
        self._banks = self._client.get_or_create_collection(
            f"{name}-banks", metadata={"hnsw:space": "cosine"}, embedding_function=None
        )

    # -- size and storage ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._facts.count())

    @property
    def n_banks(self) -> int:
        return int(self._banks.count())

    def disk_bytes(self) -> int:
        """Everything on disk for the embedded store (the whole Chroma directory); 0 for a server."""
        if self._path is None:
            return 0
        return sum(p.stat().st_size for p in self._path.rglob("*") if p.is_file())

    # -- writing ------------------------------------------------------------------------------------

    def add(
        self,
        facts: Sequence[str],
        ids: Sequence[str] | None = None,
        metadatas: Sequence[Mapping[str, Any]] | None = None,
        *,
        batch_size: int = 256,
        progress: bool = True,
    ) -> list[str]:
        """Embed and store facts. The first add clusters them into banks; later ones join the nearest bank."""
        texts = [f.strip() if isinstance(f, str) else f for f in facts]
        if not texts:
            raise EmptyKnowledgeError("no facts given: a knowledge base needs at least one non-empty fact")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t]
        if bad:
            raise InvalidInputError(f"facts at positions {bad[:5]} are empty or not strings")
        ids = [str(i) for i in ids] if ids is not None else [uuid.uuid4().hex for _ in texts]
        metas = [dict(m) for m in metadatas] if metadatas is not None else [{} for _ in texts]
        if len(ids) != len(texts) or len(metas) != len(texts):
            raise InvalidInputError(f"{len(texts)} facts but {len(ids)} ids and {len(metas)} metadata entries")
        self._check_ids(ids)
        for m in metas:
            clash = [k for k in _RESERVED if k in m]
            if clash:
                raise InvalidInputError(f"metadata keys {clash} are reserved by the knowledge base")
        first = len(self) == 0
        order = len(self)
        bar = tqdm(total=len(texts), desc=f"embedding into {self.name}", unit="fact", disable=not progress)
        for lo in range(0, len(texts), batch_size):
            chunk = texts[lo : lo + batch_size]
            vectors = self.embedder.embed(list(chunk))
            banks = [0] * len(chunk) if first else self._nearest_banks(vectors)
            self._facts.add(
                ids=list(ids[lo : lo + batch_size]),
                embeddings=vectors.tolist(),
                documents=list(chunk),
                metadatas=[
                    {**m, "bank": int(b), "kvpack_order": order + lo + j}
                    for j, (m, b) in enumerate(zip(metas[lo : lo + batch_size], banks))
                ],
            )
            bar.update(len(chunk))
        bar.close()
        if first:
            self.rebalance(progress=progress)
        return list(ids)

    def _check_ids(self, ids: Sequence[str]) -> None:
        seen: set[str] = set()
        repeated = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
        if repeated:
            raise InvalidInputError(f"duplicate fact ids in this batch: {repeated[:5]}")
        existing = self.existing_ids(ids)
        if existing:
            raise InvalidInputError(f"fact ids already in knowledge base {self.name!r}: {sorted(existing)[:5]}")

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of `ids` the knowledge base already holds."""
        found: set[str] = set()
        for lo in range(0, len(ids), _PAGE):
            found.update(self._facts.get(ids=list(ids[lo : lo + _PAGE]), include=[])["ids"])
        return found

    def _nearest_banks(self, vectors: np.ndarray) -> list[int]:
        found = self._banks.query(query_embeddings=vectors.tolist(), n_results=1, include=["metadatas"])
        return [int(m[0]["bank"]) for m in found["metadatas"]]

    def _all(self, include: list[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"ids": [], **{k: [] for k in include}}
        for offset in range(0, len(self), _PAGE):
            page = self._facts.get(include=include, limit=_PAGE, offset=offset)
            out["ids"] += page["ids"]
            for k in include:
                out[k] += list(page[k])
        return out

    def rebalance(self, n_banks: int | None = None, *, seed: int = 0, progress: bool = True) -> int:
        """Re-cluster every fact into `n_banks` (default ceil(N / bank_size)) k-means banks."""
        from sklearn.cluster import KMeans, MiniBatchKMeans

        n = len(self)
        if n == 0:
            raise EmptyKnowledgeError(f"knowledge base {self.name!r} is empty: nothing to cluster")
        banks = n_banks if n_banks is not None else math.ceil(n / self.bank_size)
        if not 1 <= banks <= n:
            raise InvalidInputError(f"n_banks must be between 1 and the number of facts ({n}), got {banks}")
        data = self._all(["embeddings", "metadatas"])
        vectors = np.asarray(data["embeddings"], dtype=np.float32)
        if n >= _MINIBATCH_FROM:
            model: Any = MiniBatchKMeans(banks, random_state=seed, n_init=3, batch_size=4096)
        else:
            model = KMeans(banks, random_state=seed, n_init=1)
        labels = model.fit_predict(vectors)
        centroids = model.cluster_centers_ / np.maximum(
            np.linalg.norm(model.cluster_centers_, axis=1, keepdims=True), 1e-12
        )
        sizes = np.bincount(labels, minlength=banks)
        old = self._banks.get(include=[])["ids"]
        if old:
            self._banks.delete(ids=old)
        self._banks.add(
            ids=[f"bank-{b}" for b in range(banks)],
            embeddings=centroids.tolist(),
            metadatas=[{"bank": b, "size": int(sizes[b])} for b in range(banks)],
        )
        for lo in tqdm(range(0, n, _PAGE), desc="assigning banks", disable=not progress or n <= _PAGE):
            metas = [{**m, "bank": int(b)} for m, b in zip(data["metadatas"][lo : lo + _PAGE], labels[lo : lo + _PAGE])]
            self._facts.update(ids=data["ids"][lo : lo + _PAGE], metadatas=metas)
        return banks

    # -- reading ------------------------------------------------------------------------------------

    def route(self, query: str, k: int = 4, probes: int = 1) -> list[RoutedFact]:
        """The `k` facts most similar to `query` within its `probes` nearest banks, best first."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("the query is empty")
        check_k(k)
        if not isinstance(probes, int) or probes < 1:
            raise InvalidInputError(f"probes must be a positive integer, got {probes!r}")
        if len(self) == 0:
            raise EmptyKnowledgeError(f"knowledge base {self.name!r} at {self.where} holds no facts")
        vector = self.embedder.embed([query])
        nearest = self._banks.query(
            query_embeddings=vector.tolist(), n_results=min(probes, self.n_banks), include=["metadatas"]
        )
        banks = [int(m["bank"]) for m in nearest["metadatas"][0]]
        found = self._facts.query(
            query_embeddings=vector.tolist(),
            n_results=k,
            where={"bank": {"$in": banks}} if len(banks) > 1 else {"bank": banks[0]},
            include=["documents", "metadatas", "distances"],
        )
        return [
            RoutedFact(
                id=fid,
                text=doc,
                score=1.0 - float(dist),
                bank=int(meta["bank"]),
                metadata={k2: v for k2, v in meta.items() if k2 not in _RESERVED},
            )
            for fid, doc, meta, dist in zip(
                found["ids"][0], found["documents"][0], found["metadatas"][0], found["distances"][0]
            )
        ]

    def facts(self) -> list[str]:
        """Every fact's text, in insertion order."""
        data = self._all(["documents", "metadatas"])
        order = sorted(range(len(data["ids"])), key=lambda i: data["metadatas"][i]["kvpack_order"])
        return [data["documents"][i] for i in order]
