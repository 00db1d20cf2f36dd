"""`KnowledgeBase`: facts and their embeddings in Chroma, grouped into k-means banks for routing.

Layout, per knowledge base NAME: a collection `NAME-facts` (text, embedding, `bank` and user metadata
per fact) and a collection `NAME-banks` (one centroid per bank, with its size). The embedder's name
and dimension are recorded in the facts collection, and a knowledge base refuses to be queried with
another embedder. Embedded `chromadb.PersistentClient` by default; `host=` uses a Chroma server
(`chroma run --path DIR --port N`) shared by many processes.

Routing follows the Knowledge Packs paper: B = ceil(N / bank_size) banks by k-means (MiniBatchKMeans
past 10,000 facts); a query is embedded, sent to its nearest centroid(s) (`probes`), and the facts of
those banks are ranked by cosine. New facts join their nearest bank; `rebalance()` re-clusters
everything. By default routing is hybrid: the facts BM25 ranks highest over the whole knowledge base
join the candidates, and a candidate's score is its cosine plus `lexical_weight` times its BM25
score relative to the best one (`lexical_weight=0` is the paper's dense-only routing). Bank
membership and BM25 live in a per-process `FactMirror`, rebuilt from Chroma when the stamps in the
facts collection's metadata change. Centroids and fact labels are kept per generation (`BankLayout`),
so a rebalance, even an interrupted one, never pairs one generation's centroids with another's
labels. A base with facts but no banks yet (its first add cut short) is searched flat, by Chroma's
own index over the facts. KV for routed facts is computed lazily by the engine.

Writers: one process at a time per knowledge base (Chroma has no transactions); readers any number.
"""

from __future__ import annotations

import math
import os
import re
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
from .bank_layout import LABEL_FIELDS, BankLayout
from .fact_mirror import FactMirror
from .facts import refuse_one_string
from .projection import Projection
from .search import check_k

FORMAT = "kvpack-kb/1"
DEFAULT_BANK_SIZE = 20
_MINIBATCH_FROM = 10_000
_PAGE = 5_000
_RESERVED = (*LABEL_FIELDS, "kvpack_order")
DEFAULT_LEXICAL_WEIGHT = 1.0
_LEXICAL_CANDIDATES = 8  # BM25's best rows that join the banked candidates (at least 2k)
_EMPTY_BANK_SLACK = 8  # extra nearest banks fetched, to read past empty ones
_KB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,58}[A-Za-z0-9]")  # Chroma's collection-name rule, ASCII


@dataclass(frozen=True)
class RoutedFact:
    id: str
    text: str
    score: float  # cosine + lexical_weight * relative BM25: what the ranking used
    similarity: float  # cosine similarity to the query
    bank: int
    metadata: Mapping[str, Any]
    position: int  # insertion order in the knowledge base (what "in source order" means for facts)


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


def list_knowledge_bases(
    path: str | Path | None = None, *, host: str | None = None, port: int = 8000
) -> list[dict[str, Any]]:
    """The kvpack knowledge bases in a Chroma store (name, facts, banks, embedder, dims), read from the
    collections' metadata: no embedder is loaded. An embedded directory that does not exist holds none
    and is not created; a collection of another program is skipped."""
    if host is None and not (Path(path).expanduser() if path is not None else default_kb_dir()).is_dir():
        return []
    client = _client(path, host, port)
    names = {c.name if hasattr(c, "name") else str(c) for c in client.list_collections()}
    rows = []
    for collection in sorted(n for n in names if n.endswith("-facts")):
        name = collection.removesuffix("-facts")
        facts = client.get_collection(collection, embedding_function=None)
        meta = dict(facts.metadata or {})
        if meta.get("format") != FORMAT:
            continue
        banks = f"{name}-banks"
        rows.append(
            {
                "kb": name,
                "facts": int(facts.count()),
                "banks": _count_banks(client.get_collection(banks, embedding_function=None), meta)
                if banks in names
                else 0,
                "embedder": meta.get("embedder"),
                "dims": meta.get("dim"),
                "routing_dims": meta.get("routing_dim"),
                "bank_size": meta.get("bank_size"),
            }
        )
    return rows


