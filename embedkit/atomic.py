"""Atomic file replacement for records, checkpoints and memos on local (possibly shared) disks.

``atomic_write(path, write)`` lets ``write`` fill a temporary file beside ``path`` and then
renames it into place, so readers see the old file or the whole new one, never a torn one.
The temporary file gets the mode a plain ``open()`` would give (``0o666`` minus the umask), not
``mkstemp``'s private ``0o600``, so the other users of a shared results or cache folder can read
what it publishes. (Cache entries use :meth:`embedkit.store.CacheRoot.write_bytes_atomic`, which
adds fsync and object-store support.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "shared_mode"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def shared_mode() -> int:
    """The mode of a file created by a plain ``open()`` in this process."""
    return 0o666 & ~_UMASK


def atomic_write(path: Path, write: Callable[[str], object], *, suffix: str = "") -> None:
    """Create or replace ``path`` with what ``write(tmp_path)`` writes to a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # after the write: some writers (safetensors) recreate the file they are given
        os.chmod(tmp, shared_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
