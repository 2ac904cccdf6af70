"""pytest-benchmark view of the same measurements: `python -m pytest bench/test_bench_topk.py`.
(Not part of the test suite; the JSON with ratios comes from `python -m bench.bench_topk`.)"""

import pytest
import torch

import neuroidx_fast as nx
from bench.bench_topk import Stream, make_batches, timed_backends
from bench.references import NetDissectStyleTopK

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (256, 1024, 14, 14) if DEVICE.type == "cuda" else (64, 512, 28, 28)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
NAMES = timed_backends(DEVICE.type)


@pytest.fixture(scope="module")
def batches():
    return make_batches(SHAPE, DTYPE, False, DEVICE, count=3)


def run_stream(benchmark, tracker, batches):
    stream = Stream(batches)
    for _ in batches:
        tracker.observe(*stream.next())

    def step():
        tracker.observe(*stream.next())
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("backend", NAMES)
def test_update(benchmark, batches, backend):
    run_stream(benchmark, nx.TopK(SHAPE[1], 100, device=DEVICE, backend=backend), batches)


def test_update_netdissect_style(benchmark, batches):
    run_stream(benchmark, NetDissectStyleTopK(SHAPE[1], 100, device=DEVICE), batches)
