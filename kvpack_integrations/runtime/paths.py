"""Paths a user names (a store, a records file), checked before any work: a file where a folder must
be, or a folder where a file must be, is refused by name up front, not after an hour of evaluation or
as an OS error from deep inside a write."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidInputError


def _refuse_blocked_parent(path: Path, what: str) -> None:
    """Refuse `path` if the nearest existing path above it is not a folder (nothing can be created under it)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"the {what} {path} cannot be created: {parent} is a file, not a folder")
            return


def usable_directory(path: str | Path, what: str) -> Path:
    """`path` as a folder that exists or can be created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"the {what} {path} is a file, not a folder")
    _refuse_blocked_parent(path, what)
    return path


def usable_file(path: str | Path, what: str) -> Path:
    """`path` as a file that exists or can be created."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InvalidInputError(f"the {what} {path} is a folder, not a file")
    _refuse_blocked_parent(path, what)
    return path


def read_text_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file the user named; a missing, unreadable or non-UTF-8 file is
    refused by name. Lines end at "\n" (or "\r\n") only: `str.splitlines` also splits at U+2028, U+2029,
    U+0085 and form feeds, which JSON written with `ensure_ascii=False` keeps inside its strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InvalidInputError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    return [line.removesuffix("\r") for line in lines]


def fsync_path(path: Path) -> None:
    """Flush one file or folder to disk (folders that cannot be opened are skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file of a staged copy, then its folder: the rename that publishes it must not land on
    disk before the data does (after a crash, a published copy would be cut short)."""
    for path in sorted(root.rglob("*")):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(root)
