"""Benchmark of batched activation maximisation: ``maximize`` for U units in one batch against a loop
that optimises one unit at a time (the same ``maximize`` with one unit per call, same steps), in one run.

Run:  python -m bench.bench_maximize [--quick] [--device cuda] [--threads N] [--out bench/results]
CPU: 64 units of two small models (a two-conv CNN at 32x32; VGG-M at quarter width, conv2, conv3, conv5
and fc7, at 64x64).
GPU: 512 units of a ResNet-50-shaped layer (random init, stage-2 output, 224x224); there the loop over
every unit would take too long: it runs on the first few units and its time per unit is scaled to all
units (every unit costs the same: same shapes, same steps). On the CPU, batched and loop runs are
interleaved ``--repeat`` times, so that both see the same machine load; the best of each is reported,
with the ratio of medians and the median of the pairs' ratios ("paired": each pair ran under the same
load, so this one moves least with bursts of load on a shared machine).
Results go to bench/results/maximize-<device>-<date>.json.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from neuroidx_fast.maximization import maximize
from neuroidx_fast.models import vgg_m
from bench.bench_index import resnet50_shaped
from bench.bench_topk import bench_parser, device_name, result_header, save_result, sync


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def tiny_cnn():
    """The smallest realistic case: two convs at 32x32, 64 units in the second."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 64, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def cpu_cases(quick):
    torch.manual_seed(0)
    tiny = tiny_cnn().eval()
    vgg = vgg_m(num_classes=10, input_size=64, width=0.25, fc_width=64).eval()
    units = 16 if quick else 64
    return [
        {"model": "tiny-cnn", "net": tiny, "layer": "3", "units": units, "size": 32,
         "steps": 4 if quick else 16, "loop_units": 4 if quick else units},
    ] + [
        {"model": "vgg_m(width=0.25)", "net": vgg, "layer": layer, "units": units, "size": 64,
         "steps": 2 if quick else 8, "loop_units": 4 if quick else units}
        for layer in ("conv2", "conv3", "conv5", "fc7")
    ]


def gpu_cases(quick, batch_size):
    torch.manual_seed(0)
    net, names = resnet50_shaped()
    net.eval()
    return [{"model": "resnet50-shaped", "net": net, "layer": names[6], "units": 64 if quick else 512,
             "size": 224, "steps": 4 if quick else 64, "loop_units": 4 if quick else 8, "batch_size": batch_size}]


def run_case(case, device, repeat):
    net = case["net"].to(device)
    kw = dict(size=case["size"], steps=case["steps"], device=device, batch_size=case.get("batch_size"))
    units = list(range(case["units"]))
    loop_units = units[: case["loop_units"]]
    # warm-up (allocator, kernels, cuFFT plans) at both shapes timed: the batch and the one-unit calls
    maximize(net, case["layer"], units[:2], **dict(kw, steps=2))
    maximize(net, case["layer"], units[:1], **dict(kw, steps=2))
    batched, loop = [], []
    for _ in range(repeat):  # interleaved, so that both see the same machine load
        batched.append(timed(lambda: maximize(net, case["layer"], units, **kw), device))
        loop.append(timed(lambda: [maximize(net, case["layer"], [u], **kw) for u in loop_units], device))
    # Best of the runs: the least disturbed by other processes (on a shared CPU, a run that meets a
    # burst of load is several times slower, the batch-1 loop most); the medians are kept as well.
    batched_s, loop_s = min(batched), min(loop)
    loop_per_unit = loop_s / len(loop_units)
    scale = len(units) / len(loop_units)
    # Each interleaved pair ran under the same load: the median of the pairs' ratios is the estimate
    # least moved by a burst that favours one side (the best-of ratio pairs two different runs).
    paired = [lo * scale / b for b, lo in zip(batched, loop)]
    row = {
        "model": case["model"], "layer": case["layer"], "units": len(units), "size": case["size"],
        "steps": case["steps"], "batch_size": case.get("batch_size"), "repeat": repeat,
        "batched_s": batched_s, "batched_units_per_s": len(units) / batched_s,
        "batched_unit_steps_per_s": len(units) * case["steps"] / batched_s,
        "loop_units_timed": len(loop_units), "loop_s": loop_s, "loop_units_per_s": 1 / loop_per_unit,
        "speedup_vs_loop": loop_s * scale / batched_s,
        "speedup_vs_loop_medians": statistics.median(loop) * scale / statistics.median(batched),
        "speedup_paired_median": statistics.median(paired), "speedup_paired": paired,
        "times_s": {"batched": batched, "loop": loop},
    }
    print(f"{case['model']:<20}{case['layer']:<8}{len(units):>6}{case['size']:>6}{case['steps']:>6}"
          f"{batched_s:>11.2f}{row['batched_units_per_s']:>10.2f}{1 / loop_per_unit:>11.2f}"
          f"{row['speedup_vs_loop']:>9.1f}x{row['speedup_paired_median']:>9.1f}x")
    return row


def main(argv=None):
    parser = bench_parser(__doc__, "few units and steps (a smoke run, not saved)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="GPU: units per optimisation batch (memory: ~100 MB per unit at 224x224)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs of each (best; CPU default 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = gpu_cases(args.quick, args.batch_size) if device.type == "cuda" else cpu_cases(args.quick)
    repeat = args.repeat or (1 if args.quick else 3)
    print(f"device: {device_name(device)}; best of {repeat}")
    print(f"{'model':<20}{'layer':<8}{'units':>6}{'size':>6}{'steps':>6}{'batched s':>11}{'units/s':>10}"
          f"{'loop u/s':>11}{'speedup':>10}{'paired':>10}")
    rows = [run_case(case, device, repeat) for case in cases]
    result = result_header(
        "maximize", device, quick=args.quick, threads=torch.get_num_threads(),
        # other processes on the machine: a loaded CPU slows batch-1 ops (thread barriers) the most
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        param="fourier", transforms="standard", objective="mean", rows=rows,
    )
    if not args.quick:
        save_result(result, args.out, "maximize")
    return result


if __name__ == "__main__":
    main()
