"""Reading a loader's batches in a background thread, ahead of the pass that uses them.

Why: a pass on a GPU (indexing, ablation, the top-image passes) reads each batch's checks back once, a
device sync; with the batches read in the same thread, the GPU then idles while the CPU reads and stacks
the next batch (an H100 indexing run spent 36 of its 67 ms a batch off the GPU, profiled 2026-11-22).
From a thread, the next batches are read while the main thread launches work and waits on the device:
dataset reads, image decoding and the stack into page-locked memory release the GIL.

The batches are the loader's own, in its order, each read once; an error raised while reading batch n
reaches the pass after batches 0 .. n - 1, where it would have without the thread, with a note saying
that it was raised in the reading thread. The thread reads under the grad mode, inference mode and
default device of the code that started the iteration (a new thread would start with torch's
defaults: gradients on). Closing the reader (``reading`` does it on leaving its block, on an error
too; dropping the iterator does it as well) stops the thread once the batch it is reading is done, and
waits for that, so that no dataset item is read after the pass is over; after a KeyboardInterrupt it
does not wait.

Datasets whose objects belong to the thread that made them (an sqlite connection, some file handles)
cannot be read from another thread: NEUROIDX_BACKGROUND_BATCHES=0 reads batches in the pass's thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

import torch

__all__ = ["BackgroundBatches", "reading", "background_enabled", "ENV"]

_POLL_S = 0.1  # how often a blocked reader or pass looks whether the other is gone
ENV = "NEUROIDX_BACKGROUND_BATCHES"  # "0": read batches in the pass's own thread
_NOTE = (f"(raised while reading the batches in a background thread; set {ENV}=0 to read them in the pass's "
         "own thread, e.g. for a dataset whose objects belong to the thread that made them)")


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
    own background thread: ``depth`` batches wait in a queue, and the thread reads the next one, so at
    most ``depth + 1`` are read ahead of the one the pass holds. ``start`` runs first in that thread
    (e.g. ``torch.cuda.set_device``: a new thread starts on device 0)."""

    def __init__(self, loader, depth: int = 1, start=None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.depth, self.start = loader, depth, start

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> "_Reader":
        return _Reader(self.loader, self.depth, self.start)


class _Reader:
    """One iteration: the thread reads into a bounded queue; ``__next__`` takes from it. The thread holds
    no reference to this object, so that dropping it (``__del__``) stops the thread."""

    def __init__(self, loader, depth: int, start):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        state = _ThreadState.of_this_thread()
        self._thread = threading.Thread(target=_read, args=(loader, start, state, self._queue, self._stop),
                                        name="neuroidx-batches", daemon=True)
        self._thread.start()

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

    def close(self, wait: bool = True) -> None:
        """Stop reading: the thread ends once the batch it is reading is done (it puts no more in the
        queue); with ``wait``, this returns when it has ended. The batches read ahead are let go."""
        self._done = True
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self):
        self._stop.set()  # (no join from a finaliser: the thread sees this and ends by itself)


class _ThreadState:
    """The per-thread torch settings a dataset read depends on: grad mode, inference mode and the
    default device, taken from the thread that starts an iteration and applied in the reading thread."""

    def __init__(self, grad: bool, inference: bool, device):
        self.grad, self.inference, self.device = grad, inference, device

    @classmethod
    def of_this_thread(cls) -> "_ThreadState":
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_device())

    @contextlib.contextmanager
    def applied(self):
        with contextlib.ExitStack() as stack:
            if self.inference:
                stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.set_grad_enabled(self.grad))
            if self.device != torch.get_default_device():
                stack.enter_context(torch.device(self.device))
            yield


def _offer(items: queue.Queue, stop: threading.Event, entry) -> bool:
    """Put ``entry`` in the queue once there is room; False if the reader was closed meanwhile."""
    while not stop.is_set():
        try:
            items.put(entry, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _read(loader, start, state: _ThreadState, items: queue.Queue, stop: threading.Event) -> None:
    """The reading thread: every batch of ``loader`` into ``items``, then ("end", None); an error as
    ("error", exc), handed to the pass, which raises it where the batch was due."""
    try:
        with state.applied():
            if start is not None:
                start()
            for batch in loader:
                if stop.is_set() or not _offer(items, stop, ("batch", batch)):
                    return
                batch = None  # (the queue holds it now; not this frame too once the pass has taken it)
        _offer(items, stop, ("end", None))
    except BaseException as exc:
        if isinstance(exc, Exception) and hasattr(exc, "add_note"):  # (Python 3.11 and later)
            exc.add_note(_NOTE)
        _offer(items, stop, ("error", exc))


@contextlib.contextmanager
def reading(loader):
    """``with reading(loader) as batches: for batch in batches: ...``: an iterator over ``loader``,
    closed on leaving the block. A background reader's thread is stopped, and waited for unless the
    block ends with a KeyboardInterrupt, or a GeneratorExit (a generator that reads in this block closed
    early, e.g. by a Ctrl-C in the code that iterates it): Ctrl-C then stops the pass at once, and the
    thread finishes the batch it is reading and ends by itself. A DataLoader's worker processes are
    shut down (else the iterator, held by a traceback that a notebook keeps, would keep them)."""
    batches = iter(loader)
    wait = True
    try:
        yield batches
    except (KeyboardInterrupt, GeneratorExit):
        wait = False
        raise
    finally:
        if isinstance(batches, _Reader):
            batches.close(wait=wait)
        else:
            shutdown = getattr(batches, "_shutdown_workers", None)  # (torch's multi-process iterator)
            if shutdown is not None:
                shutdown()
