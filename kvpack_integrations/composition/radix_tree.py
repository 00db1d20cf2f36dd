"""A radix tree over token ids whose edges are slices of cached segments (cf. SGLang's RadixAttention).

The path from the root to a point in the tree is a token sequence; the K/V for that sequence is the
concatenation of the slices along the path. Because attention is causal, any prefix of a cached run
is itself a valid cache, so a match may end inside an edge. Matching compares token ids of the
prompt's single rendering, which is what makes reuse exact: no ids equal, no reuse.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import CompositionError, FingerprintMismatchError
from ..runtime.fingerprint import Fingerprint
from ..segments.segment import KVSegment, context_hash


@dataclass(frozen=True)
class SegmentSlice:
    """Tokens [lo, hi) of a segment."""

    segment: KVSegment
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.segment.token_ids[self.lo : self.hi]

    def head(self, n: int) -> SegmentSlice:
        return SegmentSlice(self.segment, self.lo, self.lo + n)

    def tail(self, n: int) -> SegmentSlice:
        return SegmentSlice(self.segment, self.lo + n, self.hi)


@dataclass
class _Node:
    piece: SegmentSlice | None
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.piece.token_ids if self.piece is not None else ()


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a token sequence, as slices in order."""

    length: int
    pieces: tuple[SegmentSlice, ...]

    def truncated(self, n: int) -> PrefixMatch:
        """The same match limited to its first `n` tokens."""
        out, left = [], n
        for piece in self.pieces:
            if left <= 0:
                break
            out.append(piece if len(piece) <= left else piece.head(left))
            left -= len(out[-1])
        return PrefixMatch(min(n, self.length), tuple(out))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RadixTree:
    """Cached token prefixes for one model; bounded by `max_tokens` with LRU eviction of leaves."""

    def __init__(self, fingerprint: Fingerprint, max_tokens: int | None = None) -> None:
        self.fingerprint = fingerprint
        self.max_tokens = max_tokens
        self._root = _Node(piece=None, parent=None)
        self._clock = itertools.count(1)
        self._tokens = 0

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def _split(self, node: _Node, at: int) -> _Node:
        """Split `node`'s edge after `at` tokens; returns the new upper node."""
        assert node.piece is not None and node.parent is not None and 0 < at < len(node.piece)
        upper = _Node(piece=node.piece.head(at), parent=node.parent, last_used=node.last_used)
        node.parent.children[upper.tokens[0]] = upper
        node.piece = node.piece.tail(at)
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def match(self, ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of `ids` (touches the nodes it uses for LRU)."""
        node, pos, pieces = self._root, 0, []
        tick = next(self._clock)
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None or child.piece is None:
                break
            n = _common(child.tokens, ids[pos:])
            child.last_used = tick
            pieces.append(child.piece if n == len(child.piece) else child.piece.head(n))
            pos += n
            if n < len(child.piece):
                break
            node = child
        return PrefixMatch(pos, tuple(pieces))

    def _descend(self, ids: Sequence[int]) -> tuple[_Node, int]:
        """Walk `ids` fully, splitting an edge where they end inside it; returns (node, tokens walked)."""
        node, pos = self._root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None or child.piece is None:
                return node, pos
            n = _common(child.tokens, ids[pos:])
            if n < len(child.piece):  # ends inside this edge (n >= 1: the first token matched)
                return self._split(child, n), pos + n
            node, pos = child, pos + n
        return node, pos

    def insert(self, context_ids: Sequence[int], segment: KVSegment) -> None:
        """Add `segment`, computed after `context_ids`, which must already be cached (or empty)."""
        if segment.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                "segment from another model: " + "; ".join(self.fingerprint.mismatches(segment.fingerprint))
            )
        if segment.start != len(context_ids) or segment.context != (context_hash(context_ids) if context_ids else ""):
            raise CompositionError(
                f"segment {segment.id} starts at {segment.start} after a different context than the "
                f"{len(context_ids)} tokens it is inserted under"
            )
        full = list(context_ids) + list(segment.token_ids)
        node, walked = self._descend(full)
        if walked < len(context_ids):
            raise CompositionError(
                f"cannot insert segment {segment.id}: only {walked} of its {len(context_ids)} context tokens are "
                "cached (compose its parent first)"
            )
        if walked == len(full):
            return  # every token already cached
        lo = walked - len(context_ids)
        if lo:  # the tree holds the first `lo` tokens already: keep only the rest, not the whole segment
            segment = segment.part(lo, len(segment), context_hash(full[:walked]))
        piece = SegmentSlice(segment, 0, len(segment))
        child = _Node(piece=piece, parent=node, last_used=next(self._clock))
        node.children[piece.token_ids[0]] = child
        self._tokens += len(piece)
        self._evict(protect=child)

    def forget(self, ids: Sequence[int], start: int = 0) -> int:
        """Drop what is cached of `ids` from position `start` on, with everything cached after it (their K/V
        were computed on top); returns the tokens dropped. For K/V about to be replaced by better ones for
        the same tokens (`insert` keeps what it holds): recomputed exactly, or a rebuilt pack."""
        if start >= len(ids):
            return 0
        node, walked = self._descend(ids[:start]) if start else (self._root, 0)
        child = node.children.get(ids[start]) if walked == start else None
        if child is None or child.piece is None:
            return 0
        del node.children[ids[start]]
        dropped, stack = 0, [child]
        while stack:
            below = stack.pop()
            dropped += len(below.piece) if below.piece is not None else 0
            stack.extend(below.children.values())
        self._tokens -= dropped
        self._compact(node, child.piece.segment)
        return dropped

    def insert_chain(self, segments: Sequence[KVSegment], context_ids: Sequence[int] = ()) -> None:
        """Insert segments that continue one another, the first one computed after `context_ids`."""
        context = list(context_ids)
        for seg in segments:
            self.insert(context, seg)
            context.extend(seg.token_ids)

    def _leaves(self) -> Iterator[_Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                yield node

    def _evict(self, protect: _Node) -> None:
        """Drop least recently used leaves until within budget; the node just inserted always stays
        (so a chain longer than the budget can still be inserted and used; the budget is soft)."""
        if self.max_tokens is None:
            return
        while self._tokens > self.max_tokens:
            candidates = (n for n in self._leaves() if n is not protect)
            leaf = min(candidates, key=lambda n: n.last_used, default=None)
            if leaf is None or leaf.parent is None or leaf.piece is None:
                return
            del leaf.parent.children[leaf.tokens[0]]
            self._tokens -= len(leaf.piece)
            self._compact(leaf.parent, leaf.piece.segment)

    def _compact(self, node: _Node, segment: KVSegment) -> None:
        """After a split edge's lower part is evicted, the nodes above still slice its segment, whose
        tensors stay alive whole: give each of them a copy of just its own tokens, so the budget counts
        what is held."""
        while node.piece is not None and node.piece.segment is segment and node.parent is not None:
            context: list[int] = []
            above = node.parent
            while above.piece is not None:
                context[:0] = above.tokens
                above = above.parent  # type: ignore[assignment]
            piece = node.piece
            node.piece = SegmentSlice(
                segment.part(piece.lo, piece.hi, context_hash(context) if context else ""), 0, len(piece)
            )
            node = node.parent

    def clear(self) -> None:
        self._root = _Node(piece=None, parent=None)
        self._tokens = 0
