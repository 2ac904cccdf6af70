"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile

__all__ = ["write_atomic"]


def write_atomic(path, write, suffix: str | None = None) -> str:
    """Make ``path`` by calling ``write(tmp)`` on a temporary file in the same folder, then renaming it.

    The folder is created if needed. The temporary file (``.tmp-*``, ending in ``suffix``, default: the
    extension of ``path``) exists, empty and private (mode 0600), when ``write`` is called; ``write`` opens
    it by name. If anything fails, the temporary file is removed and ``path`` is left as it was.
    Returns ``path`` as a str.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] if suffix is None else suffix,
                               dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
