"""`FactMirror`: this process's copy of a knowledge base's fact ids, texts and banks, plus BM25.

Why a mirror: at 100,000 facts a Chroma metadata filter (`where bank in ...`) costs ~40 ms and a
`count()` ~12 ms, most of a query's budget. Bank membership and the lexical index are small, so each
process keeps them in memory and fetches only the routed facts' embeddings from Chroma by id (~3 ms).
Chroma stays the only store: the mirror is rebuilt from it whenever the knowledge base's stamps
(`kvpack_size`, and the bank layout's generation, in the collection metadata) say another writer
changed it. A mirror holds one generation's banks (`layout`), so routing pairs them with that
generation's centroids.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from .bank_layout import BankLayout
from .lexical import LexicalIndex


class FactMirror:
    """Rows in insertion order: `ids[r]`, `texts[r]`, `banks[r]`; `rows_in(banks)` inverts the last."""

    def __init__(self, layout: BankLayout) -> None:
        self.layout = layout
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.banks: list[int] = []
        self.lexical = LexicalIndex()
        self._rows: dict[str, int] = {}
        self._members: dict[int, list[int]] = defaultdict(list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[str], texts: Sequence[str], banks: Sequence[int]) -> None:
        """Append facts not mirrored yet (a repeated id is skipped, so overlapping syncs are harmless)."""
        fresh = [i for i, fid in enumerate(ids) if fid not in self._rows]
        for i in fresh:
            row = len(self.ids)
            self.ids.append(ids[i])
            self.texts.append(texts[i])
            self.banks.append(int(banks[i]))
            self._rows[ids[i]] = row
            self._members[int(banks[i])].append(row)
        self.lexical.add([texts[i] for i in fresh])

    def rows_in(self, banks: Iterable[int]) -> list[int]:
        return [r for b in banks for r in self._members.get(b, ())]

    def row_of(self, fact_id: str) -> int | None:
        """The row of a mirrored fact, None for one stored after this mirror was caught up."""
        return self._rows.get(fact_id)