def _count_banks(banks: Any, meta: Mapping[str, Any]) -> int:
    """The current generation's centroids (a rebalance cut short leaves another's beside them)."""
    return len(banks.get(where=BankLayout.of(meta).centroids(), include=[])["ids"])


def _check_metadata(metas: Sequence[Any]) -> None:
    """What Chroma would refuse, found before anything is written: Chroma refuses a whole batch, after
    earlier batches were stored."""
    for position, m in enumerate(metas):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"metadata of fact {position} is not a mapping: {type(m).__name__}")
        clash = [k for k in _RESERVED if k in m]
        if clash:
            raise InvalidInputError(f"metadata of fact {position}: keys {clash} are reserved by the knowledge base")
        keys = [k for k in m if not isinstance(k, str) or not k or k[0] in "#$"]
        if keys:
            raise InvalidInputError(
                f"metadata of fact {position}: keys {keys[:3]} are not allowed (a key is a non-empty string "
                "not starting with '#' or '$')"
            )
        wrong = [k for k, v in m.items() if not isinstance(v, (str, int, float, bool))]
        if wrong:
            raise InvalidInputError(
                f"metadata of fact {position}: values of {wrong[:3]} are not a string, number or boolean"
            )


class KnowledgeBase:
    """Facts in Chroma with banked routing. `create=False` refuses a name that does not exist yet.

    `dims` stores routing vectors reduced by PCA (fitted on the first add) instead of the embedder's
    full vectors: fewer bytes per fact, at some cost in dense accuracy. Fixed when the base is created.
    """

    def __init__(
        self,
        name: str,
        path: str | Path | None = None,
        *,
        host: str | None = None,
        port: int = 8000,
        embedder: str | None = None,
        bank_size: int = DEFAULT_BANK_SIZE,
        dims: int | None = None,
        create: bool = True,
    ) -> None:
        self.where = f"{host}:{port}" if host else str(Path(path).expanduser() if path else default_kb_dir())
        valid = isinstance(name, str) and _KB_NAME.fullmatch(name) is not None
        if not create and (not valid or (host is None and not Path(self.where).is_dir())):
            # opening, not creating: a name Chroma cannot hold, or a directory that is not there, holds no
            # such base (and a lookup creates nothing and loads no embedder)
            why = "" if valid else " (nor can there be: Chroma names are 2-60 letters, digits, '-' or '_')"
            raise UnknownKnowledgeBaseError(f"no knowledge base named {name!r} at {self.where}{why}")
        if not valid:
            raise InvalidInputError(
                f"invalid knowledge-base name {name!r}: 2-60 ASCII letters, digits, '-' or '_', starting and "
                "ending with a letter or digit"
            )
        if bank_size < 1:
            raise InvalidInputError(f"bank_size must be >= 1, got {bank_size}")
        self.name = name
        self._path = None if host else Path(self.where)
        self._client = _client(path, host, port)
        existing = {c.name if hasattr(c, "name") else str(c) for c in self._client.list_collections()}
        if f"{name}-facts" not in existing and not create:
            raise UnknownKnowledgeBaseError(f"no knowledge base named {name!r} at {self.where}")
        self.embedder: Embedder = load_embedder(embedder)
        dim = self.embedder.dimension
        if dims is not None and (not isinstance(dims, int) or not 1 <= dims <= dim):
            raise InvalidInputError(f"dims must be an integer from 1 to the embedder's {dim} dimensions, got {dims!r}")
        settings = {
            "hnsw:space": "cosine",
            "format": FORMAT,
            "embedder": self.embedder.name,
            "dim": dim,
            "routing_dim": dims or dim,
            "bank_size": bank_size,
        }
        self._facts = self._client.get_or_create_collection(f"{name}-facts", metadata=settings, embedding_function=None)
        meta = dict(self._facts.metadata or {})
        same_embedder = meta.get("embedder") == settings["embedder"] and meta.get("dim") == settings["dim"]
        if (
            create
            and dims is not None
            and same_embedder
            and meta.get("routing_dim") != dims
            and self._facts.count() == 0
        ):
            # nothing stored yet (a first build that failed, e.g. fewer facts than dims), and other dims asked
            # for explicitly: the base takes them, rather than keeping the failed ones for good
            for suffix in ("facts", "projection", "banks"):
                if f"{name}-{suffix}" in existing or suffix == "facts":
                    self._client.delete_collection(f"{name}-{suffix}")
            self._facts = self._client.create_collection(f"{name}-facts", metadata=settings, embedding_function=None)
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
        self.routing_dim = int(meta.get("routing_dim", dim))
        if dims is not None and dims != self.routing_dim:
            raise InvalidInputError(
                f"knowledge base {name!r} stores {self.routing_dim}-dim routing vectors; it cannot be opened "
                f"with dims={dims}: leave dims unset, or build a new one"
            )
        self._projection_store = (
            self._client.get_or_create_collection(f"{name}-projection", embedding_function=None)
            if self.routing_dim < dim
            else None
        )
        self._projection = Projection.load(self._projection_store) if self._projection_store is not None else None
        self._banks = self._client.get_or_create_collection(
            f"{name}-banks", metadata={"hnsw:space": "cosine"}, embedding_function=None
        )
        self._mirror: FactMirror | None = None

    # -- stamps: what other processes read to know their mirror is stale -----------------------------

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """Routing vectors: the embedder's, projected when the knowledge base stores fewer dims."""
        vectors = self.embedder.embed(list(texts))
        if self._projection_store is None:
            return vectors
        if self._projection is None:
            raise EmptyKnowledgeError(f"knowledge base {self.name!r} has no projection yet: add facts first")
        return self._projection.apply(vectors)

    def _metadata(self) -> dict[str, Any]:
        return dict(self._client.get_collection(f"{self.name}-facts").metadata or {})

    def _state(self) -> tuple[int, BankLayout]:
        """(number of facts, bank layout) as last stamped by a writer (~1 ms)."""
        meta = self._metadata()
        size = meta.get("kvpack_size")
        return (int(size) if size is not None else len(self)), BankLayout.of(meta)

    def _stamp(self, size: int, layout: BankLayout | None = None) -> None:
        """One metadata write: a new layout and the size it holds become current together."""
        meta = {k: v for k, v in self._metadata().items() if not k.startswith("hnsw:")}
        self._facts.modify(metadata={**meta, "kvpack_size": int(size), **(layout.stamp() if layout else {})})

    def label(self, key: str) -> str | None:
        """A caller's label on this base (e.g. a digest of the file it was built from), or None."""
        value = self._metadata().get(f"kvpack_label_{key}")
        return None if value is None else str(value)

    def set_label(self, key: str, value: str) -> None:
        """Keep `value` under `key` with the base (in its facts collection's metadata): ~1 ms to read back."""
        if not key.isidentifier():
            raise InvalidInputError(f"a label key must be an identifier, got {key!r}")
        meta = {k: v for k, v in self._metadata().items() if not k.startswith("hnsw:")}
        self._facts.modify(metadata={**meta, f"kvpack_label_{key}": str(value)})

    def warm(self) -> None:
        """Build this process's mirror (bank membership, BM25) now instead of at the first query."""
        self._synced()

    def _synced(self) -> FactMirror:
        """This process's mirror, caught up with Chroma: new facts appended, a rebalance reloaded.

        Only a new layout rebuilds it: a stamped size below the mirror's (an add cut before its stamp,
        whose facts the mirror already fetched) needs nothing."""
        size, layout = self._state()
        mirror = self._mirror
        if mirror is None or mirror.layout != layout:
            mirror = FactMirror(layout)
            self._mirror_pages(mirror, None)
        elif size > len(mirror):
            self._mirror_pages(mirror, {"kvpack_order": {"$gte": len(mirror)}})
        self._mirror = mirror
        return mirror

    def _mirror_pages(self, mirror: FactMirror, where: dict[str, Any] | None) -> None:
        rows: list[tuple[int, str, str, int]] = []
        field = mirror.layout.field
        for offset in range(0, 1 << 62, _PAGE):
            page = self._facts.get(where=where, include=["documents", "metadatas"], limit=_PAGE, offset=offset)
            rows += [
                (int(m["kvpack_order"]), fid, doc, int(m.get(field, -1)))  # -1: not in a bank yet
                for fid, doc, m in zip(page["ids"], page["documents"], page["metadatas"])
            ]
            if len(page["ids"]) < _PAGE:
                break
        rows.sort()
        mirror.add([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])

    # -- size and storage ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._facts.count())

    @property
    def n_banks(self) -> int:
        """Banks of the current generation (0: facts not clustered yet)."""
        return _count_banks(self._banks, self._metadata())

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
        """Embed and store facts. The first add clusters them into banks; later ones join the nearest bank.

        Everything Chroma would refuse is refused first, naming the fact: a batch refused after earlier
        ones were stored would leave a base that a corrected retry finds full of duplicate ids."""
        refuse_one_string("facts", facts)
        refuse_one_string("ids", ids)
        if isinstance(metadatas, Mapping):
            raise InvalidInputError("metadatas must be a list of mappings, one per fact, got one mapping")
        texts = [f.strip() if isinstance(f, str) else f for f in facts]
        if not texts:
            raise EmptyKnowledgeError("no facts given: a knowledge base needs at least one non-empty fact")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t]
        if bad:
            raise InvalidInputError(f"facts at positions {bad[:5]} are empty or not strings")
        ids = [str(i) for i in ids] if ids is not None else [uuid.uuid4().hex for _ in texts]
        empty = [i for i, fid in enumerate(ids) if not fid]
        if empty:
            raise InvalidInputError(f"fact ids at positions {empty[:5]} are empty")
        metas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        if len(ids) != len(texts) or len(metas) != len(texts):
            raise InvalidInputError(f"{len(texts)} facts but {len(ids)} ids and {len(metas)} metadata entries")
        _check_metadata(metas)
        self._check_ids(ids)
        stamped, layout = self._state()
        # after the stamped size, or after what is stored if an add was cut between its write and its stamp
        order = max(stamped, len(self))
        # the first add clusters; so does the next one if the first was cut short before it could
        first = order == 0 or self.n_banks == 0
        mirror = self._mirror if self._mirror is not None and len(self._mirror) == order else None
        fitted = self._fit_projection(texts, batch_size, progress) if self._needs_projection() else None
        bar = tqdm(total=len(texts), desc=f"storing into {self.name}", unit="fact", disable=not progress)
        for lo in range(0, len(texts), batch_size):
            chunk = texts[lo : lo + batch_size]
            vectors = fitted[lo : lo + batch_size] if fitted is not None else self._embed(chunk)
            banks = [] if first else self._nearest_banks(vectors, layout)  # first: labelled by the rebalance
            self._facts.add(
                ids=list(ids[lo : lo + batch_size]),
                embeddings=vectors.tolist(),
                documents=list(chunk),
                metadatas=[
                    {**metas[lo + j], "kvpack_order": order + lo + j, **({layout.field: banks[j]} if banks else {})}
                    for j in range(len(chunk))
                ],
            )
            if mirror is not None and not first:
                mirror.add(list(ids[lo : lo + batch_size]), list(chunk), banks)
            self._stamp(size=order + lo + len(chunk))  # an interrupted add stays counted
            bar.update(len(chunk))
        bar.close()
        self._mirror = mirror
        if first:
            self.rebalance(progress=progress)
        return list(ids)

    def _needs_projection(self) -> bool:
        return self._projection_store is not None and self._projection is None

    def _fit_projection(self, texts: Sequence[str], batch_size: int, progress: bool) -> np.ndarray:
        """Embed the whole first add, fit and store the PCA on it, return the projected vectors."""
        assert self._projection_store is not None
        raw = np.concatenate(
            [
                self.embedder.embed(list(texts[lo : lo + batch_size]))
                for lo in tqdm(
                    range(0, len(texts), batch_size),
                    desc=f"embedding for {self.routing_dim}-dim PCA",
                    disable=not progress,
                )
            ]
        )
        projection = Projection.fit(raw, self.routing_dim)
        projection.save(self._projection_store)
        self._projection = projection
        return projection.apply(raw)

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

    def _nearest_banks(self, vectors: np.ndarray, layout: BankLayout) -> list[int]:
        nearest = self._centroid_query(vectors, 1, layout)
        return [int(m[0]["bank"]) for m in nearest]

    def _centroid_query(self, vectors: np.ndarray, n: int, layout: BankLayout) -> list[list[Mapping[str, Any]]]:
        """Each vector's `n` nearest centroids of `layout`'s generation. Chroma's `where` costs ~10 ms at 5,000
        banks, so it is asked only when another generation's centroids came back (a rebalance under way,
        or cut short): without any, the unfiltered nearest are the same."""
        found = self._banks.query(query_embeddings=vectors.tolist(), n_results=n, include=["metadatas"])
        if all(layout.holds(m) for row in found["metadatas"] for m in row):
            return [list(row) for row in found["metadatas"]]
        found = self._banks.query(
            query_embeddings=vectors.tolist(), n_results=n, where=layout.centroids(), include=["metadatas"]
        )
        return [list(row) for row in found["metadatas"]]

    def _all(self, include: list[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"ids": [], **{k: [] for k in include}}
        for offset in range(0, len(self), _PAGE):
            page = self._facts.get(include=include, limit=_PAGE, offset=offset)
            out["ids"] += page["ids"]
            for k in include:
                out[k] += list(page[k])
        return out

    def rebalance(self, n_banks: int | None = None, *, seed: int = 0, progress: bool = True) -> int:
        """Re-cluster every fact into `n_banks` (default ceil(N / bank_size)) k-means banks.

        Written as the next generation beside the current one and made current by one stamp, so readers
        route with the old banks until then, and a rebalance cut short (Ctrl-C, a dead server) leaves
        them whole; running it again finishes the job."""
        from sklearn.cluster import KMeans, MiniBatchKMeans

        n = len(self)
        if n == 0:
            raise EmptyKnowledgeError(f"knowledge base {self.name!r} is empty: nothing to cluster")
        banks = n_banks if n_banks is not None else math.ceil(n / self.bank_size)
        if not 1 <= banks <= n:
            raise InvalidInputError(f"n_banks must be between 1 and the number of facts ({n}), got {banks}")
        data = self._all(["embeddings", "documents", "metadatas"])
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
        layout = BankLayout.of(self._metadata()).following()
        self._banks.delete(where={"generation": layout.generation})  # an earlier attempt's, never current
        for lo in range(0, banks, _PAGE):
            self._banks.add(
                ids=[layout.centroid_id(b) for b in range(lo, min(lo + _PAGE, banks))],
                embeddings=centroids[lo : lo + _PAGE].tolist(),
                metadatas=[
                    {"bank": b, "size": int(sizes[b]), "generation": layout.generation}
                    for b in range(lo, min(lo + _PAGE, banks))
                ],
            )
        for lo in tqdm(range(0, n, _PAGE), desc="assigning banks", disable=not progress or n <= _PAGE):
            metas = [
                {**m, layout.field: int(b)} for m, b in zip(data["metadatas"][lo : lo + _PAGE], labels[lo : lo + _PAGE])
            ]
            self._facts.update(ids=data["ids"][lo : lo + _PAGE], metadatas=metas)
        self._stamp(size=n, layout=layout)  # readers switch to the new banks here, all at once
        self._banks.delete(where={"generation": {"$ne": layout.generation}})  # older generations, untagged ones
        mirror = FactMirror(layout)
        order = sorted(range(n), key=lambda i: data["metadatas"][i]["kvpack_order"])
        mirror.add(
            [data["ids"][i] for i in order], [data["documents"][i] for i in order], [int(labels[i]) for i in order]
        )
        self._mirror = mirror
        return banks

    # -- reading ------------------------------------------------------------------------------------

    def route(
        self, query: str, k: int = 4, probes: int = 1, *, lexical_weight: float = DEFAULT_LEXICAL_WEIGHT
    ) -> list[RoutedFact]:
        """The `k` best facts for `query`: those of its `probes` nearest banks, plus BM25's best (hybrid).

        A base with facts but no banks yet (its first add cut short before clustering; `rebalance()` or
        the next add clusters it) is searched flat: the nearest facts by Chroma's index, `bank` -1."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("the query is empty")
        check_k(k)
        if not isinstance(probes, int) or probes < 1:
            raise InvalidInputError(f"probes must be a positive integer, got {probes!r}")
        if not isinstance(lexical_weight, (int, float)) or not 0 <= lexical_weight < math.inf:
            raise InvalidInputError(f"lexical_weight must be a finite number >= 0, got {lexical_weight!r}")
        mirror = self._synced()
        if len(mirror) == 0:
            raise EmptyKnowledgeError(f"knowledge base {self.name!r} at {self.where} holds no facts")
        vector = self._embed([query])[0]
        nearest = self._nearest_centroids(vector, probes, mirror)
        if not nearest and self._state()[1] != mirror.layout:
            # a rebalance was stamped meanwhile and removed the centroids of the mirror's generation
            mirror = self._synced()
            nearest = self._nearest_centroids(vector, probes, mirror)
        banked = bool(nearest)
        rows = self._bank_rows(nearest, probes, mirror) if banked else self._flat_rows(vector, k, probes, mirror)
        lexical = dict(mirror.lexical.top(query, max(2 * k, _LEXICAL_CANDIDATES))) if lexical_weight else {}
        rows.update(lexical)
        wanted = {mirror.ids[r]: r for r in rows}
        if not wanted:  # every bank probed was empty and no word matched
            return []
        found = self._facts.get(ids=list(wanted), include=["embeddings", "documents", "metadatas"])
        similarity = np.asarray(found["embeddings"], dtype=np.float32).reshape(len(found["ids"]), -1) @ vector
        ranked = sorted(
            (
                (float(sim) + lexical_weight * lexical.get(wanted[fid], 0.0), float(sim), fid, doc, meta)
                for fid, doc, meta, sim in zip(found["ids"], found["documents"], found["metadatas"], similarity)
            ),
            key=lambda t: -t[0],
        )
        return [
            RoutedFact(
                id=fid,
                text=doc,
                score=score,
                similarity=sim,
                bank=mirror.banks[wanted[fid]] if banked else -1,
                metadata={k2: v for k2, v in meta.items() if k2 not in _RESERVED},
                position=int(meta["kvpack_order"]),
            )
            for score, sim, fid, doc, meta in ranked[:k]
        ]

    def _nearest_centroids(self, vector: np.ndarray, probes: int, mirror: FactMirror) -> list[Mapping[str, Any]]:
        """The mirror's generation's centroids, nearest first (a few more than `probes`, to read past empty banks)."""
        return self._centroid_query(vector[None, :], probes + _EMPTY_BANK_SLACK, mirror.layout)[0]

    @staticmethod
    def _bank_rows(nearest: Sequence[Mapping[str, Any]], probes: int, mirror: FactMirror) -> set[int]:
        """The facts of the `probes` nearest banks; k-means can leave a bank empty (fewer distinct facts than
        banks), and an empty bank is skipped so that `probes` banks with facts are read."""
        rows: set[int] = set()
        read = 0
        for meta in nearest:
            members = set(mirror.rows_in([int(meta["bank"])]))
            if members:
                rows |= members
                read += 1
                if read == probes:
                    break
        return rows

    def _flat_rows(self, vector: np.ndarray, k: int, probes: int, mirror: FactMirror) -> set[int]:
        """No banks: as many nearest facts as `probes` banks would hold, by Chroma's own index over the facts."""
        found = self._facts.query(
            query_embeddings=[vector.tolist()], n_results=max(k, probes * self.bank_size), include=[]
        )
        return {row for fid in found["ids"][0] if (row := mirror.row_of(fid)) is not None}

    def facts(self) -> list[str]:
        """Every fact's text, in insertion order."""
        data = self._all(["documents", "metadatas"])
        order = sorted(range(len(data["ids"])), key=lambda i: data["metadatas"][i]["kvpack_order"])
        return [data["documents"][i] for i in order]
