"""Record the order of fsyncs and renames, to test that data reaches the disk before a rename publishes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def record_fsyncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """From now on, every `os.fsync` (by the path its descriptor names) and `Path.rename` (by its source),
    in order; both still happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: str | os.PathLike[str]) -> Path:
        events.append(("rename", str(self)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    return events


def synced_before_publishing(events: list[tuple[str, str]], marker: str) -> tuple[Path, set[str], int]:
    """(staged folder, paths fsynced before it was renamed into place, index of that rename) for the first
    rename of a path containing `marker`."""
    published = next(i for i, (kind, path) in enumerate(events) if kind == "rename" and marker in path)
    synced = {path for kind, path in events[:published] if kind == "fsync"}
    return Path(events[published][1]), synced, published
