"""Files and folders the package writes get the modes a plain `open()` or `mkdir()` would give them.

Atomic writes go through `mkstemp`/`mkdtemp`, which create 0600 files and 0700 folders (safetensors'
`save_file` also writes 0600). A pack store, packet store or converted-model cache shared between users
or services would then be readable by its writer alone. The process umask is read once, at import.
"""

from __future__ import annotations

import os
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def file_mode() -> int:
    """What `open(path, "w")` would create under this process's umask."""
    return 0o666 & ~_UMASK


def folder_mode() -> int:
    """What `mkdir` would create under this process's umask."""
    return 0o777 & ~_UMASK


def publish_tree(root: Path) -> None:
    """Give a folder written under a temporary name (and everything in it) the usual modes."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(folder_mode() if path.is_dir() else file_mode())
