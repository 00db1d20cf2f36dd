"""`LexicalIndex`: BM25 over fact texts, grown one batch at a time, queried in about a millisecond.

Why a lexical channel next to the embeddings: sentence embedders represent rare names (fictional
entities, product codes, people few texts mention) by their sub-word pieces, so two facts about
different "Sheahoundmund"s embed almost alike and dense search alone confuses them. BM25 weights such
a rare term by its inverse document frequency, which is exactly the signal dense search lacks.

Rows are integers in insertion order; the caller maps them to fact ids. Postings are compact
`array` buffers (4 bytes per entry) read as numpy views at query time.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore)."""
    return _WORD.findall(text.lower())


class LexicalIndex:
    """Okapi BM25 (`k1`, `b`) over an append-only list of texts."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._rows: dict[str, array] = {}
        self._tfs: dict[str, array] = {}
        self._lengths = array("f")

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, texts: Sequence[str]) -> None:
        """Append texts as the next rows."""
        for text in texts:
            row = len(self._lengths)
            words = terms(text)
            self._lengths.append(float(len(words)))
            for term, count in Counter(words).items():
                if term not in self._rows:
                    self._rows[term] = array("i")
                    self._tfs[term] = array("f")
                self._rows[term].append(row)
                self._tfs[term].append(float(count))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for `query` (zeros when no query term is indexed)."""
        n = len(self._lengths)
        out = np.zeros(n, dtype=np.float32)
        if n == 0:
            return out
        lengths = np.frombuffer(self._lengths, dtype=np.float32)
        norm = self.k1 * (1.0 - self.b + self.b * lengths / max(float(lengths.mean()), 1.0))
        for term in set(terms(query)):
            rows = self._rows.get(term)
            if rows is None:
                continue
            idx = np.frombuffer(rows, dtype=np.int32)
            tf = np.frombuffer(self._tfs[term], dtype=np.float32)
            idf = math.log(1.0 + (n - len(idx) + 0.5) / (len(idx) + 0.5))
            out[idx] += idf * tf * (self.k1 + 1.0) / (tf + norm[idx])
        return out

    def top(self, query: str, m: int) -> list[tuple[int, float]]:
        """The `m` best rows with a positive score, as (row, score / best score), best first."""
        scores = self.scores(query)
        positive = int(np.count_nonzero(scores > 0))
        if positive == 0 or m < 1:
            return []
        m = min(m, positive)
        best = np.argpartition(-scores, m - 1)[:m] if m < len(scores) else np.arange(len(scores))
        best = best[np.argsort(-scores[best], kind="stable")]
        peak = float(scores[best[0]])
        return [(int(r), float(scores[r]) / peak) for r in best if scores[r] > 0]
