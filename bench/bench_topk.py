"""Benchmark of the streaming top-K update (spatial_reduce + TopK.update) and of spatial_reduce alone.

Run:  python -m bench.bench_topk [--quick] [--device cuda] [--out bench/results]
Every backend that runs natively on the device is measured against the torch reference and a
NetDissect-style tracker in the same run; ratios are what to read (absolute times are noisy here).
The state is warmed first and batches are cycled with fresh ids, the steady state of a long run.
Results go to bench/results/<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import time

import torch

import neuroidx_fast as nx
from neuroidx_fast import backends
from bench.references import NetDissectStyleTopK

CPU_SHAPES = [(64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7), (64, 256, 56, 56)]
GPU_SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
K = 100


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat):
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def make_batches(shape, dtype, channels_last, device, count, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(shape, generator=g, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append(x)
    return batches


class Stream:
    """Feeds the cycled batches with fresh ids to a tracker."""

    def __init__(self, batches):
        self.batches, self.step = batches, 0

    def next(self):
        x = self.batches[self.step % len(self.batches)]
        ids = torch.arange(self.step * x.shape[0], (self.step + 1) * x.shape[0], device=x.device)
        self.step += 1
        return x, ids


def bench_shape(shape, dtype, channels_last, device, repeat, names):
    batches = make_batches(shape, dtype, channels_last, device, count=3)
    nbytes = batches[0].numel() * batches[0].element_size()
    rows = []
    target = batches[0].clone()  # a copy into memory already touched (clone's fresh pages fault: a third the speed)
    copy_s = timed(lambda: target.copy_(batches[0]), device, repeat)
    copy_gbps = 2 * nbytes / copy_s / 1e9  # a copy reads and writes every byte

    def update_fn(tracker):
        stream = Stream(batches)
        for _ in range(len(batches)):  # warm: every batch seen once
            tracker.observe(*stream.next())
        return lambda: tracker.observe(*stream.next())

    update = {"netdissect": timed(update_fn(NetDissectStyleTopK(shape[1], K, device=device)), device, repeat)}
    reduce_s = {}
    for name in names:
        update[name] = timed(update_fn(nx.TopK(shape[1], K, device=device, backend=name)), device, repeat)
        reduce_s[name] = timed(lambda: nx.spatial_reduce(batches[0], backend=name), device, repeat)
    layout = "channels_last" if channels_last else "contiguous"
    for name in names:
        rows.append({
            "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "layout": layout, "backend": name,
            "update_s": update[name], "update_vs_torch": update["torch"] / update[name],
            "update_vs_netdissect": update["netdissect"] / update[name],
            "spatial_reduce_s": reduce_s[name], "spatial_reduce_gbps": nbytes / reduce_s[name] / 1e9,
            "spatial_reduce_vs_torch": reduce_s["torch"] / reduce_s[name],
            "copy_gbps": copy_gbps, "fraction_of_copy_bandwidth": nbytes / reduce_s[name] / 1e9 / copy_gbps,
            "netdissect_update_s": update["netdissect"],
        })
    return rows


def bench_parser(doc: str, quick_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device (CUDA when there is one), --quick and --out (default
    bench/results); the help's description is the first line of ``doc``. A benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    return parser


def common_args(doc: str, argv=None) -> argparse.Namespace:
    """The options of a benchmark that takes no others (``bench_parser``), parsed."""
    return bench_parser(doc).parse_args(argv)


def timed_backends(device_type: str) -> list[str]:
    """The backends to time on a device, the torch reference first (``backends.available`` order); the
    Triton interpreter on the CPU is no backend to time."""
    return [n for n in backends.available(device_type) if not (n == "triton" and device_type == "cpu")]


def main(argv=None):
    parser = bench_parser(__doc__, "one small shape, few repeats (a smoke run)")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = timed_backends(device.type)
    if device.type == "cuda":
        shapes = [(s, torch.bfloat16, False) for s in GPU_SHAPES] + [(GPU_SHAPES[2], torch.float32, False),
                                                                      (GPU_SHAPES[2], torch.bfloat16, True)]
    else:
        shapes = [(s, torch.float32, False) for s in CPU_SHAPES] + [(CPU_SHAPES[0], torch.float32, True),
                                                                    (CPU_SHAPES[0], torch.bfloat16, False)]
    repeat = args.repeat or (3 if args.quick else (20 if device.type == "cuda" else 7))
    if args.quick:
        shapes = [((8, 64, 14, 14), torch.float32, False)]
    rows = []
    print(f"device: {device_name(device)}; backends: {names}; K={K}; median of {repeat}")
    print(f"{'shape':<22}{'dtype':<10}{'layout':<14}{'backend':<8}{'update ms':>10}{'x torch':>9}{'x netdis':>9}"
          f"{'reduce GB/s':>12}{'% copy':>8}")
    for shape, dtype, channels_last in shapes:
        for row in bench_shape(shape, dtype, channels_last, device, repeat, names):
            rows.append(row)
            print(f"{str(tuple(row['shape'])):<22}{row['dtype']:<10}{row['layout']:<14}{row['backend']:<8}"
                  f"{row['update_s'] * 1e3:>10.2f}{row['update_vs_torch']:>9.2f}{row['update_vs_netdissect']:>9.2f}"
                  f"{row['spatial_reduce_gbps']:>12.1f}{100 * row['fraction_of_copy_bandwidth']:>7.0f}%")
    result = result_header("topk_update", device, k=K, repeat=repeat, quick=args.quick, rows=rows)
    if not args.quick:
        save_result(result, args.out, "topk")
    return result


def result_header(benchmark: str, device, **fields) -> dict:
    """A benchmark's result: its name, the device, the date and the package versions, then ``fields``."""
    return {
        "benchmark": benchmark, "device": device_name(device), "date": dt.date.today().isoformat(),
        "versions": {"neuroidx_fast": nx.__version__, "torch": torch.__version__, "python": platform.python_version()},
        **fields,
    }


def save_result(result: dict, out_dir: str, prefix: str) -> str:
    """Write bench/results/<prefix>-<device>-<date>.json atomically."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{prefix}-{slug(result['device'])}-{result['date']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
