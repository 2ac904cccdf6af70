"""Benchmark of the masked batched ablation engine against the naive loop (one full pass over the data
per ablated unit, a forward hook zeroing the unit), in one run, with the counts checked equal.

Run:  python -m bench.bench_ablation [--quick] [--device cuda] [--threads N] [--out bench/results]

Cases (every unit of the layer, zero ablation):
  * CPU ``vgg-mid``: a VGG-11-shaped net (64x64 inputs, GAP + linear head), the output of its 4th
    block (conv 6 of 8): the general path (prefix once, suffix on masked replicas).
  * CPU ``vgg-readout``: the same net, last conv block output (feeds GAP + linear): the read-out path
    and, for reference, the general path.
  * GPU ``resnet50-layer3``: a ResNet-50-shaped net (torchvision's layout, random weights), layer3
    output, bfloat16, channels_last: the general path. The naive loop is timed on a slice of the units
    and scaled to all of them (it is linear in the number of units); the slice's counts are checked.
Results go to bench/results/ablation-<device>-<date>.json.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from neuroidx_fast import ablation as abl
from neuroidx_fast import backends
from bench.bench_topk import bench_parser, device_name, result_header, save_result, sync


# ------------------------------------------------------------------------------------------ models

class VGGBench(nn.Module):
    """VGG-11 layout at width ``w`` (w, 2w, 4w, 4w, 8w, 8w, 8w, 8w), global average pool, linear head."""

    def __init__(self, w: int = 16, classes: int = 100):
        super().__init__()
        cfg = [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w]
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBench(nn.Module):
    """torchvision's ResNet layout (stem, layer1..4 of Bottlenecks, avgpool, fc); ResNet-50: (3, 4, 6, 3)."""

    def __init__(self, blocks=(3, 4, 6, 3), width: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(blocks):
            w, stride = width * 2 ** i, 1 if i == 0 else 2
            down = nn.Sequential(nn.Conv2d(cin, w * 4, 1, stride, bias=False), nn.BatchNorm2d(w * 4))
            layers = [Bottleneck(cin, w, stride, down)] + [Bottleneck(w * 4, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = w * 4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class LabelledImages(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def calibrated_data(model, n, size, seed, device, batch=64):
    """Random images labelled mostly by the model's own predictions (after centring its logits), so that
    accuracies are high and ablations move them: drops are not all zero."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + batch].to(device, dtype)).float() for i in range(0, n, batch)])
        model.fc.bias -= logits.mean(dim=0).to(model.fc.bias.dtype)
        pred = torch.cat([model(images[i:i + batch].to(device, dtype)).argmax(1).cpu() for i in range(0, n, batch)])
    noise = torch.randint(0, logits.shape[1], (n,), generator=g)
    labels = torch.where(torch.arange(n) % 5 == 4, noise, pred)
    return LabelledImages(images, labels)


def flops_fraction_after(model, layer: str, image_size: int, device, dtype) -> float:
    """The share of the forward's conv / linear multiply-adds that comes after ``layer``."""
    macs, seen = [], {"after": False}
    target = model.get_submodule(layer)

    def count(module, _inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append((seen["after"], output[0].numel() * k))
        elif isinstance(module, nn.Linear):
            macs.append((seen["after"], output[0].numel() * module.in_features))

    def mark(*_):
        seen["after"] = True

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles.append(target.register_forward_hook(mark))
    with torch.no_grad():
        model(torch.rand(1, 3, image_size, image_size, device=device, dtype=dtype))
    for h in handles:
        h.remove()
    total = sum(m for _, m in macs)
    return sum(m for after, m in macs if after) / total


# ------------------------------------------------------------------------------------------ cases

def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def run_case(name, model, data, layer, device, batch_size, backend, paths, naive_units=None, image_size=64,
             preprocess=None, repeat=3):
    """Times ablation_drops (median of ``repeat`` runs) for each path, then the naive loop once."""
    dtype = next(model.parameters()).dtype
    rows = []
    channels = None
    results = {}
    with torch.no_grad():  # first-call costs (kernel selection, allocator) charged to neither side
        x = data[0][0][None].to(device, dtype)
        model(preprocess(x) if preprocess is not None else x)
    for path in paths:
        times = []
        for _ in range(repeat):
            seconds, result = timed(lambda: abl.ablation_drops(model, data, layer, batch_size=batch_size,
                                                               device=device, backend=backend, path=path,
                                                               preprocess=preprocess, progress=False), device)
            times.append(seconds)
        channels = result.num_units
        results[path] = (statistics.median(times), result)
    units = channels if naive_units is None else min(naive_units, channels)
    masks = results[paths[0]][1].masks[:units]
    passes = []
    naive_s, (intact, correct, counts) = timed(
        lambda: abl.naive_ablation_counts(model, data, layer, masks, batch_size=batch_size, device=device,
                                          preprocess=preprocess, pass_times=passes), device)
    # The naive loop is one pass per unit: its median pass times the units is robust to a noisy machine
    # (other processes); the total as measured is kept too.
    naive_all_s = statistics.median(passes[1:]) * channels
    naive_measured_s = naive_s * channels / units
    for path, (seconds, result) in results.items():
        exact = (torch.equal(result.correct[:units], correct) and torch.equal(result.intact_correct, intact)
                 and torch.equal(result.class_counts, counts))
        rows.append({
            "case": name, "layer": layer, "path": result.stats["path"],
            "backend": backends.resolve_name(backend, device),
            "units": channels, "images": len(data), "batch_size": batch_size, "dtype": str(dtype).replace("torch.", ""),
            "engine_s": seconds, "naive_s": naive_all_s, "naive_measured_s": naive_measured_s,
            "naive_units_timed": units, "naive_extrapolated": units < channels, "speedup": naive_all_s / seconds,
            "speedup_measured_total": naive_measured_s / seconds, "exact": exact,
            "suffix_flops_fraction": flops_fraction_after(model, layer, image_size, device, dtype),
            "masks_per_batch": result.stats["masks_per_batch"], "verified_masks": result.stats["verified_masks"],
            "readout_fallbacks": result.stats["readout_fallbacks"],
            "units_with_a_class_drop": int((result.max_drop > 0).sum()),
        })
    return rows


def main(argv=None):
    parser = bench_parser(__doc__, "small shapes (a smoke run, not saved)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 is steadier on a shared machine")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"device: {device_name(device)}; backend: {backends.resolve_name(args.backend, device)}")
    if device.type == "cpu":
        width, n, size = (4, 16, 32) if args.quick else (16, 64, 64)
        model = randomise_norms(VGGBench(width, classes=100))
        data = calibrated_data(model, n, size, seed=1, device=device)
        relus = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
        rows += run_case("vgg-mid", model, data, relus[5], device, 32, args.backend, ["general"], image_size=size)
        rows += run_case("vgg-readout", model, data, relus[-1], device, 32, args.backend, ["auto", "general"],
                         image_size=size)
    else:
        blocks, n, size = ((1, 1, 1, 1), 64, 64) if args.quick else ((3, 4, 6, 3), 512, 224)
        model = randomise_norms(ResNetBench(blocks)).to(device=device, dtype=torch.bfloat16)
        model = model.to(memory_format=torch.channels_last)

        def preprocess(x):  # channels_last activations throughout, as a tuned GPU run would have them
            return x.contiguous(memory_format=torch.channels_last)

        data = calibrated_data(model, n, size, seed=1, device=device)
        rows += run_case("resnet50-layer3", model, data, "layer3", device, 128, args.backend, ["general"],
                         naive_units=16 if args.quick else 64, image_size=size, preprocess=preprocess)
    print(f"{'case':<18}{'path':<9}{'units':>6}{'engine s':>10}{'naive s':>10}{'speedup':>9}{'(total)':>9}"
          f"{'exact':>7}{'suffix %':>9}")
    for r in rows:
        print(f"{r['case']:<18}{r['path']:<9}{r['units']:>6}{r['engine_s']:>10.2f}{r['naive_s']:>10.2f}"
              f"{r['speedup']:>9.1f}{r['speedup_measured_total']:>9.1f}{str(r['exact']):>7}"
              f"{100 * r['suffix_flops_fraction']:>8.1f}%")
    result = result_header("ablation", device, quick=args.quick, threads=torch.get_num_threads(), rows=rows)
    if not args.quick:
        save_result(result, args.out, "ablation")
    return result


if __name__ == "__main__":
    main()
