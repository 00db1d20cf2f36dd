"""Putting a finished directory in place of another, with no moment where neither is there.

Linux swaps the two names in one step (`renameat2(RENAME_EXCHANGE)`). Elsewhere, or on a file system
that cannot, the old directory is first renamed aside (`.old-NAME-<ns>`) and the new one renamed in;
a crash between the two renames leaves the old one aside, and `restore_aside` puts it back. Writers of
one name take `directory_lock`, so two builds of a pack never interleave their renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: writers are not serialised across processes
    fcntl = None  # type: ignore[assignment]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_ASIDE = ".old-"  # a directory renamed aside is `.old-NAME-<ns>`


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or the file system cannot."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(new: Path, target: Path) -> Path | None:
    """Put `new` at `target`. Returns where the previous directory now is (for the caller to delete), or
    None if there was none."""
    if not target.exists():
        new.rename(target)
        return None
    if _exchange(new, target):
        return new  # the previous directory now has the name the new one was built under
    aside = target.with_name(f"{_ASIDE}{target.name}-{time.time_ns()}")
    target.rename(aside)
    try:
        new.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    return aside


def _parse_aside(path: Path) -> tuple[str, int] | None:
    """(name, ns) of a directory renamed aside, None for anything else."""
    if not path.name.startswith(_ASIDE):
        return None
    name, _, suffix = path.name.removeprefix(_ASIDE).rpartition("-")
    return (name, int(suffix)) if name and suffix.isdigit() else None


def asides(target: Path) -> list[Path]:
    """Previous directories of `target` renamed aside and not yet removed, oldest first."""
    found = []
    for path in target.parent.glob(f"{_ASIDE}{target.name}-*"):
        parsed = _parse_aside(path)
        if parsed is not None and parsed[0] == target.name:
            found.append((parsed[1], path))
    return [path for _, path in sorted(found)]


def names_aside(parent: Path) -> set[str]:
    """Names in `parent` that have a previous directory renamed aside."""
    return {parsed[0] for path in parent.glob(f"{_ASIDE}*") if (parsed := _parse_aside(path)) is not None}


def restore_aside(target: Path) -> bool:
    """If `target` is missing and a crash left its previous directory renamed aside, put the newest back
    and remove older ones. Call it holding `directory_lock(target)`."""
    if target.exists():
        return False
    found = asides(target)
    if not found:
        return False
    found[-1].rename(target)
    for stale in found[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    return True


@contextlib.contextmanager
def directory_lock(target: Path) -> Iterator[None]:
    """An exclusive lock (the file `.locks/NAME` beside `target`, kept: removing a lock file others may be
    waiting on would let two writers in) for writing, deleting or restoring `target`."""
    if fcntl is None:
        yield
        return
    locks = target.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / target.name, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
