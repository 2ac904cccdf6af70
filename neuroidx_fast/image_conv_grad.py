"""The pixel gradient of a strided convolution that reads the image, as one stride-1 convolution.

Optimising an image means, every step, the gradient of the first convolution with respect to its
input: a transposed convolution from C output channels back to 3 pixel channels, which oneDNN runs
slowly (few output channels). Split by output phase instead, it is an ordinary convolution: pixel
(s p + ry, s q + rx) of the (padded) input gradient is the correlation of the output gradient with
the sub-kernel W[:, :, ry::s, rx::s], flipped. All s^2 phases together are one stride-1 convolution
with 3 s^2 output channels (``phase_kernel``), and one copy interleaves them. Measured on the CPU
(2 threads): 2-2.5x faster than oneDNN's backward for VGG-M's conv1 at batch 64, an AlexNet conv1 and
a ResNet stem at batch 4-8, equal at batch 1; the same up to float rounding. With more input
channels oneDNN's own backward is faster (VGG-M's conv2: 2x slower by phases), so only convolutions
with at most ``MAX_IMAGE_CHANNELS`` input channels take this path.

``image_conv_gradients(model)`` swaps the forward of each such ``nn.Conv2d`` (exact type, square
stride > 1, no groups or dilation, zero padding, frozen weights) for one whose backward is this,
inside a ``with`` block; the outputs are those of the module's own forward, bit for bit. The
optimisation loops use it on the CPU only: against cuDNN it is unmeasured.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["image_conv_gradients", "phase_kernel", "strided_input_gradient"]

MAX_IMAGE_CHANNELS = 4


def phase_kernel(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """[s * s * Cin, Cout, A, B] (A = ceil(kh / s), B = ceil(kw / s)): output channel (ry * s + rx) * Cin
    + ci holds the flipped sub-kernel W[:, ci, ry::s, rx::s], aligned to the bottom-right corner."""
    cout, cin, kh, kw = weight.shape
    a, b = -(-kh // stride), -(-kw // stride)
    kernel = weight.new_zeros(stride, stride, cin, cout, a, b)
    for ry in range(min(stride, kh)):
        for rx in range(min(stride, kw)):
            sub = weight[:, :, ry::stride, rx::stride]  # tap ky = ry + s * i
            kernel[ry, rx, :, :, a - sub.shape[2]:, b - sub.shape[3]:] = sub.permute(1, 0, 2, 3).flip(2, 3)
    return kernel.reshape(stride * stride * cin, cout, a, b)


def strided_input_gradient(grad_out: torch.Tensor, kernel: torch.Tensor, stride: int, padding: tuple[int, int],
                           input_size: tuple[int, int]) -> torch.Tensor:
    """The gradient [B, Cin, H, W] of conv2d(x, W, stride, padding) w.r.t. x, given the output gradient
    and ``phase_kernel(W, stride)``."""
    (h, w), (ph, pw), s = input_size, padding, stride
    a, b = kernel.shape[2:]
    phases = F.conv2d(grad_out, kernel.to(grad_out.dtype), padding=(a - 1, b - 1))  # [B, s^2 Cin, R, C]
    n, channels, rows, cols = phases.shape
    cin = channels // (s * s)
    # interleave the phases into a channels-last image: [B, R, C, ry, rx, ci] -> [B, R, ry, C, rx, ci], one
    # copy of (rx, ci) runs (from the channels-last layout oneDNN returns, this permute is a view)
    full = torch.empty((n, cin, rows * s, cols * s), dtype=phases.dtype, device=phases.device,
                       memory_format=torch.channels_last)
    full.permute(0, 2, 3, 1).view(n, rows, s, cols, s, cin).copy_(
        phases.permute(0, 2, 3, 1).reshape(n, rows, cols, s, s, cin).permute(0, 1, 3, 2, 4, 5))
    if rows * s >= ph + h and cols * s >= pw + w:
        return full[:, :, ph:ph + h, pw:pw + w]  # the padded input's rows and columns, less the padding
    # the phases miss the last pixels (past the forward's last window: no gradient there): zeros
    return F.pad(full, (-pw, pw + w - cols * s, -ph, ph + h - rows * s))


class _ImageConv(torch.autograd.Function):
    """conv2d(x, weight, bias) whose backward gives the input gradient only (weights frozen), from the
    phase kernel of the weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, stride, padding):
        ctx.save_for_backward(kernel)
        ctx.stride, ctx.padding, ctx.input_size = stride, padding, tuple(x.shape[-2:])
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        kernel, = ctx.saved_tensors
        grad_x = strided_input_gradient(grad, kernel, ctx.stride, ctx.padding, ctx.input_size)
        return grad_x, None, None, None, None, None


def _eligible(module: nn.Module) -> bool:
    if type(module) is not nn.Conv2d:  # subclasses may compute something else
        return False
    stride, padding = module.stride, module.padding
    return (stride[0] == stride[1] > 1 and module.in_channels <= MAX_IMAGE_CHANNELS and module.groups == 1
            and tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros"
            and not isinstance(padding, str) and not module.weight.requires_grad
            and (module.bias is None or not module.bias.requires_grad))


def _fast_forward(module: nn.Conv2d):
    stride, padding = module.stride[0], tuple(module.padding)
    cached = {}  # the phase kernel, rebuilt only if the weights change (they are frozen: normally once)

    def forward(x):
        if not (torch.is_grad_enabled() and x.requires_grad and x.dim() == 4):
            return nn.Conv2d.forward(module, x)
        weight = module.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if cached.get("key") != key:
            cached["key"], cached["kernel"] = key, phase_kernel(weight.detach(), stride)
        return _ImageConv.apply(x, weight, module.bias, cached["kernel"], stride, padding)
    return forward


@contextlib.contextmanager
def image_conv_gradients(model: nn.Module, enabled: bool = True):
    """Within the block, the eligible convolutions of ``model`` (see the module docstring) compute
    their input gradient by phases. Their forward is restored afterwards. Yields how many there are."""
    patched = [m for m in model.modules() if enabled and _eligible(m) and "forward" not in m.__dict__]
    try:
        for m in patched:
            m.forward = _fast_forward(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
