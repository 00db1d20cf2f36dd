"""Which options belong to which knowledge backend, so a retriever refuses the ones it would ignore.

A stored pack (`backend="pack"`) is searched in-process over its facts; a Chroma knowledge base
(`backend="chroma"`) is routed through its banks, embedded or on a server. Options of the other backend
would be accepted and silently mean nothing: both integrations' retrievers refuse them by name here.
"""

from __future__ import annotations

from collections.abc import Collection

from ..errors import InvalidInputError

CHROMA_OPTIONS = ("chroma_path", "host", "port", "probes", "lexical_weight")
PACK_OPTIONS = ("store",)


def refuse_other_backends_options(backend: str, given: Collection[str]) -> None:
    """Refuse the options in `given` (names the caller set) that `backend` does not use."""
    if backend not in ("pack", "chroma"):
        raise InvalidInputError(f"unknown backend {backend!r}: use 'pack' or 'chroma'")
    if backend == "pack":
        unused = sorted(name for name in CHROMA_OPTIONS if name in given)
        if unused:
            raise InvalidInputError(
                f"backend='pack' does not use {', '.join(unused)}: options of backend='chroma' (a Chroma "
                "knowledge base); a stored pack is searched without them, so given here they would be ignored"
            )
    elif any(name in given for name in PACK_OPTIONS):
        raise InvalidInputError(
            "backend='chroma' does not use store= (the pack store of backend='pack'): its knowledge base is "
            "at chroma_path= or on a Chroma server at host=, so given here it would be ignored"
        )
