"""Atomic, checksummed directories of safetensors tensors plus a JSON manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .atomic import public_mode

__all__ = ["write_bundle", "read_bundle", "recover_interrupted_write", "BundleError"]

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


class BundleError(ValueError):
    """A directory that is not a readable bundle of the expected kind (missing, corrupt, foreign)."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_sha256(manifest: dict) -> str:
    """Checksum of a manifest's content (its canonical JSON, without the checksum itself): a flipped digit
    of images_seen or of a map size would otherwise load as valid JSON, silently wrong."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    """Write ``path`` (a directory) atomically: readers see the old bundle or the new one, never a mix."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
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
        if os.path.exists(path) and (not os.path.isdir(path)
                                     or (os.listdir(path) and not os.path.exists(os.path.join(path, MANIFEST)))):
            raise BundleError(f"refusing to overwrite {path}: it exists and is not a neuroidx_fast bundle")
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new, path) -> None:
    """Put the finished directory ``new`` (a sibling of ``path``, named ``<name>.tmp-*``) at ``path``: the
    old one is moved aside (``<name>.old-*``) and ``new`` moved in, two renames, so that readers see the
    old directory or the new one whole, never a mix; then the old one goes, with what killed writes left
    beside ``path``."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(new, path)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    _remove_leftovers(path)


def _remove_leftovers(path: str) -> None:
    """The ``<name>.tmp-*`` and ``<name>.old-*`` folders of earlier writes of ``path`` that were killed
    (as big as the bundle); ``path`` itself, complete, supersedes them."""
    parent, name = os.path.split(path)
    for entry in os.listdir(parent):
        if entry.startswith((name + ".tmp-", name + ".old-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def remove_bundle(path) -> None:
    """Delete the bundle ``path`` and whatever killed writes of it left beside it."""
    path = os.path.abspath(os.fspath(path))
    shutil.rmtree(path, ignore_errors=True)
    if os.path.isdir(os.path.dirname(path)):
        _remove_leftovers(path)


def recover_interrupted_write(path) -> bool:
    """Put back the bundle that a ``write_bundle`` killed between its two renames left beside ``path``
    (then missing): the new one if it was complete (``<name>.tmp-*`` with its manifest, written last),
    else the old one (``<name>.old-*``). True if one was put back."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        return False
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return False

    def complete(marker):
        return [os.path.join(parent, e) for e in entries
                if e.startswith(name + marker) and os.path.exists(os.path.join(parent, e, MANIFEST))]

    new, old = complete(".tmp-"), complete(".old-")
    if not new and not old:
        return False
    os.replace(max(new or old, key=os.path.getmtime), path)
    if new:  # the old bundles it replaced are stale now
        for stale in old:
            shutil.rmtree(stale, ignore_errors=True)
    return True


def read_bundle(path: str, kind: str, max_version: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a bundle written by ``write_bundle``; a clear BundleError for anything wrong."""
    path = os.fspath(path)
    recover_interrupted_write(path)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise BundleError(f"{path} is not a directory written by neuroidx_fast ({kind})")
    if not os.path.exists(manifest_path):
        raise BundleError(f"{path} has no {MANIFEST}: not a neuroidx_fast {kind}, or an interrupted write")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is corrupt: {exc}") from None
    # (bundles of earlier versions have no manifest checksum: their tensors are still checked)
    if isinstance(manifest, dict) and "manifest_sha256" in manifest \
            and manifest["manifest_sha256"] != _manifest_sha256(manifest):
        raise BundleError(f"{manifest_path} does not match its checksum: the file is corrupt")
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path} holds {found!r}, not a {kind}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise BundleError(f"{path} has format version {version!r}; this neuroidx_fast reads up to {max_version}: "
                          "upgrade the package")
    tensor_path = os.path.join(path, TENSORS)
    if not os.path.exists(tensor_path):
        raise BundleError(f"{path} lacks {TENSORS}: the bundle is incomplete")
    if _sha256(tensor_path) != manifest.get("tensors_sha256"):
        raise BundleError(f"{tensor_path} does not match its checksum: the file is corrupt or truncated")
    try:
        tensors = load_file(tensor_path)
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise BundleError(f"{tensor_path} is unreadable: {exc}") from None
    return manifest, tensors
