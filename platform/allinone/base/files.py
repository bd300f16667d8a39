"""Atomic writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    return write_atomic_with(
        path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    )


def write_atomic_with(path: Path, write: Callable[[Path], object]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary name starts with a dot and the target's name, so a listing of complete files
    (``*.png``, ``*.tar``) never includes it; a failed write removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _honour_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _honour_umask(path: Path) -> None:
    # mkstemp creates files 0600 whatever the umask; the file we publish gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
