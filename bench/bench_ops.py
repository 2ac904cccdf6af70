"""The ablation and crop engines' small ops on every backend against their torch reference, in one run.

    python -m bench.bench_ops [--quick] [--device cpu|cuda]

* ``mask_replicas``: 32 masked replicas of a [32, 256, 28, 28] activation (one unit ablated each);
* ``readout_ablation_argmax``: every unit of a 512-wide read-out into 100 classes, 256 images, float64;
* ``as_pixel_codes``: 64 8-bit-sourced images of 224 x 224;
* ``lrn_forward_backward``: VGG-M's LRN (norm1 at width 0.25: 24 channels, 29 x 29, channels-last,
  batch 64) forward and input gradient, the cpp kernels (csrc/cpu/lrn.cpp) against the torch form;
* ``image_conv_input_grad``: the pixel gradient of VGG-M's conv1 (24 x 3 x 7 x 7, stride 2) at batch 64,
  64 x 64, by phases (image_conv_grad.py) against autograd's convolution backward.

Every backend's output is checked equal to the reference's (the last two: equal up to float32
rounding, within 1e-5 of the largest value). Results: bench/results/ops-<device>-<date>.json.
"""

from __future__ import annotations

import torch

from neuroidx_fast import backends, ops
from neuroidx_fast.image_conv_grad import phase_kernel, strided_input_gradient
from neuroidx_fast.models import BandLocalResponseNorm, _BandLRN

from .bench_topk import common_args, device_name, result_header, save_result, timed, timed_backends


def cases(device, quick: bool, names):
    """op -> ({variant: run}, exact): the variants are the backends of ``names`` (the torch reference
    first), or a model-side kernel against its torch form."""
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
    backend_ops = {
        "mask_replicas": lambda backend: ops.mask_replicas(x, masks, backend=backend),
        "readout_ablation_argmax": lambda backend: ops.readout_ablation_argmax(
            logits, features, weight, scale=scale, err_rel=1e-6, backend=backend),
        "as_pixel_codes": lambda backend: ops.as_pixel_codes(images, backend=backend),
    }
    table = {op: ({name: (lambda run=run, name=name: run(name)) for name in names}, True)
             for op, run in backend_ops.items()}
    batch = 8 if quick else 64
    kernels = backends.cpu_kernels(x)
    if kernels is not None:  # the cpp backend serves this device
        lrn = BandLocalResponseNorm(24, 5, alpha=5e-4, beta=0.75, k=2.0)
        params = (lrn.size, lrn.alpha, lrn.beta, lrn.k)
        act = (torch.rand(batch, 24, 29, 29, generator=g) * 4).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(act.shape, generator=g).contiguous(memory_format=torch.channels_last)

        def lrn_run(with_kernels):
            a = act.detach().requires_grad_(True)
            out = _BandLRN.apply(a, lrn._band(a.dtype, a.device), params, with_kernels)
            return torch.cat([out.detach().flatten(), torch.autograd.grad(out, a, grad)[0].flatten()])
        table["lrn_forward_backward"] = ({"torch": lambda: lrn_run(None), "cpp": lambda: lrn_run(kernels)}, False)
    conv_weight = torch.randn(24, 3, 7, 7, generator=g).to(device)
    pixels = torch.rand(batch, 3, 64, 64, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(batch, 24, 29, 29, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    kernel = phase_kernel(conv_weight, 2)

    def autograd_input_grad():  # the kernel autograd's backward runs for the input gradient, alone (no forward)
        return torch.ops.aten.convolution_backward(grad_out, pixels, conv_weight, None, [2, 2], [0, 0], [1, 1], False,
                                                   [0, 0], 1, [True, False, False])[0]
    table["image_conv_input_grad"] = ({
        "torch": autograd_input_grad,
        "phases": lambda: strided_input_gradient(grad_out, kernel, 2, (0, 0), (64, 64)),
    }, False)
    return table


def main(argv=None):
    args = common_args(__doc__, argv)
    device = torch.device(args.device)
    # float32 convolutions in float32: cuDNN's default TF32 rounds the inputs to 10 bits, so the two conv1
    # input gradients (each TF32 in its own order) differed by more than float32 rounding on an H100
    torch.backends.cudnn.allow_tf32 = False
    names = timed_backends(device.type)  # the reference first: it is every ratio's denominator
    repeat = 3 if args.quick else 7
    print(f"device: {device_name(device)}; backends: {names}; median of {repeat}")
    print(f"  {'op':<26}{'backend':<9}{'ms':>10}{'x torch':>9}{'equal':>7}")
    rows = []
    for op, (variants, exact) in cases(device, args.quick, names).items():
        expected = variants["torch"]()
        reference_s = None
        for variant, run in variants.items():
            out = run()
            equal = bool(torch.equal(out, expected) if exact
                         else (out - expected).abs().max() <= 1e-5 * expected.abs().max())
            seconds = timed(run, device, repeat)
            reference_s = reference_s or seconds
            rows.append({"op": op, "backend": variant, "seconds": seconds, "vs_torch": reference_s / seconds,
                         "equal_to_reference": equal, "exact": exact})
            print(f"  {op:<26}{variant:<9}{seconds * 1e3:>10.2f}{reference_s / seconds:>9.1f}{str(equal):>7}")
    result = result_header("ops", device, quick=args.quick, repeat=repeat, rows=rows)
    if not args.quick:
        save_result(result, args.out, "ops")
    return result


if __name__ == "__main__":
    main()
