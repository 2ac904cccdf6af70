"""The ablation and crop engines' small ops on every backend against their torch reference, in one run.

    python -m bench.bench_ops [--quick] [--device cpu|cuda]

* ``mask_replicas``: 32 masked replicas of a [32, 256, 28, 28] activation (one unit ablated each);
* ``readout_ablation_argmax``: every unit of a 512-wide read-out into 100 classes, 256 images, float64;
* ``as_pixel_codes``: 64 8-bit-sourced images of 224 x 224.

Every backend's output is checked equal to the reference's. Results: bench/results/ops-<device>-<date>.json.
"""

from __future__ import annotations


import torch

from neuroidx_fast import backends, ops

from .bench_topk import common_args, device_name, result_header, save_result, timed


def cases(device, quick: bool):
    g = torch.Generator().manual_seed(0)
    b, c, hw, m = (4, 32, 8, 8) if quick else (32, 256, 28, 32)
    x = torch.randn(b, c, hw, hw, generator=g).to(device)
    masks = torch.zeros(m, c, dtype=torch.bool)
    masks[torch.arange(m), torch.arange(m)] = True
    masks = masks.to(device)
    n, units, classes = (16, 32, 10) if quick else (256, 512, 100)
    features = torch.rand(n, units, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(classes, units, generator=g, dtype=torch.float64).to(device)
    logits = features @ weight.T
    scale = features.abs() @ weight.abs().T
    images = (torch.randint(0, 256, (8 if quick else 64, 3, 224, 224), generator=g).float() / 255).to(device)
    return {
        "mask_replicas": lambda backend: ops.mask_replicas(x, masks, backend=backend),
        "readout_ablation_argmax": lambda backend: ops.readout_ablation_argmax(
            logits, features, weight, scale=scale, err_rel=1e-6, backend=backend),
        "as_pixel_codes": lambda backend: ops.as_pixel_codes(images, backend=backend),
    }


def main(argv=None):
    args = common_args(__doc__, argv)
    device = torch.device(args.device)
    names = [n for n in backends.available(device.type) if not (n == "triton" and device.type == "cpu")]
    names.sort(key=lambda n: n != "torch")  # the reference first: it is every ratio's denominator
    repeat = 3 if args.quick else 7
    print(f"device: {device_name(device)}; backends: {names}; median of {repeat}")
    print(f"  {'op':<26}{'backend':<9}{'ms':>10}{'x torch':>9}{'equal':>7}")
    rows = []
    for op, run in cases(device, args.quick).items():
        expected = run("torch")
        reference_s = None
        for backend in names:
            equal = bool(torch.equal(run(backend), expected))
            seconds = timed(lambda: run(backend), device, repeat)
            reference_s = reference_s or seconds
            rows.append({"op": op, "backend": backend, "seconds": seconds, "vs_torch": reference_s / seconds,
                         "equal_to_reference": equal})
            print(f"  {op:<26}{backend:<9}{seconds * 1e3:>10.2f}{reference_s / seconds:>9.1f}{str(equal):>7}")
    result = result_header("ops", device, quick=args.quick, repeat=repeat, rows=rows)
    if not args.quick:
        save_result(result, args.out, "ops")
    return result


if __name__ == "__main__":
    main()
