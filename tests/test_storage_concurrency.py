"""Writers of one bundle at once (processes, threads): they take turns (storage.writer_lock), so that none
deletes another's live temporary folder as the leftover of a killed write."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from neuroidx_fast import storage
from neuroidx_fast.storage import is_bundle, read_bundle, remove_bundle, write_bundle

try:
    import fcntl  # noqa: F401  (only whether there is one)
except ImportError:  # (Windows: no flock, writers are not serialised)
    pytestmark = pytest.mark.skip(reason="no fcntl.flock here")


def _save_many(path, value, times, errors):
    failed = {}
    for _ in range(times):
        try:
            write_bundle(path, "test bundle", 1, {"n": value}, {"x": torch.full((64, 64), float(value))})
        except Exception as exc:  # counted, not raised: the other writer keeps going
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
    errors.put(failed)


def test_two_processes_saving_one_path_at_once_all_succeed(tmp_path):
    """Each writer removed the other's .tmp- / .old- folder as debris of a killed write: about a fifth of
    the saves failed (FileNotFoundError, "Directory not empty", a safetensors error)."""
    path = str(tmp_path / "bundle")
    write_bundle(path, "test bundle", 1, {"n": 0}, {"x": torch.zeros(64, 64)})
    context = multiprocessing.get_context("fork")
    errors = context.SimpleQueue()
    writers = [context.Process(target=_save_many, args=(path, value, 40, errors)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    assert [errors.get(), errors.get()] == [{}, {}]
    manifest, tensors = read_bundle(path, "test bundle", 1)
    assert manifest["n"] in (1, 2) and bool((tensors["x"] == manifest["n"]).all())
    assert sorted(os.listdir(tmp_path)) == ["bundle"]  # no lock file, no leftovers


def test_a_write_waits_for_the_write_under_way(tmp_path, monkeypatch):
    """Thread A is inside its write (its .tmp- folder made, the tensors not yet written) when thread B
    saves the same path: B waits for A, rather than deleting A's folder and making A fail."""
    path = str(tmp_path / "bundle")
    paused, go = threading.Event(), threading.Event()
    real_save_file = storage.save_file

    def save_file(tensors, where):
        if threading.current_thread().name == "A":
            paused.set()
            go.wait(30)
        return real_save_file(tensors, where)

    monkeypatch.setattr(storage, "save_file", save_file)
    errors = []

    def save(value):
        try:
            write_bundle(path, "test bundle", 1, {"n": value}, {"x": torch.full((3,), float(value))})
        except Exception as exc:
            errors.append(exc)

    a = threading.Thread(target=save, args=(1,), name="A")
    a.start()
    assert paused.wait(30)
    b = threading.Thread(target=save, args=(2,), name="B")
    b.start()
    b.join(1.0)
    waited = b.is_alive()
    go.set()
    a.join(30)
    b.join(30)
    assert not errors, errors
    assert waited
    assert read_bundle(path, "test bundle", 1)[0]["n"] == 2  # B's, written after A's
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


HOLD_LOCK = """
import sys, time
from neuroidx_fast.storage import writer_lock
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_writer_blocks_no_one(tmp_path):
    """The lock is the system's (flock), released when its holder dies: a killed writer leaves at most
    the lock file, which is neither part of the bundle nor debris, and the next writer deletes it."""
    path = str(tmp_path / "bundle")
    write_bundle(path, "test bundle", 1, {"n": 1}, {"x": torch.zeros(3)})
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = threading.Event()
        writer = threading.Thread(target=lambda: (write_bundle(path, "test bundle", 1, {"n": 2}, {"x": torch.ones(3)}),
                                                  done.set()))
        writer.start()
        assert not done.wait(1.0)  # another process's write under way: this one waits
        lock_file = tmp_path / ".bundle.lock"
        assert lock_file.exists()
        # meanwhile the bundle reads as it was, and is a bundle (the lock file lies beside it)
        assert is_bundle(path) and read_bundle(path, "test bundle", 1)[0]["n"] == 1
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert done.wait(30)
    writer.join()
    assert read_bundle(path, "test bundle", 1)[0]["n"] == 2
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    # a lock file a killed writer left: no obstacle to the next write or removal, then gone
    (tmp_path / ".bundle.lock").write_text("")
    assert is_bundle(path) and read_bundle(path, "test bundle", 1)[0]["n"] == 2
    write_bundle(path, "test bundle", 1, {"n": 3}, {"x": torch.ones(3)})
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    remove_bundle(path)
    assert os.listdir(tmp_path) == []


def test_the_lock_is_taken_again_by_its_holder(tmp_path):
    """A write under the lock recovers and cleans up under it too (the same thread takes it again)."""
    path = str(tmp_path / "bundle")
    with storage.writer_lock(path):
        write_bundle(path, "test bundle", 1, {"n": 1}, {"x": torch.zeros(3)})
        assert (tmp_path / ".bundle.lock").exists()
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
