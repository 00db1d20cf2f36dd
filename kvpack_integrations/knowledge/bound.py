"""A knowledge base bound to a chat model: a stored pack kept resident in the engine's prefix tree.

The tree is bounded and evicts least recently used runs, so a pack may drop out between calls. Each
request therefore checks that the pack's tokens are still cached and reloads the pack from the store
(verified against the model) if not: served from disk, never recomputed. A pack rebuilt in the store
(`kvpack build` again) is noticed by its manifest's modification time and used from the next request.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from ..composition.radix_tree import RadixTree
from ..errors import InvalidInputError
from ..runtime.loader import LoadedModel
from ..segments.pack_store import PackManifest, PackStore
from .packs import knowledge_prompt


@dataclass
class BoundPack:
    store: PackStore
    name: str
    _manifest: PackManifest | None = field(default=None, repr=False)
    _ids: list[int] = field(default_factory=list, repr=False)
    # per prefix tree: the build loaded into it and its tokens (a rebuild's K/V must replace that build's)
    _resident: weakref.WeakKeyDictionary[RadixTree, tuple[str, list[int]]] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )

    @classmethod
    def open(cls, store: str | None, name: str) -> BoundPack:
        """The pack `name` in `store` (default: $KVPACK_STORE); a missing pack is named now, not at the first call."""
        pack_store = PackStore(store)
        pack_store.manifest(name)
        return cls(pack_store, name)

    def manifest(self) -> PackManifest:
        """The pack's current manifest (raises `UnknownKnowledgeBaseError` naming the store if it is gone)."""
        manifest = self.store.current_manifest(self.name)
        if manifest is not self._manifest:  # first use, or rebuilt since
            if manifest.raw:
                raise InvalidInputError(
                    f"knowledge base {self.name!r} was built from raw, untemplated text (the --raw ablation); "
                    "a chat model renders knowledge with its chat template, so rebuild it without --raw"
                )
            self._manifest, self._ids = manifest, []
        return manifest

    def ensure_resident(self, loaded: LoadedModel, tree: RadixTree) -> bool:
        """Load the pack into `tree` unless all its tokens are cached; True if it was (re)loaded.

        The check uses the tokens the pack holds, learned when it is loaded: rendering the facts again
        gives other tokens when the template prints today's date, and the pack would be reloaded at every
        request without ever matching."""
        manifest = self.manifest()
        if not self._ids:
            prompt = knowledge_prompt(loaded.tokenizer, manifest.facts, None, manifest.knowledge_format)
            self._ids = prompt.token_ids[: manifest.token_count]
        held = self._resident.get(tree)
        if held is not None and held[0] != manifest.build_id:
            # rebuilt since it was loaded here: the same tokens, other K/V (another machine's, another dtype);
            # the tree keeps what it holds, so the old build goes first, with the prompts cached on top of it
            tree.forget(held[1], 0)
            del self._resident[tree]
        elif tree.match(self._ids).length >= len(self._ids):
            return False
        stored, segments = self.store.load_segments(self.name, loaded.fingerprint, device=loaded.device)
        tree.insert_chain(segments)
        ids = [t for segment in segments for t in segment.token_ids]
        self._resident[tree] = (stored.build_id, ids)
        if stored.build_id == manifest.build_id:  # not a build that landed in between
            self._ids = ids
        return True

    def prefix_note(self, prompt_ids: list[int]) -> str | None:
        """Why a prompt reuses only part of this pack, if it does: the prompt does not start with the
        pack's tokens (a template that puts tools ahead of the system text, or that prints another day's
        date). None when the whole pack is a prefix of the prompt, or the pack was not loaded yet."""
        ids = self._ids
        if not ids or prompt_ids[: len(ids)] == ids:
            return None
        at = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
        return (
            f"knowledge base {self.name!r} is not a prefix of this prompt: the rendering departs from the pack's "
            f"tokens at token {at} of its {len(ids)} (the chat template puts something else ahead of the "
            f"knowledge, such as tool definitions or today's date), so only its first {at} tokens were reused; "
            "the rest was prefilled (still exact)"
        )
