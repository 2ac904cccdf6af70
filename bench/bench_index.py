"""Benchmark of index_dataset: images/s against a bare forward of the same model over the same batches,
stopped at the same (deepest indexed) layer, measured in one run.

Two bare forwards: over batches cut from one tensor in memory (``overhead``: what indexing costs
beyond the model, loading included), and over the same DataLoader batches index_dataset reads
(``overhead_vs_loaded_forward``: stacking 256 images into a batch costs a CPU 10-40 ms, as much as the
GPU's forward: what indexing itself adds).

Run:  python -m bench.bench_index [--quick] [--device cuda]
CPU: a small VGG-style CNN at 64x64, every conv layer indexed. GPU: a ResNet-50-shaped model (random
init) at batch 256 with bf16 autocast and all 16 bottleneck outputs indexed. JSON under bench/results/.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.hooks import LayerCapture
from neuroidx_fast.background import reading
from neuroidx_fast.prepare import image_loader
from bench.bench_topk import common_args, result_header, save_result, sync


def small_cnn():
    layers, cin = [], 3
    for cout, pool in ((32, False), (32, True), (64, False), (64, True), (128, False), (128, True)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    return model, [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]


def resnet50_shaped():
    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.down(x))

    blocks, cin, names = [], 64, []
    for stage, (width, count, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
        for i in range(count):
            blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))
    names = [str(4 + i) for i in range(len(blocks))]
    return model, names


class Images(torch.utils.data.Dataset):
    def __init__(self, images, classes):
        self.images, self.classes = images, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % self.classes


def main(argv=None):
    args = common_args(__doc__, argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        (model, layers), size, batch, batches, amp = resnet50_shaped(), 224, 256, 8, torch.bfloat16
        model = model.to(device).to(memory_format=torch.channels_last)
    else:
        (model, layers), size, batch, batches, amp = small_cnn(), 64, 64, 12, None
    if args.quick:
        batch, batches = 8, 3
    model.eval()
    images = torch.rand(batch * batches, 3, size, size)
    dataset = Images(images, 10)
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()

    def bare():
        with torch.no_grad(), LayerCapture(model, layers) as capture, autocast:
            for x in images.split(batch):
                capture.run(x.to(device, non_blocking=True))
        sync(device)

    def loaded():
        with torch.no_grad(), LayerCapture(model, layers) as capture, autocast:
            with reading(image_loader(dataset, batch, device)) as batches:
                for x, _ in batches:
                    capture.run(x.to(device, non_blocking=True))
        sync(device)

    def indexed():
        nx.index_dataset(model, dataset, layers, k=100 if len(dataset) >= 100 else len(dataset), batch_size=batch,
                         device=device, autocast_dtype=amp, progress=False)
        sync(device)

    times = {"bare": [], "loaded": [], "index": []}
    bare(), loaded(), indexed()  # warm-up (allocator, kernels, libraries)
    for _ in range(2 if args.quick else 5):  # interleaved, so that machine noise hits all alike
        for name, fn in (("bare", bare), ("loaded", loaded), ("index", indexed)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    # the overhead of each back-to-back pair, their median (a best indexing run over the best bare one pairs
    # two different moments of a machine whose speed drifts, and gave a negative overhead)
    overheads = [i / b - 1 for b, i in zip(times["bare"], times["index"])]
    overheads_loaded = [i / b - 1 for b, i in zip(times["loaded"], times["index"])]
    best = {name: statistics.median(t) for name, t in times.items()}
    n = len(dataset)
    result = result_header(
        "index_dataset", device,
        model="resnet50-shaped" if device.type == "cuda" else "small-vgg-cnn", layers=layers,
        batch_size=batch, images=n, input_size=size, autocast=str(amp),
        bare_images_per_s=n / best["bare"], loaded_images_per_s=n / best["loaded"], index_images_per_s=n / best["index"],
        overhead=statistics.median(overheads), overhead_by_pair=overheads,
        overhead_vs_loaded_forward=statistics.median(overheads_loaded), times_s=times,
    )
    print(f"device: {result['device']}; {result['model']}, {len(layers)} layers indexed, batch {batch}, {n} images")
    print(f"bare forward {result['bare_images_per_s']:.1f} img/s (over the DataLoader's batches "
          f"{result['loaded_images_per_s']:.1f}), indexing {result['index_images_per_s']:.1f} img/s, "
          f"overhead {100 * result['overhead']:.1f}% ({100 * result['overhead_vs_loaded_forward']:.1f}% over the "
          "DataLoader forward)")
    if not args.quick:
        save_result(result, args.out, "index")


if __name__ == "__main__":
    main()
