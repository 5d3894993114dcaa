"""Files: written so that readers see the old content or the new, never a part; folders checked for writing.

`atomic_write` sends the bytes to a temporary file in the same folder, fsyncs
it and renames it over the target (a rename within one file system is
atomic). A writer killed half-way leaves at most a hidden `.<name>.*.tmp`
file, which is never read.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def writable_folder(path: str | os.PathLike) -> Path | None:
    """The existing folder that writing below `path` (a folder, existing or not) would land in, if a file
    can really be made there; None if not. A test file is made and removed: permission bits alone miss
    read-only file systems and root."""
    base = Path(path)
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return None
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".wsml-probe-")
    except OSError:
        return None
    os.close(fd)
    os.unlink(probe)
    return base
