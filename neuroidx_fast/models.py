"""Built-in model definitions: the VGG-M architecture indexed by Rafegas et al. (Chatfield et al. 2014)."""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import backends
from .prepare import as_index, positive_int

__all__ = ["VGGM", "vgg_m", "VGG_M_CONV_LAYERS", "BandLocalResponseNorm"]

VGG_M_CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _pool_out(size: int) -> int:
    # MaxPool2d(3, 2, ceil_mode=True) as in the Caffe model: a last window may start inside the map only.
    out = -(-(size - 3) // 2) + 1
    if (out - 1) * 2 >= size:
        out -= 1
    return out


def _conv5_pool_size(input_size: int) -> int | None:
    """fc6's spatial input side for an input side, or None where some layer would have no output (a
    ceil-mode pooling of a 2-pixel map still gives one: its window starts inside the map)."""
    size = (input_size - 7) // 2 + 1          # conv1 7x7 / 2
    for stage in range(3):                    # pool1, (conv2 5x5 / 2 pad 1), pool2, (conv3-5 keep), pool5
        if size < 1:
            return None
        size = _pool_out(size)
        if stage == 0 and size >= 1:
            size = (size + 2 - 5) // 2 + 1
    return size if size >= 1 else None


def _lrn_power(div: torch.Tensor, beta: float) -> torch.Tensor:
    """div ** -beta, a new tensor (div >= k > 0). VGG-M's and AlexNet's beta = 0.75 as rsqrt(d) *
    sqrt(rsqrt(d)), two fast vector ops; any other beta as exp(-beta * log(d)), which vectorises
    better than a float-exponent pow."""
    if beta == 0.75:
        root = torch.rsqrt(div)
        return root.sqrt().mul_(root)
    return div.log().mul_(-beta).exp_()


def _lrn_divisor(x: torch.Tensor, band: torch.Tensor, k: float) -> torch.Tensor:
    """k + alpha / size * the sum of x^2 over each channel's window: one 1x1 convolution with the band
    matrix (which holds alpha / size), k as its bias."""
    return F.conv2d(x * x, band, torch.full((band.shape[0],), k, dtype=x.dtype, device=x.device))


class _BandLRN(torch.autograd.Function):
    """y = x * d^-beta, d = k + band * x^2, with a hand-written backward:

    dL/dx_j = g_j p_j - 2 beta x_j sum_c band[c, j] g_c x_c p_c / d_c, with p = d^-beta.

    On the CPU in float32 the cpp backend's kernels do each direction in one pass over memory
    (csrc/cpu/lrn.cpp); elsewhere 6 torch ops each way (autograd's own backward takes ~10).
    """

    @staticmethod
    def forward(ctx, x, band, params, kernels):
        size, alpha, beta, k = params
        ctx.params, ctx.kernels = params, kernels
        if kernels is not None:
            ctx.save_for_backward(x, band)
            return kernels.lrn_forward(x, size, alpha, beta, k)
        div = _lrn_divisor(x, band, k)
        power = _lrn_power(div, beta)
        ctx.save_for_backward(x, band, div, power)
        return x * power

    @staticmethod
    def backward(ctx, grad):
        x, band = ctx.saved_tensors[:2]
        size, alpha, beta, k = ctx.params
        if ctx.kernels is not None and not torch.is_grad_enabled():
            return ctx.kernels.lrn_backward(x, grad, size, alpha, beta, k), None, None, None
        spread_band = band.transpose(0, 1) * (-2.0 * beta)  # sums over the channels c whose window holds j
        if torch.is_grad_enabled():
            # create_graph (a second derivative): the same formula out of place, with d and p recomputed
            # from x so that they carry its graph
            div = _lrn_divisor(x, band, k)
            power = div.pow(-beta)
            return grad * power + x * F.conv2d(grad * x * power / div, spread_band), None, None, None
        div, power = ctx.saved_tensors[2:]
        inner = grad * x
        inner.mul_(power).div_(div)
        grad_x = grad * power
        return grad_x.addcmul_(x, F.conv2d(inner, spread_band)), None, None, None


class BandLocalResponseNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm(size, alpha, beta, k)`` for inputs [B, channels, H, W], the same function
    (up to float rounding), with the sum of squares over the window of channels computed as one 1x1
    convolution with a banded [C, C] matrix instead of torch's average pooling over a padded 5-d view,
    and a hand-written backward (``_BandLRN``); float32 on the CPU runs the cpp backend's one-pass
    kernels instead (csrc/cpu/lrn.cpp).

    On the CPU, forward and backward together are 2-5x faster than torch's LRN in the torch form and
    faster again in the fused one (VGG-M's norm1 at batch 64, most with a channels-last batch, where
    passes over memory cost most); on a GPU the band convolution is one GEMM-like kernel. It has no
    parameters or saved state: weights saved with ``nn.LocalResponseNorm`` load unchanged. Channel c
    is normalised by channels c - size // 2 .. c + (size - 1) // 2 (zero outside), as in torch.
    """

    def __init__(self, channels: int, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__(size, alpha, beta, k)
        self.channels = channels
        self._bands = {}  # (size, alpha, dtype, device) -> the band matrix (see _band)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "channels" not in self.__dict__:  # (pickled by an earlier version, which kept the band as a buffer)
            self.channels = self._buffers.pop("band").shape[0]
            self._bands = {}

    def _band(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The [C, C, 1, 1] band matrix of alpha / size, of the module's size and alpha as they are now (the
        cpp kernels read them so), rounded once to ``dtype`` from float64: float64 inputs get float64's
        alpha / size, not float32's."""
        key = (int(self.size), float(self.alpha), dtype, torch.device(device))
        if key not in self._bands:
            offset = torch.arange(self.channels)[None, :] - torch.arange(self.channels)[:, None]  # [c, j]: j - c
            window = (offset >= -(key[0] // 2)) & (offset <= (key[0] - 1) // 2)
            band = window.to(torch.float64) * (key[1] / key[0])
            self._bands = {key: band[:, :, None, None].to(dtype=dtype, device=device)}  # (the last one only)
        return self._bands[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} for {self.channels} channels expects [B, {self.channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        params = (int(self.size), float(self.alpha), float(self.beta), float(self.k))
        if x.shape[2] * x.shape[3] == 0 or params[2] == 0:
            # no position (the convolution refuses an empty map), or beta 0: d^0 = 1, as torch's gives it
            # even where d is 0 (exp(-0 * log 0) would be NaN)
            return x.clone()
        band = self._band(x.dtype, x.device)
        if forward_ad.unpack_dual(x).tangent is not None:
            # forward-mode AD: torch's ops carry the tangent (the kernels read raw memory; _BandLRN has no jvp)
            return x * _lrn_power(_lrn_divisor(x, band, params[3]), params[2])
        kernels = backends.cpu_kernels(x)  # NEUROIDX_BACKEND=torch selects the torch form
        if torch.is_grad_enabled() and x.requires_grad:
            return _BandLRN.apply(x, band, params, kernels)
        if kernels is not None:
            return kernels.lrn_forward(x, *params)
        return x * _lrn_power(_lrn_divisor(x, band, params[3]), params[2])

    def extra_repr(self) -> str:
        return f"{self.channels}, " + super().extra_repr()


class VGGM(nn.Sequential):
    """VGG-M with flat layer names: conv1 .. conv5, pool5, fc6, fc7, fc8 (and relu/norm/drop between).

    ``width`` scales every channel count (1.0: 96-256-512-512-512 and 4096-wide fc6/fc7, ``fc_width``
    overrides the latter); ``input_size`` (a side, or (height, width)) sets fc6's input for images of that
    size (224 gives the original 6x6x512; small inputs such as 64 give 1x1). ``lrn=False`` drops the two
    LocalResponseNorms.
    """

    def __init__(self, num_classes: int = 1000, input_size: int | tuple[int, int] = 224, width: float = 1.0,
                 fc_width: int | None = None, lrn: bool = True, dropout: float = 0.5):
        side = as_index(input_size)
        if side is not None:
            sides = (side, side)
        elif isinstance(input_size, (tuple, list)):
            sides = tuple(as_index(n) for n in input_size)
        else:
            sides = ()
        if len(sides) != 2 or None in sides:
            raise ValueError(f"input_size must be an int or (height, width) ints, got {input_size!r}")
        pooled = [_conv5_pool_size(n) for n in sides]
        if None in pooled:
            smallest = next(n for n in range(7, 512) if _conv5_pool_size(n))
            raise ValueError(f"VGG-M needs inputs of at least {smallest}x{smallest} pixels, got input_size={input_size}")
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not math.isfinite(width) or width <= 0:
            raise ValueError(f"width must be a positive number (1.0: the original channel counts), got {width!r}")
        if not isinstance(lrn, bool):  # ("no" would be taken as True)
            raise ValueError(f"lrn must be True or False (whether to keep the two LRN layers), got {lrn!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        classes = positive_int("num_classes", num_classes)
        fc_width = positive_int("fc_width", fc_width, none_means="4096 * width")
        c = [max(1, round(n * width)) for n in (96, 256, 512, 512, 512)]
        fc = fc_width if fc_width is not None else max(1, round(4096 * width))
        layers = OrderedDict()
        layers["conv1"] = nn.Conv2d(3, c[0], 7, stride=2)
        layers["relu1"] = nn.ReLU(inplace=True)
        if lrn:
            layers["norm1"] = BandLocalResponseNorm(c[0], 5, alpha=5e-4, beta=0.75, k=2.0)
        layers["pool1"] = nn.MaxPool2d(3, 2, ceil_mode=True)
        layers["conv2"] = nn.Conv2d(c[0], c[1], 5, stride=2, padding=1)
        layers["relu2"] = nn.ReLU(inplace=True)
        if lrn:
            layers["norm2"] = BandLocalResponseNorm(c[1], 5, alpha=5e-4, beta=0.75, k=2.0)
        layers["pool2"] = nn.MaxPool2d(3, 2, ceil_mode=True)
        layers["conv3"] = nn.Conv2d(c[1], c[2], 3, padding=1)
        layers["relu3"] = nn.ReLU(inplace=True)
        layers["conv4"] = nn.Conv2d(c[2], c[3], 3, padding=1)
        layers["relu4"] = nn.ReLU(inplace=True)
        layers["conv5"] = nn.Conv2d(c[3], c[4], 3, padding=1)
        layers["relu5"] = nn.ReLU(inplace=True)
        layers["pool5"] = nn.MaxPool2d(3, 2, ceil_mode=True)
        layers["flatten"] = nn.Flatten()
        layers["fc6"] = nn.Linear(c[4] * pooled[0] * pooled[1], fc)
        layers["relu6"] = nn.ReLU(inplace=True)
        layers["drop6"] = nn.Dropout(dropout)
        layers["fc7"] = nn.Linear(fc, fc)
        layers["relu7"] = nn.ReLU(inplace=True)
        layers["drop7"] = nn.Dropout(dropout)
        layers["fc8"] = nn.Linear(fc, classes)
        super().__init__(layers)
        self.input_size = input_size


def vgg_m(num_classes: int = 1000, input_size: int | tuple[int, int] = 224, width: float = 1.0, fc_width: int | None = None,
          lrn: bool = True, dropout: float = 0.5) -> VGGM:
    """The VGG-M network (untrained); see ``VGGM`` for the arguments."""
    return VGGM(num_classes, input_size, width, fc_width, lrn, dropout)
