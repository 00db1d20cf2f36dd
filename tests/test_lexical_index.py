"""BM25 as the textbook defines it, grown batch by batch."""

from __future__ import annotations

import math

import pytest

from kvpack_integrations.knowledge.lexical import LexicalIndex, terms


def test_scores_follow_the_bm25_formula() -> None:
    docs = ["the cat sat", "the dog sat on the mat", "a zorblax"]
    index = LexicalIndex(k1=1.2, b=0.75)
    index.add(docs[:2])
    index.add(docs[2:])  # appending a batch is the same as indexing everything at once
    avg = sum(len(terms(d)) for d in docs) / 3

    def expected(doc: str, term: str, df: int) -> float:
        tf = terms(doc).count(term)
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(terms(doc)) / avg))

    got = index.scores("The SAT, the sat!")  # case and punctuation do not matter; repeats count once
    for row, doc in enumerate(docs):
        want = expected(doc, "the", 2) + expected(doc, "sat", 2)
        assert got[row] == pytest.approx(want, rel=1e-5)
    assert index.top("zorblax", 5) == [(2, 1.0)]  # only rows with a positive score, relative to the best
    assert [r for r, _ in index.top("the sat", 5)] == [0, 1]
    assert index.top("unknown words", 5) == [] and LexicalIndex().top("x", 3) == []
