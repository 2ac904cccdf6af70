"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile

__all__ = ["write_atomic", "public_mode"]


def public_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give under the process's umask (0644 / 0755 usually):
    the temporary files and folders behind an atomic write are created private (0600 / 0700), and
    the results must not stay so (a report's PNGs served by another user, a shared index)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status, so that no
    other thread ever creates a file under a zero umask); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write, suffix: str | None = None) -> str:
    """Make ``path`` by calling ``write(tmp)`` on a temporary file in the same folder, then renaming it.

    The folder is created if needed. The temporary file (``.tmp-*``, ending in ``suffix``, default: the
    extension of ``path``) exists, empty and private (mode 0600), when ``write`` is called; ``write`` opens
    it by name; the result gets the umask's usual mode. If anything fails, the temporary file is removed
    and ``path`` is left as it was.
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
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
