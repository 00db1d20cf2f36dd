"""A knowledge base bound to a chat model: a stored pack kept resident in the engine's prefix tree.

The tree is bounded and evicts least recently used runs, so a pack may drop out between calls. Each
request therefore checks that the pack's tokens are still cached and reloads the pack from the store
(verified against the model) if not: served from disk, never recomputed. A pack rebuilt in the store
(`kvpack build` again) is noticed by its manifest's modification time and used from the next request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..composition.radix_tree import RadixTree
from ..errors import InvalidInputError
from ..runtime.loader import LoadedModel
from ..segments.pack_store import PackManifest, PackStore
from .packs import knowledge_prompt, load_pack


@dataclass
class BoundPack:
    store: PackStore
    name: str
    _manifest: PackManifest | None = field(default=None, repr=False)
    _ids: list[int] = field(default_factory=list, repr=False)

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
        """Load the pack into `tree` unless all its tokens are cached; True if it was (re)loaded."""
        manifest = self.manifest()
        if not self._ids:
            prompt = knowledge_prompt(loaded.tokenizer, manifest.facts, None, manifest.knowledge_format)
            self._ids = prompt.token_ids[: manifest.token_count]
        if tree.match(self._ids).length >= len(self._ids):
            return False
        load_pack(loaded, tree, self.store, self.name)
        return True
