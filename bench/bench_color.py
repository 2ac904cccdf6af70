"""Color selectivity (luminance) for all units of a layer: the batched pass against the authors' loop.

The authors' loop re-runs, for each unit, the gray versions of its top images (one batch of K images
per unit). ``color_selectivity`` makes each unique top image gray once, runs it once, and gathers every
unit's activation from that one forward. Also reported: its cost against one bare forward of the
unique top images (gray conversion included), the floor it cannot beat.
Run: ``python -m bench.bench_color [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import statistics
import time

import torch

import neuroidx_fast as nx
from neuroidx_fast.color import luminance
from neuroidx_fast.features import load_top_images
from neuroidx_fast.hooks import LayerCapture
from neuroidx_fast.models import vgg_m

from .bench_index import Images
from .bench_topk import common_args, result_header, save_result, sync


def authors_loop(model, index, layer, dataset, device):
    """Per unit: its K top images made gray, run as one batch, activation read at each image's position."""
    L = index[layer]
    alphas = torch.full((L.num_units,), float("nan"))
    dead = L.dead()
    with torch.no_grad(), LayerCapture(model, [layer]) as capture:
        for c in range(L.num_units):
            if dead[c]:
                continue
            ids = L.ids[c][L.ids[c] >= 0]
            images = torch.stack([dataset[int(i)][0] for i in ids]).to(device)
            out = capture.run(luminance(images))[layer]
            again = out[:, c].reshape(len(ids), -1)[torch.arange(len(ids)), L.positions[c, :len(ids)].to(device)]
            alphas[c] = 1 - again.double().sum().cpu() / L.values[c, :len(ids)].double().sum()
    return alphas


def main(argv=None):
    args = common_args(__doc__, argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size, n, k, batch, layer = (96, 400, 40, 64, "conv4") if not args.quick else (64, 60, 10, 16, "conv3")
    if device.type == "cuda":
        size, n, k, batch = 224, 4000, 100, 256
    model = vgg_m(10, size, width=0.25 if device.type == "cpu" else 1.0, fc_width=64).to(device).eval()
    dataset = Images(torch.rand(n, 3, size, size), 10)
    index = nx.index_dataset(model, dataset, [layer], k=k, batch_size=batch, device=device, progress=False)
    unique = torch.unique(index[layer].ids[index[layer].ids >= 0])

    def bare():
        with torch.no_grad(), LayerCapture(model, [layer]) as capture:
            for _, images in load_top_images(dataset, unique, batch, device=device):  # (pinned for a GPU, as ours)
                capture.run(luminance(images.to(device, non_blocking=True)))
        sync(device)

    def batched():
        nx.color_selectivity(model, index, layer, batch_size=batch, device=device)
        sync(device)

    def loop():
        authors_loop(model, index, layer, dataset, device)
        sync(device)

    ours, theirs = nx.color_selectivity(model, index, layer, batch_size=batch), authors_loop(model, index, layer,
                                                                                          dataset, device)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, equal_nan=True)
    # Rounds of the three, back to back: each ratio is taken within a round (the machine's load moves
    # between rounds, by 4x on a shared VM) and the median of the rounds' ratios is reported.
    times = {"bare_forward": [], "color_selectivity": [], "authors_loop": []}
    for _ in range(2 if args.quick else 5):
        for name, fn in (("bare_forward", bare), ("color_selectivity", batched), ("authors_loop", loop)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    speedups = [a / c for a, c in zip(times["authors_loop"], times["color_selectivity"])]
    costs = [c / b for c, b in zip(times["color_selectivity"], times["bare_forward"])]
    best = {name: statistics.median(t) for name, t in times.items()}
    L = index[layer]
    result = result_header(
        "color_selectivity", device,
        model=f"vgg_m(width={0.25 if device.type == 'cpu' else 1.0})", layer=layer, units=L.num_units,
        k=k, images=n, unique_top_images=int(unique.numel()), input_size=size, batch_size=batch,
        speedup_vs_authors_loop=statistics.median(speedups), cost_vs_bare_forward=statistics.median(costs),
        speedups_by_round=speedups, costs_by_round=costs, times_s=times,
    )
    print(f"device: {result['device']}; {layer}: {L.num_units} units, K={k}, {result['unique_top_images']} unique "
          f"top images of {n}")
    print(f"median of {len(speedups)} rounds: color_selectivity {best['color_selectivity']:.3f}s, authors' loop "
          f"{best['authors_loop']:.3f}s ({result['speedup_vs_authors_loop']:.1f}x faster, the median of the rounds' "
          f"{', '.join(f'{r:.1f}' for r in speedups)}; target 10x), bare forward of the unique images "
          f"{best['bare_forward']:.3f}s ({result['cost_vs_bare_forward']:.2f}x of it; target <= 1.5x)")
    if not args.quick:
        save_result(result, args.out, "color")


if __name__ == "__main__":
    main()
