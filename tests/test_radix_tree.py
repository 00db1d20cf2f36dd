"""Layer 4 data structure: the radix tree returns exactly the longest cached token prefix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import CompositionError, FingerprintMismatchError
from kvpack_integrations.runtime import Fingerprint
from kvpack_integrations.segments import KVSegment
from kvpack_integrations.segments.segment import context_hash

FP = Fingerprint("test/Fake", 1, 1, 2, 10, "w", "t", "float32")


def seg(context: list[int], tokens: list[int], fp: Fingerprint = FP) -> KVSegment:
    """A segment whose K values encode absolute position, so slices can be checked."""
    n, start = len(tokens), len(context)
    pos = torch.arange(start, start + n, dtype=torch.float32)
    k = torch.stack([pos, pos], dim=-1).reshape(1, n, 2)
    return KVSegment(tuple(tokens), [k], [k.clone()], start, fp, context=context_hash(context) if context else "")


def test_match_inside_an_edge_and_across_segments() -> None:
    tree = RadixTree(FP)
    tree.insert([], seg([], [1, 2, 3, 4]))
    tree.insert([1, 2, 3, 4], seg([1, 2, 3, 4], [5, 6]))
    m = tree.match([1, 2, 3, 4, 5, 9])
    assert m.length == 5
    assert [t for p in m.pieces for t in p.token_ids] == [1, 2, 3, 4, 5]
    assert tree.match([1, 2, 7]).length == 2
    assert tree.match([7]).length == 0


def test_insert_branch_after_partial_edge_splits_it() -> None:
    tree = RadixTree(FP)
    tree.insert([], seg([], [1, 2, 3, 4]))
    tree.insert([1, 2], seg([1, 2], [8, 9]))
    assert tree.match([1, 2, 8, 9]).length == 4
    assert tree.match([1, 2, 3, 4]).length == 4
    pieces = tree.match([1, 2, 8]).pieces
    assert pieces[-1].segment.start == 2 and pieces[-1].lo == 0  # the new branch's own K/V


def test_missing_context_and_foreign_model_are_refused() -> None:
    tree = RadixTree(FP)
    with pytest.raises(CompositionError, match="context"):
        tree.insert([1, 2], seg([1, 2], [3]))
    other = Fingerprint("test/Other", 1, 1, 2, 10, "w2", "t", "float32")
    with pytest.raises(FingerprintMismatchError, match="architecture"):
        tree.insert([], seg([], [1], fp=other))
    with pytest.raises(CompositionError, match="different context"):
        tree.insert([1], seg([9], [3]))


def test_lru_eviction_keeps_the_budget() -> None:
    tree = RadixTree(FP, max_tokens=6)
    tree.insert([], seg([], [1, 2, 3]))
    tree.insert([], seg([], [4, 5, 6]))
    tree.match([4, 5, 6])  # touch the second
    tree.insert([], seg([], [7, 8, 9]))
    assert tree.cached_tokens <= 6
    assert tree.match([1, 2, 3]).length == 0
    assert tree.match([4, 5, 6]).length == 3


@settings(max_examples=60, deadline=None)
@given(
    paths=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=8), min_size=1, max_size=6),
    query=st.lists(st.integers(0, 4), min_size=0, max_size=10),
)
def test_match_is_longest_common_prefix_with_any_inserted_path(paths: list[list[int]], query: list[int]) -> None:
    tree = RadixTree(FP)
    for path in paths:
        cut = len(path) // 2
        head = tree.match(path[:cut])
        ctx = path[: head.length]
        tree.insert(ctx, seg(ctx, path[head.length :])) if head.length < len(path) else None
    m = tree.match(query)

    def lcp(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    assert m.length == max(lcp(p, query) for p in paths)
    assert [t for p in m.pieces for t in p.token_ids] == query[: m.length]
    # every slice carries the K/V of the absolute positions it covers
    keys = torch.cat([p.segment.keys[0][:, p.lo : p.hi] for p in m.pieces], dim=1) if m.pieces else torch.empty(1, 0, 2)
    assert keys[0, :, 0].tolist() == [float(i) for i in range(m.length)]


def test_a_chain_longer_than_the_budget_still_inserts_and_matches() -> None:
    tree = RadixTree(FP, max_tokens=3)
    tree.insert([], seg([], [1, 2, 3, 4]))
    tree.insert([1, 2, 3, 4], seg([1, 2, 3, 4], [5]))
    assert tree.match([1, 2, 3, 4, 5]).length == 5
