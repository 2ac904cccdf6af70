"""Batches read by a background thread (neuroidx_fast.background, on for passes on a GPU): the same
batches in the same order, errors where they were due, and no thread left reading after a pass. The
passes themselves run here with the thread forced on, on the CPU, and must give the same results."""

import contextlib
import gc
import threading
import time

import pytest
import torch

import neuroidx_fast as nx
from neuroidx_fast import prepare
from neuroidx_fast.background import ENV, BackgroundBatches, background_enabled, reading
from models import ImageSet, make_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Counted:
    """range(n) (endless with n None) that records how many items it has handed out and in which thread,
    taking ``delay`` seconds an item; raises ValueError at item ``fail``."""

    def __init__(self, n=None, fail=None, delay=0.0):
        self.n, self.fail, self.delay, self.handed, self.threads = n, fail, delay, 0, set()

    def __len__(self):
        return self.n

    def __iter__(self):
        i = 0
        while self.n is None or i < self.n:
            self.threads.add(threading.get_ident())
            time.sleep(self.delay)
            if i == self.fail:
                raise ValueError(f"item {i} is broken")
            self.handed += 1
            yield i
            i += 1


def settled(counted, seconds=0.5):
    """counted.handed once it has stopped growing (the reader is waiting for room)."""
    last = -1
    deadline = time.monotonic() + 10
    while counted.handed != last and time.monotonic() < deadline:
        last = counted.handed
        time.sleep(seconds)
    return counted.handed


def readers_alive():
    return [t for t in threading.enumerate() if t.name == "neuroidx-batches" and t.is_alive()]


def test_every_batch_in_order_read_by_another_thread():
    source = Counted(7)
    batches = BackgroundBatches(source, depth=2)
    assert len(batches) == 7
    assert list(batches) == list(range(7))
    assert list(batches) == list(range(7))  # each iteration reads anew
    assert threading.get_ident() not in source.threads
    assert not readers_alive()


@pytest.mark.parametrize("depth", [1, 2])
def test_reads_at_most_depth_plus_one_ahead_and_close_reads_no_more(depth):
    source = Counted(delay=0.02)  # endless
    with reading(BackgroundBatches(source, depth=depth)) as batches:
        assert [next(batches) for _ in range(3)] == [0, 1, 2]
        assert settled(source) - 3 == depth + 1  # `depth` in the queue, one in the reader's hands
        stopped = source.handed
        batches.close()  # (emptying the queue must not let the reader read another batch)
        assert not readers_alive()
        time.sleep(0.3)
        assert source.handed == stopped
        with pytest.raises(StopIteration):
            next(batches)


def test_an_iterator_dropped_unclosed_stops_its_thread():
    source = Counted(delay=0.01)
    batches = iter(BackgroundBatches(source))
    assert next(batches) == 0
    del batches
    gc.collect()
    deadline = time.monotonic() + 5
    while readers_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not readers_alive()
    # and a for loop left by a break, its iterator dropped with it
    for item in BackgroundBatches(Counted(delay=0.01)):
        break
    gc.collect()
    deadline = time.monotonic() + 5
    while readers_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not readers_alive()


def test_ctrl_c_does_not_wait_for_the_batch_being_read():
    source = Counted(delay=1.5)
    with pytest.raises(KeyboardInterrupt):
        with reading(BackgroundBatches(source)) as batches:
            next(batches)
            time.sleep(0.2)  # the reader is now 1.3 s from its next batch
            started = time.monotonic()
            raise KeyboardInterrupt
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 5  # it ends by itself after that batch
    while readers_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not readers_alive()


def test_the_reader_reads_under_the_callers_grad_mode_and_default_device():
    class Seen:
        def __len__(self):
            return 1

        def __iter__(self):
            yield (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_device().type,
                   (torch.ones(1, requires_grad=True) * 2).requires_grad)

    assert list(BackgroundBatches(Seen())) == [(True, False, "cpu", True)]
    with torch.no_grad():
        assert list(BackgroundBatches(Seen())) == [(False, False, "cpu", False)]
    with torch.inference_mode():
        assert list(BackgroundBatches(Seen())) == [(False, True, "cpu", False)]
    with torch.device("meta"):
        assert list(BackgroundBatches(Seen()))[0][2] == "meta"


def test_an_error_arrives_after_the_batches_before_it():
    batches = iter(BackgroundBatches(Counted(10, fail=4), depth=2))
    assert [next(batches) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="item 4 is broken") as raised:
        next(batches)
    # where it came from, and how to read in the pass's thread instead (a dataset tied to its thread)
    assert any(ENV in note and "background thread" in note for note in raised.value.__notes__)
    assert not readers_alive()
    with pytest.raises(StopIteration):
        next(batches)


def test_leaving_the_block_on_an_error_stops_the_reader():
    source = Counted()
    with pytest.raises(KeyError):
        with reading(BackgroundBatches(source, depth=1)) as batches:
            next(batches)
            raise KeyError("the pass failed")
    assert not readers_alive()


