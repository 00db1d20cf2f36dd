"""A directory of named knowledge packs: a manifest plus one safetensors file per segment.

Layout: ROOT/packs/NAME/manifest.json and ROOT/packs/NAME/segments/ID.safetensors. A pack is written
into a temporary directory and swapped into place (`directory_swap`), so a crash or a bad build never
leaves a half pack behind and never destroys the pack it replaces, and readers never find the name
missing while it is rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    CorruptSegmentError,
    FingerprintMismatchError,
    InvalidInputError,
    UnknownKnowledgeBaseError,
)
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.default_model import kvpack_home
from ..runtime.file_modes import folder_mode
from ..runtime.fingerprint import NOT_RECORDED, Fingerprint
from ..runtime.paths import fsync_path, fsync_tree, usable_directory
from .directory_swap import asides, directory_lock, names_aside, replace_directory, restore_aside
from .segment import KVSegment, holds_exactly
from .serialization import atomic_write_bytes, load_segment, save_segment

MANIFEST_FORMAT = "kvpack-pack/1"
READ_ATTEMPTS = 16  # a reader gives up after this many rebuilds swapped in under it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch: `$` would allow a final newline
STALE_BUILD_SECONDS = 3600  # a build folder untouched this long belongs to a build that was killed


def default_store_dir() -> Path:
    """`$KVPACK_STORE`, else `$KVPACK_HOME/store` (~/.cache/kvpack/store)."""
    env = os.environ.get("KVPACK_STORE")
    return Path(env).expanduser() if env else kvpack_home() / "store"


@dataclass
class PackManifest:
    """What a pack holds and how it was built; the segment list is the composition order."""

    name: str
    model_name: str
    fingerprint: Fingerprint
    facts: list[str]
    knowledge_format: KnowledgeFormat
    segment_ids: list[str]
    storage_dtype: str
    token_count: int
    raw: bool = False
    computed_on: str = NOT_RECORDED  # the numerics (device, attention kernel) its K/V were computed under
    created: float = field(default_factory=time.time)
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # tells two builds of the same facts apart

    @property
    def lossless(self) -> bool:
        return holds_exactly(self.storage_dtype, self.fingerprint.dtype)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "name": self.name,
                "model_name": self.model_name,
                "fingerprint": json.loads(self.fingerprint.to_json()),
                "facts": self.facts,
                "knowledge_format": self.knowledge_format.to_dict(),
                "segment_ids": self.segment_ids,
                "storage_dtype": self.storage_dtype,
                "token_count": self.token_count,
                "raw": self.raw,
                "computed_on": self.computed_on,
                "created": self.created,
                "build_id": self.build_id,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: Path) -> PackManifest:
        try:
            data: dict[str, Any] = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("knowledge_format"), dict):
                raise ValueError("not a manifest object")
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(
                name=data["name"],
                model_name=data["model_name"],
                fingerprint=Fingerprint.from_json(json.dumps(data["fingerprint"])),
                facts=list(data["facts"]),
                knowledge_format=KnowledgeFormat.from_dict(data["knowledge_format"]),
                segment_ids=list(data["segment_ids"]),
                storage_dtype=data["storage_dtype"],
                token_count=int(data["token_count"]),
                raw=bool(data.get("raw", False)),
                computed_on=str(data.get("computed_on", NOT_RECORDED)),
                created=float(data.get("created", 0.0)),
                build_id=str(data.get("build_id", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptSegmentError(f"pack manifest {where} is malformed: {exc}") from exc


def _holds_manifest(folder: Path) -> bool:
    """Whether `folder` has a manifest; a folder that cannot be searched counts as one (opening it says why)."""
    try:
        return (folder / "manifest.json").is_file()
    except PermissionError:
        return folder.is_dir()


def _last_touched(folder: Path) -> float:
    """When a build folder last changed: its own and its `segments/` folder's modification times."""
    times = []
    for path in (folder, folder / "segments"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def validate_pack_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise InvalidInputError(
            f"invalid knowledge-base name {name!r}: use letters, digits, '.', '_' or '-' (max 128, no leading dot)"
        )
    return name


class PackStore:
    """Named packs under one root directory."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = usable_directory(root if root is not None else default_store_dir(), "pack store")
        self._current: dict[str, tuple[tuple[int, ...], PackManifest]] = {}

    @property
    def packs_dir(self) -> Path:
        return self.root / "packs"

    def pack_dir(self, name: str) -> Path:
        return self.packs_dir / validate_pack_name(name)

    def names(self) -> list[str]:
        """The packs in the store; a folder that cannot be searched (another user's, mode 000) is listed, so
        that opening it names the problem, rather than failing the whole listing."""
        if not self.packs_dir.is_dir():
            return []
        for name in names_aside(self.packs_dir):  # a rebuild a crash interrupted: its pack comes back
            if _NAME.fullmatch(name):
                self._restore(name)
        return sorted(p.name for p in self.packs_dir.iterdir() if _NAME.fullmatch(p.name) and _holds_manifest(p))

    def _restore(self, name: str) -> None:
        """Bring back a pack a crash left renamed aside; a reader that may not write the store (read-only,
        another user's) just does not find it, as before."""
        target = self.pack_dir(name)
        if target.exists() or not asides(target):
            return
        try:
            with directory_lock(target):
                restore_aside(target)
        except OSError:
            return

    def exists(self, name: str) -> bool:
        """Whether there is a pack `name` (one a crash left renamed aside comes back first, as in `names`)."""
        target = self.pack_dir(name)
        if not _holds_manifest(target):
            self._restore(name)
        return _holds_manifest(target)

    def manifest(self, name: str) -> PackManifest:
        path = self.pack_dir(name) / "manifest.json"
        return PackManifest.from_json(self._manifest_text(name), path)

    def _manifest_text(self, name: str) -> str:
        path = self.pack_dir(name) / "manifest.json"
        if not _holds_manifest(path.parent):
            self._restore(name)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise UnknownKnowledgeBaseError(
                f"no knowledge base named {name!r} in {self.root} (known: {known}); build it with `kvpack build`"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptSegmentError(f"pack manifest {path} is unreadable: {exc}") from exc

    def _same_build(self, name: str, text: str) -> bool:
        """Whether the pack is still the build whose manifest read `text` (a vanished pack is not)."""
        try:
            return self._manifest_text(name) == text
        except (UnknownKnowledgeBaseError, CorruptSegmentError):
            return False

    def current_manifest(self, name: str) -> PackManifest:
        """`manifest(name)`, re-read only when the file changed (a rebuild), so a per-request check costs a
        stat; the same object comes back while the pack is unchanged. A rebuild swaps in a new file, so
        the inode tells it apart even where two builds share an mtime (coarse timestamps, quick builds)."""
        path = self.pack_dir(name) / "manifest.json"
        try:
            st = path.stat()
            stamp: tuple[int, ...] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:  # not there (or unreadable): `manifest` says which
            stamp = ()
        cached = self._current.get(name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self.manifest(name))
            self._current[name] = cached
        return cached[1]

    def write(
        self, manifest: PackManifest, segments: Sequence[KVSegment], storage_dtype: torch.dtype | None = None
    ) -> Path:
        """Write a complete pack, replacing any pack of the same name only once the new one is whole."""
        target = self.pack_dir(manifest.name)
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{manifest.name}-", dir=self.packs_dir))
        try:
            for seg in segments:
                save_segment(seg, tmp / "segments" / f"{seg.id}.safetensors", storage_dtype)
            atomic_write_bytes(tmp / "manifest.json", manifest.to_json().encode())
            tmp.chmod(folder_mode())  # mkdtemp made it 0700; its files and subfolders already have plain modes
            fsync_tree(tmp)  # the folder entries too: after a power cut a published pack must hold every file
            with directory_lock(target):
                restore_aside(target)
                old = replace_directory(tmp, target)
                fsync_path(self.packs_dir)
                stale = self._leftovers(manifest.name, keep=old)
            for path in [*([old] if old is not None else []), *stale]:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def load_segments(
        self, name: str, expected: Fingerprint, device: str | torch.device = "cpu"
    ) -> tuple[PackManifest, list[KVSegment]]:
        """Load a pack's segments in composition order, refusing packs from another model.

        A rebuild may swap the pack in while it is read, even one of the same facts (same segment ids).
        The read is therefore a snapshot: the manifest is read again after the segments, and the whole
        read retried if another build (its own `build_id`) took its place in between."""
        path = self.pack_dir(name) / "manifest.json"
        for _ in range(READ_ATTEMPTS):
            text = self._manifest_text(name)
            manifest = PackManifest.from_json(text, path)
            if manifest.fingerprint != expected:
                raise FingerprintMismatchError(
                    f"knowledge base {name!r} was built with model {manifest.model_name!r}, which differs from the "
                    "loaded model: "
                    + "; ".join(expected.mismatches(manifest.fingerprint))
                    + f". Rebuild it with `kvpack build ... --kb {name}` on this model."
                )
            seg_dir = path.parent / "segments"
            try:
                segments = [
                    load_segment(seg_dir / f"{sid}.safetensors", expected, device) for sid in manifest.segment_ids
                ]
            except CorruptSegmentError:
                if self._same_build(name, text):
                    raise  # the pack itself is damaged, not replaced
                continue
            if self._same_build(name, text):
                return manifest, segments
        raise CorruptSegmentError(
            f"knowledge base {name!r} was rebuilt {READ_ATTEMPTS} times while it was being read; no whole pack "
            "could be read (try again once the builds have finished)"
        )

    def _leftovers(self, name: str, keep: Path | None) -> list[Path]:
        """Folders killed builds and deletes of `name` left behind (each a whole copy of a pack): deletes
        renamed away, and build folders untouched for `STALE_BUILD_SECONDS` (a live build keeps adding
        files to its folder; another process may be writing one now)."""
        building = re.compile(rf"\.build-{re.escape(name)}-[a-z0-9_]{{8}}")
        deleting = re.compile(rf"\.deleting-{re.escape(name)}-[0-9]+")
        now = time.time()

        def stale(path: Path) -> bool:
            if deleting.fullmatch(path.name):
                return True
            return building.fullmatch(path.name) is not None and now - _last_touched(path) > STALE_BUILD_SECONDS

        return [path for path in self.packs_dir.iterdir() if path != keep and stale(path)]

    def delete(self, name: str) -> None:
        """Remove a pack: renamed away first, so an interrupted delete never leaves a manifest without
        its segments."""
        target = self.pack_dir(name)
        with directory_lock(target):
            doomed = [*asides(target)]  # a stale aside must not come back as the deleted pack
            if target.exists():
                doomed.append(target.rename(target.with_name(f".deleting-{name}-{time.time_ns()}")))
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    def size_bytes(self, name: str) -> int:
        return sum(p.stat().st_size for p in self.pack_dir(name).rglob("*") if p.is_file())
