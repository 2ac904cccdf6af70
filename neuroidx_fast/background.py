"""Reading a loader's batches in a background thread, a few ahead of the pass that uses them.

Why: a pass on a GPU (indexing, ablation, the top-image passes) reads each batch's checks back once, a
device sync; with the batches read in the same thread, the GPU then idles while the CPU reads and stacks
the next batch (an H100 indexing run spent 36 of its 67 ms a batch off the GPU, profiled 2026-11-22).
From a thread, the next batches are read while the main thread launches work and waits on the device:
dataset reads, image decoding and the stack into page-locked memory release the GIL.

The batches are the loader's own, in its order, each read once; an error raised while reading batch n
reaches the pass after batches 0 .. n - 1, where it would have without the thread. Closing the reader
(``reading`` does it on leaving the block, on an error too) stops the thread before it returns: no
dataset item is read after the pass is over.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

__all__ = ["BackgroundBatches", "reading", "background_enabled"]

_POLL_S = 0.1  # how often a blocked producer or consumer looks whether the other is gone
ENV = "NEUROIDX_BACKGROUND_BATCHES"  # "0": read batches in the pass's own thread


def background_enabled() -> bool:
    """Whether passes may read batches in a background thread: yes unless NEUROIDX_BACKGROUND_BATCHES=0."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: set it to 1 (read batches in a background thread, the default) "
                     "or 0 (in the pass's own thread)")


class BackgroundBatches:
    """An iterable over ``loader``'s batches (any iterable with a length), each iteration read by its
    own background thread at most ``depth`` batches ahead. ``start`` runs first in that thread (e.g.
    ``torch.cuda.set_device``: a new thread starts on device 0)."""

    def __init__(self, loader, depth: int = 2, start=None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.depth, self.start = loader, depth, start

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> "_Reader":
        return _Reader(self.loader, self.depth, self.start)


class _Reader:
    """One iteration: the thread reads into a bounded queue; ``__next__`` takes from it."""

    def __init__(self, loader, depth: int, start):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._read, args=(loader, start), name="neuroidx-batches", daemon=True)
        self._thread.start()

    def _read(self, loader, start) -> None:
        try:
            if start is not None:
                start()
            for batch in loader:
                if not self._offer(("batch", batch)):
                    return
                del batch  # (not held while waiting for a place in the queue)
            self._offer(("end", None))
        except BaseException as exc:  # handed to the pass, which raises it where the batch was due
            self._offer(("error", exc))

    def _offer(self, entry) -> bool:
        """Put ``entry`` in the queue once there is room; False if the reader was closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "_Reader":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("the background thread reading the batches ended without a word; set "
                                       f"{ENV}=0 to read them in the pass's thread") from None
        if kind == "batch":
            return value
        self.close()
        if kind == "error":
            try:
                raise value
            finally:
                del value  # (the exception holds frames: no cycle through this one)
        raise StopIteration

    def close(self) -> None:
        """Stop reading: the thread has ended when this returns (it finishes the batch it is on), and the
        batches read ahead are let go."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()
        while True:  # (what it put while this drained)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self):
        if not self._done:
            self._stop.set()  # (no join from a finaliser: the thread sees this and ends by itself)


@contextlib.contextmanager
def reading(loader):
    """``with reading(loader) as batches: for batch in batches: ...``: an iterator over ``loader``,
    closed on leaving the block (a background reader's thread is then stopped and joined)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        if isinstance(batches, _Reader):
            batches.close()