def test_start_runs_first_in_the_reading_thread():
    seen = []
    source = Counted(2)
    batches = BackgroundBatches(source, start=lambda: seen.append((threading.get_ident(), source.handed)))
    assert list(batches) == [0, 1]
    assert seen == [(next(iter(source.threads)), 0)]
    failing = BackgroundBatches(Counted(2), start=lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        list(failing)


def test_the_environment_switch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert background_enabled()
    for value, expected in (("0", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv(ENV, value)
        assert background_enabled() is expected
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ValueError, match=f"{ENV}='sometimes'.*1.*0"):
        background_enabled()
    with pytest.raises(ValueError, match=ENV):  # on any device, not only where it would read in the background
        prepare.reads_in_background("cpu", 0)
    with pytest.raises(ValueError, match="depth"):
        BackgroundBatches([], depth=0)


def test_image_loader_in_the_background_gives_the_same_batches():
    dataset = ImageSet(n=11, size=8)
    assert not prepare.reads_in_background("cpu", 0)  # the CPU computes: no thread to compete with it
    plain = prepare.image_loader(dataset, 4, torch.device("cpu"))
    assert isinstance(plain, torch.utils.data.DataLoader)
    threaded = prepare.image_loader(dataset, 4, torch.device("cpu"), background=True)
    assert isinstance(threaded, BackgroundBatches) and len(threaded) == len(plain) == 3
    with reading(threaded) as batches:
        for (a, la), (b, lb) in zip(plain, batches, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.fixture
def background_on_cpu(monkeypatch):
    """Every pass reads its batches in a background thread, as on a GPU."""
    monkeypatch.setattr(prepare, "reads_in_background", lambda device, num_workers: num_workers == 0)


def _pipeline(model, dataset):
    index = nx.index_dataset(model, dataset, ["layer1", "layer2"], k=4, batch_size=5, progress=False)
    nf = nx.neuron_features(index, "layer1", batch_size=3)
    alpha = nx.color_selectivity(model, index, "layer2", batch_size=3)
    drops = nx.ablation_drops(model, dataset, "layer2", units=[0, 3], batch_size=6, progress=False)
    return index, nf, alpha, drops


def test_the_passes_give_the_same_results_with_the_batches_read_in_the_background(monkeypatch):
    model, dataset = make_model("resnet"), ImageSet(n=17, size=16)
    expected = _pipeline(model, dataset)
    read_by = set()
    loader = prepare.image_loader

    def spied(*args, **kwargs):
        batches = loader(*args, **kwargs)
        assert isinstance(batches, BackgroundBatches)
        batches.start = lambda: read_by.add(threading.get_ident())
        return batches

    monkeypatch.setattr(prepare, "reads_in_background", lambda device, num_workers: True)
    for module in ("indexing", "features", "ablation"):
        monkeypatch.setattr(f"neuroidx_fast.{module}.image_loader", spied)
    got = _pipeline(model, dataset)
    assert read_by and threading.get_ident() not in read_by
    for name in ("layer1", "layer2"):
        a, b = expected[0].layers[name], got[0].layers[name]
        for field in ("values", "ids", "positions", "mean_sum", "class_sum", "class_count"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
    assert torch.equal(expected[1].nf.nan_to_num(-1), got[1].nf.nan_to_num(-1))
    assert torch.equal(expected[1].crops, got[1].crops) and torch.equal(expected[1].dead, got[1].dead)
    assert torch.equal(expected[2].nan_to_num(-1), got[2].nan_to_num(-1))
    for field in ("correct", "intact_correct", "class_counts"):
        assert torch.equal(getattr(expected[3], field), getattr(got[3], field)), field
    assert not readers_alive()


class BrokenAt(ImageSet):
    def __init__(self, broken, **kwargs):
        super().__init__(**kwargs)
        self.broken, self.read = broken, []

    def __getitem__(self, i):
        self.read.append(i)
        if i == self.broken:
            raise OSError(f"image {i}: truncated file")
        return super().__getitem__(i)


def test_a_dataset_error_stops_indexing_as_before(background_on_cpu):
    model = make_model("vgg")
    with pytest.raises(OSError, match="image 12: truncated file"):
        nx.index_dataset(model, BrokenAt(12, n=30, size=16), ["features.3"], k=2, batch_size=4, progress=False)
    assert not readers_alive()


def test_a_failing_pass_stops_its_reader(background_on_cpu):
    model = make_model("vgg")
    dataset = ImageSet(n=40, size=16)
    dataset.images[21, 0, 3, 3] = float("nan")  # batch 5 of 4
    with pytest.raises(ValueError, match="21"):
        nx.index_dataset(model, dataset, ["features.3"], k=2, batch_size=4, progress=False)
    assert not readers_alive()


def test_a_failed_pass_leaves_no_worker_process_behind():
    """With DataLoader workers (no background thread), an error kept with its traceback (as a notebook
    keeps the last one) must not keep the workers alive through the pass's iterator."""
    import multiprocessing

    dataset = ImageSet(n=40, size=16)
    dataset.images[21, 0, 3, 3] = float("nan")
    try:
        nx.index_dataset(make_model("vgg"), dataset, ["features.3"], k=2, batch_size=4, num_workers=2,
                         progress=False)
    except ValueError as exc:
        kept = exc  # (its traceback holds index_dataset's frame)
    assert "21" in str(kept)
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_ctrl_c_in_the_code_iterating_a_reading_generator_does_not_wait():
    """load_top_images and ablation's batches read inside a generator: a Ctrl-C in their consumer closes
    the generator (GeneratorExit), which must not wait for the batch being read either."""
    def batches_of(source):
        with reading(BackgroundBatches(source)) as batches:
            for batch in batches:
                yield batch

    reader = batches_of(Counted(delay=1.5))
    with pytest.raises(KeyboardInterrupt):
        with contextlib.closing(reader):
            next(reader)
            time.sleep(0.2)
            started = time.monotonic()
            raise KeyboardInterrupt
    assert time.monotonic() - started < 0.5
