"""Atomic, checksummed directories of safetensors tensors plus a JSON manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading

import torch
from safetensors.torch import load, load_file, save_file

from .atomic import public_mode

try:
    import fcntl
except ImportError:  # (not on Windows: writers of one path are then not serialised)
    fcntl = None

__all__ = ["write_bundle", "read_bundle", "recover_interrupted_write", "is_bundle", "BundleError"]

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


class BundleError(ValueError):
    """A directory that is not a readable bundle of the expected kind (missing, corrupt, foreign)."""


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _stream_sha256(f)


def _stream_sha256(f) -> str:
    """SHA-256 of what is left to read of the binary file ``f``, a MiB at a time."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _manifest_sha256(manifest: dict) -> str:
    """Checksum of a manifest's content (its canonical JSON, without the checksum itself): a flipped digit
    of images_seen or of a map size would otherwise load as valid JSON, silently wrong."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_bundle(path) -> bool:
    """Whether ``path`` is a directory shaped as ``write_bundle`` makes them, intact or corrupt: it holds
    nothing but a manifest and a tensors file (or nothing). Anything else is not for this package to
    replace or delete (another program's folder may hold a manifest.json too)."""
    try:
        return set(os.listdir(path)) <= {MANIFEST, TENSORS}
    except OSError:  # missing, or not a directory
        return False


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bundle(path: str, kind: str, version: int, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``path`` (a directory) atomically: readers see the old bundle or the new one, never a mix.
    A symbolic link is followed: its target is replaced, the link stays. Writers of one path (processes
    or threads) take turns (``writer_lock``): each would otherwise delete the other's temporary folder
    as the leftover of a killed write."""
    path = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with writer_lock(path):
        _write_bundle_locked(path, parent, kind, version, manifest, tensors)


def _write_bundle_locked(path, parent, kind, version, manifest, tensors) -> None:
    recover_interrupted_write(path)  # (before this write's own .tmp- folder exists)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        tensor_path = os.path.join(tmp, TENSORS)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tensor_path)
        os.chmod(tensor_path, public_mode())  # safetensors creates it private (0600), unlike the manifest
        with open(tensor_path, "rb+") as f:
            os.fsync(f.fileno())
        full = {"format": kind, "format_version": version, **manifest, "tensors_sha256": _sha256(tensor_path)}
        full["manifest_sha256"] = _manifest_sha256(full)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(full, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.chmod(tmp, public_mode(directory=True))
        if os.path.lexists(path) and not is_bundle(path):
            raise BundleError(f"refusing to overwrite {path}: it exists and is not a neuroidx_fast bundle (move it "
                              "away, or save elsewhere)")
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_held = threading.local()  # the paths whose writer lock this thread holds (taken again: no wait)


def _lock_file(path: str) -> str:
    """The lock file of writers of ``path`` (a real path): ``.<name>.lock`` beside it, hidden, outside the
    bundle, and named unlike the ``<name>.tmp-*`` / ``<name>.old-*`` folders that writes leave."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.lock")


@contextlib.contextmanager
def writer_lock(path):
    """Hold the advisory lock (``flock``) of writers of ``path`` for the block: writes, recoveries and
    removals of one bundle take turns, so that none deletes another's live ``.tmp-`` / ``.old-`` folder
    as debris. Readers take no lock (a write's renames keep them whole). The lock file is deleted by its
    holder on release; one left by a killed holder (whose lock the system released) is taken by the
    next writer and deleted then. Re-entrant in one thread; no lock where the system offers none
    (``fcntl`` missing, a folder that cannot hold the file): writers then run as before, unserialised."""
    path = os.path.realpath(os.fspath(path))
    held = _held.__dict__.setdefault("paths", set())
    if fcntl is None or path in held:
        yield
        return
    lock_path, fd = _lock_file(path), None
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except PermissionError:  # (another user's lock file, in a folder this process cannot write to)
            try:
                fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                fd = None
                break
        except OSError:  # no such folder, read-only, a directory in the way: as without the lock
            fd = None
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder before deletes the file on release: if it did after this open, a writer may
            # have locked a new file of that name meanwhile, so lock that one instead
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        except OSError:  # no flock on this file system
            os.close(fd)
            fd = None
            break
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    held.add(path)
    try:
        yield
    finally:
        held.discard(path)
        if fd is not None:
            try:
                os.unlink(lock_path)  # (before the unlock: a writer waiting on this file then looks again)
            except OSError:
                pass
            os.close(fd)


def replace_directory(new, path) -> None:
    """Put the finished directory ``new`` (a sibling of ``path``, named ``<name>.tmp-*``) at ``path``: the
    old one is moved aside (``<name>.old-*``) and ``new`` moved in, two renames, so that readers see the
    old directory or the new one whole, never a mix; then the old one goes, with what killed writes left
    beside ``path``. Under the writer lock of ``path`` (``writer_lock``)."""
    path = os.path.realpath(os.fspath(path))
    with writer_lock(path):
        _replace_directory_locked(new, path)


def _replace_directory_locked(new: str, path: str) -> None:
    parent = os.path.dirname(path)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(new, path)
    _fsync_dir(parent)
    if old:
        _discard(old)
    _remove_leftovers(path)


def _discard(folder: str) -> None:
    """Delete a folder set aside, its manifest first: a deletion killed half way leaves no folder that
    ``recover_interrupted_write`` would take for a complete bundle."""
    try:
        os.unlink(os.path.join(folder, MANIFEST))
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def _remove_leftovers(path: str) -> None:
    """The ``<name>.tmp-*`` and ``<name>.old-*`` folders of earlier writes of ``path`` that were killed
    (as big as the bundle); ``path`` itself, complete, supersedes them. Only under the writer lock: no
    other write of ``path`` is under way then, so none of them is live."""
    parent, name = os.path.split(path)
    for entry in os.listdir(parent):
        if entry.startswith((name + ".tmp-", name + ".old-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def remove_bundle(path) -> None:
    """Delete the bundle ``path`` and whatever killed writes of it left beside it."""
    path = os.path.realpath(os.fspath(path))
    with writer_lock(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.isdir(os.path.dirname(path)):
            _remove_leftovers(path)


def _interrupted_write(path: str) -> str | None:
    """The bundle to put back at ``path`` (missing) that a ``write_bundle`` killed between its two renames
    left beside it: the new one if it was complete (``<name>.tmp-*`` with its manifest, written last),
    else the old one (``<name>.old-*``). None unless an old one was set aside: a ``.tmp-`` folder alone
    is a write that never replaced anything (killed before its renames, or the bundle deleted since)."""
    if os.path.lexists(path):
        return None
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return None

    def complete(marker):
        return [os.path.join(parent, e) for e in entries
                if e.startswith(name + marker) and os.path.exists(os.path.join(parent, e, MANIFEST))]

    def mtime(folder):
        try:
            return os.path.getmtime(folder)
        except OSError:  # gone since it was listed (a save under way moved it in, or deleted it)
            return None

    new, old = complete(".tmp-"), complete(".old-")
    if not old:
        return None
    found = [(when, folder) for folder in new or old if (when := mtime(folder)) is not None]
    return max(found, key=lambda pair: pair[0])[1] if found else None


def recover_interrupted_write(path) -> bool:
    """Put back at ``path`` the bundle a killed ``write_bundle`` left beside it (``_interrupted_write``);
    for a writer (readers only read it where it lies). True if one was put back. Under the writer lock of
    ``path``: a live write's folders are not taken for a killed one's."""
    path = os.path.abspath(os.fspath(path))
    if _interrupted_write(path) is None:  # (the usual case, seen without making a lock file)
        return False
    with writer_lock(path):
        found = _interrupted_write(path)
        if found is None:
            return False
        os.replace(found, path)
        if os.path.basename(found).startswith(os.path.basename(path) + ".tmp-"):  # the old ones are stale now
            parent, name = os.path.split(path)
            for entry in os.listdir(parent):
                if entry.startswith(name + ".old-"):
                    _discard(os.path.join(parent, entry))
    return True


def read_bundle(path: str, kind: str, max_version: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a bundle written by ``write_bundle``; a clear BundleError for anything wrong.

    Both files are read through one open handle of the directory, so a save that replaces the bundle
    meanwhile (two renames) gives the old bundle or the new one, never the manifest of one with the
    tensors of the other; a read that loses its files to the replacement is tried again. Nothing is
    moved: a bundle a killed write left beside ``path`` is read where it lies."""
    path = os.fspath(path)
    for attempt in range(3):
        try:
            return _read_bundle_once(path, kind, max_version)
        except _Replaced:
            if attempt == 2:
                raise BundleError(f"{path} kept being replaced while it was read: read it once its writer is done")
    raise AssertionError("unreachable")


class _Replaced(Exception):
    """A bundle's files went away while it was read (a save replaced the bundle)."""


def _read_bundle_once(path: str, kind: str, max_version: int) -> tuple[dict, dict[str, torch.Tensor]]:
    existed = os.path.lexists(path)
    where = path if existed else (_interrupted_write(os.path.abspath(path)) or path)
    if not os.path.isdir(where):
        # the folder of a write found beside the missing path and moved in (or deleted) since, or the
        # path moved aside or put back since it was looked at: a save is under way, look again
        if where != path or os.path.isdir(path) or os.path.lexists(path) != existed:
            raise _Replaced()
        # still none: unless saves came and went between those looks (each makes the path missing a
        # moment), which only a look while none is under way tells (under the writers' lock)
        with writer_lock(path):
            if os.path.isdir(path) or _interrupted_write(os.path.abspath(path)) is not None:
                raise _Replaced()
        raise BundleError(f"{path} is not a directory written by neuroidx_fast ({kind})")
    try:
        folder = os.open(where, os.O_RDONLY)
    except FileNotFoundError:
        raise _Replaced() from None
    except OSError as exc:
        raise BundleError(f"{path} cannot be opened: {exc}") from None
    try:
        manifest_bytes = _read_in(folder, MANIFEST)
        if manifest_bytes is None:
            if _moved(folder, where):  # set aside and being deleted by a save: read the new one
                raise _Replaced()
            raise BundleError(f"{path} has no {MANIFEST}: not a {kind} bundle, or an interrupted write")
        manifest = _parse_manifest(manifest_bytes, os.path.join(path, MANIFEST), kind, max_version)
        tensor_path = os.path.join(path, TENSORS)
        fd = _open_in(folder, TENSORS, path)
        if fd is None:
            if _moved(folder, where):
                raise _Replaced()
            raise BundleError(f"{path} lacks {TENSORS}: the bundle is incomplete")
        try:
            # streamed, then loaded from the same open file: memory mapped where the system names open
            # files (/proc/self/fd), else read whole
            with os.fdopen(os.dup(fd), "rb") as f:
                checksum = _stream_sha256(f)
            if checksum != manifest.get("tensors_sha256"):
                raise BundleError(f"{tensor_path} does not match its checksum: the file is corrupt or truncated")
            tensors = _load_tensors(fd, tensor_path)
        except OSError as exc:
            raise BundleError(f"cannot read {TENSORS} of {path}: {exc}") from None
        finally:
            os.close(fd)
    finally:
        os.close(folder)
    return manifest, tensors


def _load_tensors(fd: int, shown: str) -> dict[str, torch.Tensor]:
    """The tensors of the open safetensors file ``fd``."""
    by_fd = f"/proc/self/fd/{fd}"
    try:
        if os.path.exists(by_fd):
            return load_file(by_fd)
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as f:
            return load(f.read())
    except OSError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise BundleError(f"{shown} is unreadable: {exc}") from None


def _moved(folder: int, where: str) -> bool:
    """Whether the open directory ``folder`` is no longer the one at ``where`` (a save moved it aside)."""
    try:
        return os.stat(where).st_ino != os.fstat(folder).st_ino
    except OSError:
        return True


def _open_in(folder: int, name: str, bundle: str = "the bundle") -> int | None:
    """A descriptor of file ``name`` of the open directory ``folder`` (``bundle``, for messages); None if
    there is none."""
    try:
        return os.open(name, os.O_RDONLY, dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory in its place, no permission
        raise BundleError(f"cannot read {name} of {bundle}: {exc}") from None


def _read_in(folder: int, name: str) -> bytes | None:
    """The bytes of file ``name`` of the open directory ``folder``; None if there is none."""
    fd = _open_in(folder, name)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BundleError(f"cannot read {name} of the bundle: {exc}") from None


def _parse_manifest(data: bytes, where: str, kind: str, max_version: int) -> dict:
    try:
        manifest = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where} is corrupt: {exc}") from None
    except RecursionError:  # lists nested thousands deep: no manifest of ours
        raise BundleError(f"{where} is corrupt: nested too deep to be a manifest") from None
    # (bundles of earlier versions have no manifest checksum: their tensors are still checked)
    if isinstance(manifest, dict) and "manifest_sha256" in manifest \
            and manifest["manifest_sha256"] != _manifest_sha256(manifest):
        raise BundleError(f"{where} does not match its checksum: the file is corrupt")
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{os.path.dirname(where)} holds {found!r}, not a {kind}")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version < 1:
        raise BundleError(f"{os.path.dirname(where)} has format version {version!r}: no neuroidx_fast writes it (the "
                          "first is 1), so the file was not written by this package")
    if isinstance(version, bool) or not isinstance(version, int) or version > max_version:
        raise BundleError(f"{os.path.dirname(where)} has format version {version!r}; this neuroidx_fast reads up to "
                          f"{max_version}: upgrade the package")
    return manifest
