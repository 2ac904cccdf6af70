"""heap.reuse_freed_memory: big temporaries freed and allocated again in a loop are not faulted in
anew (glibc). Measured in a fresh process, whose heap no earlier test has shaped."""

import json
import platform
import subprocess
import sys

import pytest

from neuroidx_fast.heap import reuse_freed_memory

BLOCK = 8 << 20  # bytes: above glibc's initial mmap threshold
BLOCKS = 12      # alive at once, 96 MiB: more than any trim threshold glibc picks by itself (<= 64 MiB)
PAGES = BLOCKS * BLOCK // 4096

PROBE = f"""
import json, resource, torch
from neuroidx_fast.heap import reuse_freed_memory

def one_round():
    blocks = [torch.empty({BLOCK}, dtype=torch.uint8) for _ in range({BLOCKS})]
    for b in blocks:
        b.fill_(1)  # touch every page

def faults_per_round(rounds=4):
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

plain = faults_per_round()
with reuse_freed_memory() as applied:
    inside = faults_per_round()
print(json.dumps({{"plain": plain, "inside": inside, "applied": applied}}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_blocks_are_reused_inside():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["applied"]
    # glibc's defaults: each round faults part of its 96 MiB in again (how much depends on glibc's
    # dynamic thresholds); inside the block: (nearly) none
    assert result["inside"] < min(PAGES / 10, result["plain"] / 4), result


def test_disabled_changes_nothing():
    with reuse_freed_memory(enabled=False) as applied:
        assert not applied
