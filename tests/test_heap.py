"""heap.reuse_freed_memory: big temporaries freed and allocated again in a loop are not faulted in
anew (glibc)."""

import platform
import resource

import pytest
import torch

from neuroidx_fast.heap import reuse_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")

BLOCK = 8 << 20  # bytes: above glibc's initial mmap threshold
BLOCKS = 12      # alive at once, 96 MiB: more than any trim threshold glibc picks by itself (<= 64 MiB)
PAGES = BLOCKS * BLOCK // 4096


def faults_per_round(rounds=4):
    def one_round():
        blocks = [torch.empty(BLOCK, dtype=torch.uint8) for _ in range(BLOCKS)]
        for b in blocks:
            b.fill_(1)  # touch every page
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


def test_freed_blocks_are_reused_inside():
    with reuse_freed_memory() as applied:
        assert applied
        inside = faults_per_round()
    assert inside < PAGES / 10, f"{inside:.0f} page faults per round of {PAGES} pages"


def test_disabled_changes_nothing():
    with reuse_freed_memory(enabled=False) as applied:
        assert not applied
