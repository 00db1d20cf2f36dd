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


def _held_tokens(tree: RadixTree) -> int:
    """Tokens of every distinct segment the tree keeps alive (what its memory really holds)."""
    nodes, held = [tree._root], {}
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children.values())
        if node.piece is not None:
            held[id(node.piece.segment)] = len(node.piece.segment)
    return sum(held.values())


def test_the_budget_bounds_the_memory_held_not_only_the_tokens_counted() -> None:
    """After a split, the part above kept the whole segment alive when the part below was evicted: the
    count stayed at the budget while memory grew without bound (48,775 tokens held for 1,000)."""
    for shared in (lambda i, prefix: list(range(10)), lambda i, prefix: prefix):
        tree, prefix = RadixTree(FP, max_tokens=1000), []
        for i in range(30):  # agent prompts of 1,000 tokens sharing a prefix, then diverging
            head = shared(i, prefix)
            ids = head + [100_000 + i] * (1000 - len(head))
            context = ids[: tree.match(ids).length]
            tree.insert(context, seg(context, ids[len(context) :]))
            prefix = ids[: len(prefix) + 1]
        assert tree.cached_tokens <= 1000 and _held_tokens(tree) <= 1000
        for ids in ([*range(10), *[100_029] * 990], prefix[:-1] + [100_029] * (1001 - len(prefix))):
            m = tree.match(ids)  # what is kept is still served, with the right K/V
            if m.length:
                keys = torch.cat([p.segment.keys[0][:, p.lo : p.hi] for p in m.pieces], dim=1)
                assert keys[0, :, 0].tolist() == list(range(m.length))


def test_a_segment_partly_cached_already_is_stored_without_the_cached_part() -> None:
    tree = RadixTree(FP)
    tree.insert([], seg([], [1, 2, 3]))
    tree.insert([], seg([], [1, 2, 3, 4, 5]))  # its first three tokens are in the tree already
    assert tree.cached_tokens == 5 and _held_tokens(tree) == 5
    m = tree.match([1, 2, 3, 4, 5])
    assert m.length == 5 and [p.segment.start + p.lo for p in m.pieces] == [0, 3]
    assert torch.cat([p.segment.keys[0][:, p.lo : p.hi] for p in m.pieces], dim=1)[0, :, 0].tolist() == [0, 1, 2, 3, 4]
