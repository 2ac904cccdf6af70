"""Benchmark of crop gathering + accumulation for all units of a layer (the Neuron Feature numerators).

Run:  python -m bench.bench_crops [--quick] [--device cpu|cuda] [--out bench/results]
A realistic layer: 256 units, each with its top K = 100 images drawn among the unique top images held
in memory as one float32 tensor (512 of 224 x 224 on CPU, 2000 on CUDA), receptive-field boxes of
100 x 100 pixels on a conv grid of stride 16 and offset -42 (so many boxes reach past the image: gray
padding), weights a_j / a_1. Every backend that runs natively on the device is timed against a plain
Python loop that slices, pads (torch.nn.functional.pad, where a box leaves the image), weights and adds
one crop at a time, in the same run; the loop adds float64(w) * float64(crop) in j order, so it also
checks that every backend is bit-identical to it. Bandwidth = bytes moved (in-image crop pixels read, float64 sums read and written)
/ time, against a device copy of a tensor of as many bytes (up to 1 GiB); where the cpp backend reads
the codes of float32 pixels (below), the float32 bytes they stand for: an effective figure.
gather_crops is timed the same way on the crops of a few units. Results go to
bench/results/crops-<device>-<date>.json.

The machine's speed drifts between runs (on a shared 2-core VM, by a third), and the loop and a kernel
are timed at different moments: ``accumulate_vs_loop`` divides the loop's median time (of 2 runs) by
the kernel's median. So each compiled backend is also timed in ``--pairs`` back-to-back pairs with the loop (gray
pad), and ``accumulate_vs_loop_paired`` is the median of the pairs' ratios.

The images are 8-bit-sourced, as a real dataset gives them (``randint(0, 256) / 255``: what to_tensor
makes of 8-bit files), so every backend is timed on the same pixels against the same loop: from the
float32 tensor (``pixels: float32``: what ``ops.accumulate_crops`` does with it; the cpp backend finds
its uint8 pixel codes itself, a pass over the images counted in its time, and reads those) and from
the codes given (``pixels: uint8``; found once by ``ops.as_pixel_codes``, whose time is reported, and
also added to the accumulation in ``accumulate_with_codes_vs_loop``). The cpp backend is also timed
with its float32 kernel (``pixels: f32-raw``, ``transcode=False``): what images that are not 8-bit
get. All paths must be bit-identical to the loop.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from neuroidx_fast import backends, ops
from bench.bench_topk import bench_parser, device_name, result_header, save_result, timed, timed_backends

GRAY = 0.5
# Three conv layers' receptive-field geometry (box r, stride, offset of the first box): a deep one (the
# headline: ~100 px boxes, e.g. VGG conv4) and a middle one (44 px boxes, where the per-crop overhead
# of a Python loop weighs more) and a shallow one (11 px boxes, where it dominates).
LAYERS = {
    "deep": dict(r=100, stride=16, offset=-42),
    "mid": dict(r=44, stride=8, offset=-18),
    "shallow": dict(r=11, stride=4, offset=0),  # VGG-M pool1
}


def make_layer(units, k, n_images, image_size, geometry, device, seed=0):
    """images [N, 3, S, S], slots [U, K] (K distinct images per unit), tops [U, K, 2], weights [U, K]."""
    g = torch.Generator().manual_seed(seed)
    # 8-bit-sourced pixels (k / 255), as to_tensor gives them from image files.
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=g, dtype=torch.uint8).float() / 255
    slots = torch.rand(units, n_images, generator=g).argsort(dim=1)[:, :k]
    grid = -(-image_size // geometry["stride"])
    tops = geometry["offset"] + geometry["stride"] * torch.randint(0, grid, (units, k, 2), generator=g)
    activations = torch.rand(units, k, generator=g).sort(dim=1, descending=True).values + 0.1
    weights = activations / activations[:, :1]
    return tuple(t.to(device) for t in (images, slots, tops, weights))


def python_loop_accumulate(sums, images, slots, tops, weights, r):
    """The baseline: one crop at a time, sliced (padded with the gray value only where the box leaves the
    image), weighted and added, with no needless work: ``add_`` with alpha w adds float64(w) * pixel in
    one pass, without a float64 temporary (the product is exact in float64: a float32 times a float32)."""
    h, w = images.shape[2:]
    slots, tops, weights = slots.tolist(), tops.tolist(), weights.tolist()
    for u in range(len(slots)):
        acc = sums[u]
        for j, slot in enumerate(slots[u]):
            if slot < 0:
                continue
            y0, x0 = tops[u][j]
            ya, yb, xa, xb = max(y0, 0), min(y0 + r, h), max(x0, 0), min(x0 + r, w)
            if ya < yb and xa < xb:
                crop = images[slot, :, ya:yb, xa:xb]
                if (ya, yb, xa, xb) != (y0, y0 + r, x0, x0 + r):
                    crop = F.pad(crop, (xa - x0, x0 + r - xb, ya - y0, y0 + r - yb), value=GRAY)
            else:  # the box misses the image
                crop = images.new_full((images.shape[1], r, r), GRAY)
            acc.add_(crop, alpha=weights[u][j])  # a Python float is a float64: w is exact
    return sums


def python_loop_gather(images, slots, tops, r):
    h, w = images.shape[2:]
    crops = []
    for slot, (y0, x0) in zip(slots.tolist(), tops.tolist()):
        ya, yb, xa, xb = max(y0, 0), min(y0 + r, h), max(x0, 0), min(x0 + r, w)
        if (ya, yb, xa, xb) == (y0, y0 + r, x0, x0 + r):  # inside the image: the slice itself
            crops.append(images[slot, :, ya:yb, xa:xb])
        elif ya < yb and xa < xb:
            crops.append(F.pad(images[slot, :, ya:yb, xa:xb], (xa - x0, x0 + r - xb, ya - y0, y0 + r - yb),
                               value=GRAY))
        else:
            crops.append(images.new_full((images.shape[1], r, r), GRAY))
    return torch.stack(crops)


def bytes_moved(sums, images, slots, tops, r, pixel_bytes=4):
    """In-image crop pixels read (float32, or 1-byte codes) + the float64 sums read and written once."""
    h, w = images.shape[2:]
    real = slots >= 0
    rows = ((tops[..., 0] + r).clamp(max=h) - tops[..., 0].clamp(min=0)).clamp(min=0)
    cols = ((tops[..., 1] + r).clamp(max=w) - tops[..., 1].clamp(min=0)).clamp(min=0)
    pixels = int((rows * cols * real).sum()) * images.shape[1]
    return pixel_bytes * pixels + 2 * sums.numel() * sums.element_size()


def copy_gbps(nbytes, device, repeat):
    """Bandwidth of a device copy of ``nbytes`` (at most 1 GiB: beyond the caches the figure no longer
    depends on the size, and two buffers of several GB only cost time and memory)."""
    nbytes = min(nbytes, 1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    seconds = timed(lambda: dst.copy_(src), device, repeat)
    return 2 * nbytes / seconds / 1e9  # a copy reads and writes every byte


def accumulate_op(source, slots, tops, weights, pad, backend, raw=False):
    """sums -> the accumulation of the layer's crops into sums, as timed; ``raw``: the cpp backend's
    float32 kernel, without finding the codes of 8-bit float32 images first."""
    if not raw:
        return lambda sums: ops.accumulate_crops(sums, source, slots, tops, weights, pad=pad, backend=backend)
    module = backends.get(backend, source.device)
    fill = ops.pad_value(pad, source.shape[1], source.device)
    return lambda sums: module.accumulate_crops(sums, source, slots, tops, weights, fill, transcode=False)


def paired_ratios(loop, kernel, device, pairs):
    """Median over ``pairs`` of loop time / kernel time (median of 3), each pair timed back to back: the
    machine's speed drifts between the moment the loop is timed and the moment a kernel is, and a
    ratio of two moments moves with it."""
    ratios = []
    for _ in range(pairs):
        loop_s = timed(loop, device, 1)
        kernel_s = timed(kernel, device, 3)  # the median of 3 (a best-of-3 against one loop run would favour it)
        ratios.append(loop_s / kernel_s)
    return statistics.median(ratios), ratios


def bench_layer(name, geometry, units, k, images, gather_units, names, device, repeat, pairs):
    _, slots, tops, weights = make_layer(units, k, images.shape[0], images.shape[2], geometry, device, seed=1)
    r = geometry["r"]
    # The baseline is a long loop, so its time is stable: fewer repeats.
    loop_repeat = 1 if device.type == "cuda" else min(repeat, 2)
    loop_sums = torch.zeros(units, 3, r, r, dtype=torch.float64, device=device)
    # The loop's sums are reset before each run (they are the exact result the backends are compared
    # with; zeroing them is 0.3% of the loop's time). A backend's sums are not reset after its checked
    # warm-up run: adding the same crops again takes the same time, and zeroing the 61 MB of sums of the
    # 100 px layer would add ~5 ms to each of its timings.
    loop_s = timed(lambda: python_loop_accumulate(loop_sums.zero_(), images, slots, tops, weights, r), device,
                   loop_repeat)
    nbytes = bytes_moved(loop_sums, images, slots, tops, r)
    copy = copy_gbps(nbytes, device, repeat)
    codes = ops.as_pixel_codes(images)
    assert codes is not None, "the benchmark images are 8-bit-sourced"
    codes_s = timed(lambda: ops.as_pixel_codes(images), device, repeat)
    g_slots, g_tops = slots[:gather_units].reshape(-1), tops[:gather_units].reshape(-1, 2)
    loop_gather_s = timed(lambda: python_loop_gather(images, g_slots, g_tops, r), device, repeat)
    loop_crops = python_loop_gather(images, g_slots, g_tops, r)
    gather_bytes = 2 * loop_crops.numel() * 4  # crops written, (at most) as many pixels read
    # pixels: (source, bytes moved by the accumulation, bytes moved by the gather, backends that time it)
    pixel_inputs = {"float32": (images, nbytes, gather_bytes, names),
                    "uint8": (codes, bytes_moved(loop_sums, images, slots, tops, r, 1), 5 * loop_crops.numel(),
                              names),
                    "f32-raw": (images, nbytes, gather_bytes, [n for n in names if n == "cpp"])}
    print(f"{name} layer: {units} units x K={k}, {r}x{r} boxes (stride {geometry['stride']}, offset "
          f"{geometry['offset']}); python loop: accumulate {loop_s:.3f} s, gather of {g_slots.numel()} crops "
          f"{loop_gather_s * 1e3:.1f} ms; {nbytes / 1e9:.2f} GB moved; copy {copy:.1f} GB/s; as_pixel_codes of "
          f"the images {codes_s * 1e3:.1f} ms")
    print(f"  {'backend':<8}{'pixels':<8}{'pad':<6}{'accumulate ms':>14}{'x loop':>8}{'x torch':>8}{'GB/s':>8}"
          f"{'% copy':>8}{'gather ms':>11}{'x loop':>8}{'x torch':>8}{'exact':>7}")
    rows, reference = [], {}
    for backend in names:
        runs = loop_repeat if backend == "torch" else repeat  # the reference is slow too: fewer repeats
        for pixels, (source, moved, gathered, timed_by) in pixel_inputs.items():
            if backend not in timed_by:
                continue
            for pad in ("gray", "edge"):
                sums = torch.zeros_like(loop_sums)
                accumulate = accumulate_op(source, slots, tops, weights, pad, backend, raw=pixels == "f32-raw")
                accumulate(sums)  # warm-up
                exact = bool(torch.equal(sums, loop_sums)) if pad == "gray" else None
                seconds = timed(lambda: accumulate(sums), device, runs)
                crops = ops.gather_crops(source, g_slots, g_tops, r, pad=pad, backend=backend)
                if pad == "gray":
                    exact = exact and bool(torch.equal(crops, loop_crops))
                del crops
                gather_s = timed(lambda: ops.gather_crops(source, g_slots, g_tops, r, pad=pad, backend=backend),
                                 device, runs)
                # The torch reference reads float32 pixels as they are (f32-raw is their cpp kernel's row).
                ref_key = ("float32" if pixels == "f32-raw" else pixels, pad)
                ref_accumulate, ref_gather = reference.setdefault(ref_key, (seconds, gather_s))
                row = {
                    "layer": name, "box": [r, r], "backend": backend, "pixels": pixels, "pad": pad,
                    "accumulate_s": seconds, "accumulate_vs_loop": loop_s / seconds,
                    "accumulate_with_codes_vs_loop": loop_s / (seconds + (codes_s if pixels == "uint8" else 0.0)),
                    "accumulate_gbps": moved / seconds / 1e9, "fraction_of_copy_bandwidth": moved / seconds / 1e9 / copy,
                    "gather_s": gather_s, "gather_vs_loop": loop_gather_s / gather_s,
                    "gather_gbps": gathered / gather_s / 1e9, "exact_vs_loop": exact,
                    "accumulate_vs_torch": ref_accumulate / seconds, "gather_vs_torch": ref_gather / gather_s,
                }
                if backend != "torch" and pad == "gray" and pairs:
                    row["accumulate_vs_loop_paired"], row["accumulate_vs_loop_pairs"] = paired_ratios(
                        lambda: python_loop_accumulate(loop_sums.zero_(), images, slots, tops, weights, r),
                        lambda: accumulate(sums), device, pairs)
                rows.append(row)
                print(f"  {backend:<8}{pixels:<8}{pad:<6}{seconds * 1e3:>14.1f}{row['accumulate_vs_loop']:>8.1f}"
                      f"{row['accumulate_vs_torch']:>8.1f}{row['accumulate_gbps']:>8.1f}"
                      f"{100 * row['fraction_of_copy_bandwidth']:>7.0f}%{gather_s * 1e3:>11.1f}"
                      f"{row['gather_vs_loop']:>8.1f}{row['gather_vs_torch']:>8.1f}"
                      f"{'-' if exact is None else str(exact):>7}")
    summary = {
        "layer": name, "units": units, "k": k, "box": [r, r], "rf_stride": geometry["stride"],
        "rf_offset": geometry["offset"], "gather_crops": g_slots.numel(), "loop_repeat": loop_repeat,
        "loop_accumulate_s": loop_s, "loop_gather_s": loop_gather_s, "bytes_moved": pixel_inputs["float32"][1],
        "bytes_moved_codes": pixel_inputs["uint8"][1], "pixel_codes_s": codes_s, "copy_gbps": copy,
    }
    return summary, rows


def main(argv=None):
    parser = bench_parser(__doc__, "a small layer, few repeats (a smoke run)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=None,
                        help="back-to-back loop / kernel pairs per backend and pixel type (default 5, 0 in --quick)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = timed_backends(device.type)  # the torch reference first: the ratios' denominator
    if args.quick:
        units, k, n_images, size, gather_units = 16, 20, 40, 96, 4
        layers = {"quick": dict(r=48, stride=8, offset=-18)}
    else:
        units, k, size, gather_units, layers = 256, 100, 224, 8, LAYERS
        n_images = 2000 if device.type == "cuda" else 512
    repeat = args.repeat or (3 if args.quick else (20 if device.type == "cuda" else 5))
    args.pairs = (0 if args.quick else 5) if args.pairs is None else args.pairs
    images = make_layer(1, 1, n_images, size, LAYERS["deep"], device)[0]
    print(f"device: {device_name(device)}; backends: {names}; {n_images} images of {size}x{size} in one tensor; "
          f"median of {repeat}")
    summaries, rows = [], []
    for name, geometry in layers.items():
        summary, layer_rows = bench_layer(name, geometry, units, k, images, gather_units, names, device, repeat,
                                          args.pairs)
        summaries.append(summary)
        rows += layer_rows
    for summary in summaries:
        for pixels in ("float32", "uint8", "f32-raw"):
            best = max((row for row in rows if row["pad"] == "gray" and row["layer"] == summary["layer"]
                        and row["pixels"] == pixels), key=lambda row: row["accumulate_vs_loop"], default=None)
            if best is not None:
                codes = (f"; {best['accumulate_with_codes_vs_loop']:.1f}x counting as_pixel_codes"
                         if pixels == "uint8" else "")
                paired = (f", {best['accumulate_vs_loop_paired']:.1f}x as the median of {args.pairs} back-to-back "
                          f"pairs" if "accumulate_vs_loop_paired" in best else "")
                print(f"{summary['layer']} layer, best from {pixels} pixels: {best['backend']} accumulates "
                      f"{best['accumulate_vs_loop']:.1f}x faster than the Python loop{paired} "
                      f"({100 * best['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth{codes})")
    result = result_header("crops", device, quick=args.quick, repeat=repeat, pairs=args.pairs, images=n_images,
                           image_size=[size, size], layers=summaries, rows=rows)
    if not args.quick:
        save_result(result, args.out, "crops")
    return result


if __name__ == "__main__":
    main()
