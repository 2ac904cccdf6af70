"""The analytic receptive field (SPEC.md section 2): a walk of the model's graph.

The walk traces the model with torch.fx and runs it once on a blank input of the given size (to know
every tensor's shape), carrying per axis a jump ``j``, a size ``r`` and an offset ``o`` through each
node: conv / pool layers compose them, element-wise layers keep them, merges (add, cat) take the union
of their inputs' boxes, and layers that mix all positions (global pooling, flatten, linear) give the
whole image. It also follows which dimensions hold the positions, through permutes (channels last, as
in ConvNeXt), channel reductions and indexing, so that a Linear or LayerNorm over the channels of a
channels-last tensor keeps the box and one over positions mixes them. What it does not know raises
``_Unsupported``, and ``receptive_field`` measures the layer with the gradient probe instead.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_split import plain_module
from .hooks import SharedModuleError
from .prepare import evaluating
from .rf_field import ReceptiveField, _blank_input, _covering_window, _layer_output, _spatial

# --------------------------------------------------------------------------------------------- walk
@dataclass(frozen=True)
class _Box:
    """Per axis (y, x): jump, size, offset of a tensor's positions in input pixels. ``axes``: the
    tensor dimensions that hold y and x where they are not its last two (after a permute to channels
    last, as in ConvNeXt's LayerNorm and Linear layers), else None."""

    jump: tuple[int, int]
    size: tuple[int, int]
    offset: tuple[int, int]
    axes: tuple[int, int] | None = None


WHOLE = "whole image"
# the field of a value the layer does not read, where the walk does not know the op that made it (_Walk)
_UNKNOWN = "unknown"
_START = _Box((1, 1), (1, 1), (0, 0))


class _Unsupported(Exception):
    """A node the walk does not know; ``receptive_field`` falls back to the probe."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # fx appends graph context to args; users get this line only


class _Reached(Exception):
    def __init__(self, state, output, node=None):
        super().__init__()
        self.state, self.output, self.node = state, output, node



def _raise(message):
    raise _Unsupported(message)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else _raise(f"expected 1 or 2 values, got {v!r}")
    return int(v), int(v)


def _window(state, kernel, stride, padding, dilation=1):
    """Compose a sliding window (SPEC.md 2): r' = r + (k_eff - 1) j, o' = o - q j, j' = j s."""
    if state is WHOLE:
        return WHOLE
    if state.axes is not None:
        raise _Unsupported("a window over a tensor whose positions are not its last two axes")
    k, s, q, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    size = tuple(state.size[a] + d[a] * (k[a] - 1) * state.jump[a] for a in range(2))
    offset = tuple(state.offset[a] - q[a] * state.jump[a] for a in range(2))
    jump = tuple(state.jump[a] * s[a] for a in range(2))
    return _Box(jump, size, offset)


def _conv_padding(padding, kernel, dilation):
    if padding == "valid":
        return 0, 0
    if padding == "same":  # torch pads (total // 2) before and the rest after
        k, d = _pair(kernel), _pair(dilation)
        return tuple(d[a] * (k[a] - 1) // 2 for a in range(2))
    return _pair(padding)


def _union(states):
    states = [s for s in states if s is not None]
    if not states:
        return None
    if any(s is WHOLE for s in states):
        return WHOLE
    if len({s.axes for s in states}) > 1:
        raise _Unsupported("a merge of tensors whose positions lie on different axes")
    jumps = {s.jump for s in states}
    if len(jumps) > 1:
        raise ValueError(f"cannot merge branches with different strides {sorted(jumps)}: their positions do not "
                         "correspond to the same input pixels (a receptive field needs one stride per layer)")
    start = tuple(min(s.offset[a] for s in states) for a in range(2))
    end = tuple(max(s.offset[a] + s.size[a] for s in states) for a in range(2))
    return _Box(states[0].jump, tuple(end[a] - start[a] for a in range(2)), start, states[0].axes)


def _axes(state, t) -> tuple[int, int]:
    """The dimensions of tensor ``t`` that hold the positions of ``state`` (a _Box)."""
    return (t.dim() - 2, t.dim() - 1) if state.axes is None else state.axes


def _relaid(state, axes, ndim: int):
    """``state`` with its positions on dimensions ``axes`` of an ``ndim``-d tensor (a map needs two)."""
    if state is None or state is WHOLE:
        return state
    if ndim < 2 or None in axes:
        return WHOLE
    axes = (int(axes[0]), int(axes[1]))
    return dataclasses.replace(state, axes=None if axes == (ndim - 2, ndim - 1) else axes)


def _dims(dim, ndim: int):
    """The set of (non-negative) dimensions a ``dim`` argument names; None or () is all of them."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return set(range(ndim))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return {int(d) % ndim for d in dims}


def _without_dims(state, x, out, removed):
    """After an operation that reduces (or squeezes) dimensions ``removed`` of ``x``: the box where they
    hold no position (out has them, keepdim, or not), else the whole image. (A mean over the rows alone
    is the whole image too, though its units see every row of a few columns: its map, broadcast back onto
    the rows, as in coordinate attention, has no single stride along them, which a merge would refuse.)"""
    if state is None or state is WHOLE:
        return state
    axes = _axes(state, x)
    if removed & set(axes) or not isinstance(out, torch.Tensor):
        return WHOLE
    if out.dim() == x.dim():
        return _relaid(state, axes, out.dim())
    return _relaid(state, tuple(a - sum(d < a for d in removed) for a in axes), out.dim())


def _moved(state, x, out, op):
    """After a permutation of ``x``'s dimensions (permute, transpose, movedim, unsqueeze: ``op`` applied
    to a tensor): where the positions went, found by applying ``op`` to a shapeless tensor whose
    dimension i has size i + 2."""
    if state is None or state is WHOLE:
        return state
    dummy = torch.empty(tuple(range(2, x.dim() + 2)), device="meta")
    sizes = list(op(dummy).shape)
    axes = _axes(state, x)
    if not isinstance(out, torch.Tensor) or len(sizes) != out.dim():
        raise _Unsupported("a permutation of dimensions the walk cannot follow")
    return _relaid(state, tuple(sizes.index(a + 2) for a in axes), out.dim())


def _last_dims_state(state, x, count: int):
    """An operation over the last ``count`` dimensions of ``x`` (Linear, LayerNorm): pointwise where
    they hold no position (channels last), else mixing: the whole image."""
    if state is None or state is WHOLE:
        return state
    if not isinstance(x, torch.Tensor) or any(a >= x.dim() - count for a in _axes(state, x)):
        return WHOLE
    return state


# A map's positions flattened into one axis of tokens, its channels kept apart (x.flatten(2).transpose(1, 2)
# before a Linear over the channels, then a reshape back: SegFormer's Mix-FFN, PVT): each token keeps its
# box until a layer mixes the tokens, which the walk, following two position axes, cannot tell from a layer
# over the channels; "whole image" would be wrong for the per-token layers, so the probe measures it.
_TOKENS = ("a flatten of the map's positions into one axis of tokens (as in SegFormer and PVT), which the walk "
           "does not follow")


def _flatten_state(state, args, kwargs, out):
    """flatten(x, start_dim, end_dim) (the function, the method, nn.Flatten's arguments): the box where
    the flattened dimensions hold no position, unsupported where they are the positions alone (tokens,
    see _TOKENS), else (channels and positions together, before a linear) the whole image."""
    x = args[0]
    if state is None or state is WHOLE or not isinstance(x, torch.Tensor):
        return state if state is None else WHOLE
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    start, end = start % max(x.dim(), 1), end % max(x.dim(), 1)
    axes = _axes(state, x)
    if set(range(start, end + 1)) == set(axes):
        _raise(_TOKENS)
    if any(start <= a <= end for a in axes) or not isinstance(out, torch.Tensor):
        return WHOLE
    return _relaid(state, tuple(a - (end - start) if a > end else a for a in axes), out.dim())




def _adaptive_windows(in_length: int, out_length: int) -> list[tuple[int, int]]:
    """The windows [start, end) of torch's adaptive pooling along one axis: output i pools inputs
    floor(i * in / out) to ceil((i + 1) * in / out) - 1."""
    return [(i * in_length // out_length, -(-(i + 1) * in_length // out_length)) for i in range(out_length)]




def _adaptive_axis(in_length: int, out_length: int) -> tuple[int, int, int, bool]:
    """(kernel, stride, start, exact) of adaptive pooling along one axis: windows that hold every one of
    torch's, exact where torch's are uniform (where the sizes divide, and in cases such as 8 -> 7 or
    9 -> 4 too); where they are not (10 -> 4: rows 0-2, 2-4, 5-7, 7-9), the smallest evenly spaced
    windows that hold them, at a stride between their smallest and largest spacing."""
    windows = _adaptive_windows(in_length, out_length)
    if out_length == 1:
        return in_length, in_length, 0, True
    spacings = [b[0] - a[0] for a, b in zip(windows, windows[1:])]
    kernel, stride, start = _covering_window([(i, a, b) for i, (a, b) in enumerate(windows)],
                                             range(min(spacings), max(spacings) + 1))
    exact = all(w == (start + i * stride, start + i * stride + kernel) for i, w in enumerate(windows))
    return kernel, stride, start, exact


def _adaptive(state, in_size, out_size):
    """Adaptive pooling from an ``in_size`` map to ``out_size``: a window of its exact geometry where its
    windows are uniform; else one whose boxes hold every window (a superset, warned of: SPEC.md 2 wants
    every pixel a unit sees inside its box, which the probe's approximation, from windows near the centre,
    does not give)."""
    if state is WHOLE or in_size is None:
        return WHOLE
    out = tuple(in_size[a] if o is None else int(o) for a, o in enumerate(_pair_or_none(out_size)))
    if out == (1, 1):
        return WHOLE  # global pooling mixes every position (SPEC.md 2)
    if any(out[a] > in_size[a] for a in range(2)):
        # its units repeat input positions (2 -> 6: three units per input row): no stride of whole pixels
        raise _Unsupported(f"adaptive pooling from {in_size} to {out}, which upsamples (a larger map than its input)")
    kernel, stride, start, exact = zip(*(_adaptive_axis(in_size[a], out[a]) for a in range(2)))
    if not all(exact):
        warnings.warn(f"receptive field: adaptive pooling from {in_size[0]}x{in_size[1]} to {out[0]}x{out[1]} pools "
                      f"windows of unequal sizes or spacings, which no single size and stride describe; the boxes "
                      f"hold every window ({kernel[0]}x{kernel[1]} positions of its input, stride "
                      f"{stride[0]}x{stride[1]}), so they are larger than some units' fields", stacklevel=2)
    return _window(state, kernel, stride, tuple(-v for v in start))


def _pair_or_none(v):
    if isinstance(v, (tuple, list)):
        return (v[0], v[-1])
    return v, v


_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LocalResponseNorm, nn.Softmax2d,
    nn.ChannelShuffle,
)
# Pointwise when taken over the channel axis (each position on its own), else mixing whole rows / columns.
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, F.log_softmax, torch.log_softmax}
# Reductions: over channels they keep the box, over positions they see the whole image.
_REDUCING_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.logsumexp}
_REDUCING_METHODS = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp"}
# Permutations of dimensions (and insertions of one): the positions move with them.
_PERMUTING_FUNCTIONS = {torch.permute, torch.transpose, torch.movedim, torch.moveaxis, torch.swapaxes,
                        torch.swapdims, torch.unsqueeze}
_PERMUTING_METHODS = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "unsqueeze"}
_RESHAPING_METHODS = {"view", "reshape", "view_as", "reshape_as", "flatten", "squeeze"}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
# Methods that move, drop or mix the dimensions of a map: what they do to its positions is worked out.
_LAYOUT_METHODS = _RESHAPING_METHODS | _PERMUTING_METHODS | _REDUCING_METHODS | _SOFTMAX_METHODS
# Normalisations whose statistics are taken over all positions of an image mix the whole map (batch and
# instance norms, whose statistics depend on their settings: _norm_state). (Linear
# and LayerNorm act on the last dimensions: pointwise where the positions are elsewhere, channels last.)
_MIXING_MODULES = (nn.GroupNorm, nn.Bilinear)

_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.clamp, torch.clip, torch.clamp_max, torch.maximum, torch.minimum, torch.exp, torch.abs, torch.where,
    torch.cat, torch.concat, torch.square, torch.sqrt, torch.pow, operator.pow,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softplus, torch.sigmoid, F.dropout, F.dropout2d, F.local_response_norm,
    F.channel_shuffle, torch.channel_shuffle, torch.clone,
}
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
    "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_", "contiguous", "clone",
    "float", "half", "bfloat16", "double", "to", "type_as", "detach", "exp", "abs", "neg", "pow", "sqrt", "square",
}
_MIXING_FUNCTIONS = {F.group_norm}
# Cuts into pieces along one dimension (ShuffleNet's channel split): the box, along a dimension that
# holds no position.
_SPLITTING_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
_SPLITTING_METHODS = {"chunk", "split", "tensor_split"}


def _conv2d_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Argument names of F.conv2d (a builtin without an inspectable signature)."""


def _avg_pool2d_signature(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                          divisor_override=None):
    """Argument names of F.avg_pool2d (a builtin without an inspectable signature)."""


def _cat_signature(tensors, dim=0):
    """Argument names of torch.cat / torch.concat / torch.stack (builtins)."""


def _softmax_signature(input, dim=None, dtype=None):
    """Argument names of torch.softmax / torch.log_softmax (builtins)."""


def _reduce_state(state, args, kwargs, out):
    """A reduction of ``x`` = args[0] over ``dim`` (torch.mean(x, dim), x.amax(dim=1, keepdim=True) and
    the like): over channels it keeps the box, over positions (or all dimensions) it mixes them: the
    whole image. torch.max(x, y) of two tensors is pointwise."""
    if state is None or state is WHOLE:
        return state
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("other"))
    if isinstance(dim, torch.Tensor):
        return state
    if isinstance(out, (tuple, list)):  # torch.max(x, dim) returns (values, indices)
        out = out[0] if out else None
    if not isinstance(x, torch.Tensor):
        return WHOLE
    return _without_dims(state, x, out, _dims(dim, x.dim()))


def _split_state(state, args, kwargs):
    """x.chunk(n, dim), torch.split(x, size, dim) and the like (dim third, as in all of them, default 0):
    every piece keeps the box, unless the cut is along a spatial axis."""
    if state is None or state is WHOLE:
        return state
    x = args[0] if args else kwargs.get("input", kwargs.get("tensor"))
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int):
        raise _Unsupported("a split whose dimension is not a number")
    if dim % x.dim() in _axes(state, x):
        raise _Unsupported("a split along a spatial axis")
    return state


def _pad_state(state, args, kwargs):
    """F.pad(x, (left, right, top, bottom, ...)): as a padding module, whatever the mode (the box is the
    theoretical one, SPEC.md 2); pads of further dimensions (channels) move no position."""
    if state is None or state is WHOLE:
        return state
    pad = args[1] if len(args) > 1 else kwargs.get("pad")
    if not isinstance(pad, (tuple, list)) or not all(isinstance(v, int) for v in pad):
        raise _Unsupported("F.pad with padding that is not a tuple of ints")
    left = pad[0] if len(pad) >= 2 else 0
    top = pad[2] if len(pad) >= 4 else 0
    return _window(state, 1, 1, (top, left))


def _pads_circularly(target, args, kwargs) -> bool:
    """A module or function that pads its input circularly (wrapping around to the opposite border)."""
    if isinstance(target, nn.Conv2d) and target.padding_mode == "circular":
        return any(_conv_padding(target.padding, target.kernel_size, target.dilation))
    if isinstance(target, nn.CircularPad2d):
        return any(target.padding)
    if target is F.pad:
        return (args[2] if len(args) > 2 else kwargs.get("mode", "constant")) == "circular"
    return False


def _warn_circular(name: str) -> None:
    """The box of SPEC.md 2 is the theoretical field, positions past a border included; where the network
    pads circularly those positions are the opposite border's pixels, which no box nor crop holds."""
    warnings.warn(f"receptive field: {name} pads circularly, so units near a border also see pixels of the "
                  "opposite border, which their boxes (and the crops cut from them) leave out", stacklevel=2)


@dataclass(frozen=True)
class _EdgePad:
    """A padding by reflection or replication on the way to the layer: ``name`` for messages, ``mode``
    ("reflect" or "replicate"), the box of its input (a _Box, positions last), that input's map size, and
    the widths padded before (top, left) and after (bottom, right)."""

    name: str
    mode: str
    state: _Box
    length: tuple[int, int]
    before: tuple[int, int]
    after: tuple[int, int]


def _edge_padding(target, args, kwargs):
    """(mode, (top, left), (bottom, right)) of a module or function that pads by reflection or
    replication, else None."""
    if isinstance(target, nn.Conv2d) and target.padding_mode in ("reflect", "replicate"):
        before = _conv_padding(target.padding, target.kernel_size, target.dilation)
        if target.padding == "same":  # torch pads (total // 2) before and the rest after
            k, d = _pair(target.kernel_size), _pair(target.dilation)
            return target.padding_mode, before, tuple(d[a] * (k[a] - 1) - before[a] for a in range(2))
        return target.padding_mode, before, before
    if isinstance(target, (nn.ReflectionPad2d, nn.ReplicationPad2d)):
        left, right, top, bottom = target.padding
        return ("reflect" if isinstance(target, nn.ReflectionPad2d) else "replicate"), (top, left), (bottom, right)
    if target is F.pad:
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        pad = args[1] if len(args) > 1 else kwargs.get("pad")
        if mode in ("reflect", "replicate") and isinstance(pad, (tuple, list)) and len(pad) >= 2:
            left, right = pad[0], pad[1]
            top, bottom = (pad[2], pad[3]) if len(pad) >= 4 else (0, 0)
            return mode, (top, left), (bottom, right)
    return None


def _edge_pad_misses(pad: _EdgePad, rf: ReceptiveField) -> list[str]:
    """Per axis, where the boxes of ``rf`` leave out pixels that ``pad`` brings in: a unit that reads a
    padded position sees, through it, the input pixels it copies (reflect: position -k is k), which lie
    outside the unit's box where the padding is wider than the window after it reaches in (a 3x3 conv
    after a padding of 2: unit 0 reads positions -2 to 0, so rows 2 and 1 in its box's rows -2 to 0)."""
    misses = []
    for a, (row, rows) in enumerate((("row", "rows"), ("column", "columns"))):
        jump, size, offset = pad.state.jump[a], pad.state.size[a], pad.state.offset[a]
        length, last = pad.length[a], rf.input_size[a] - 1
        padded = list(range(-pad.before[a], 0)) + list(range(length, length + pad.after[a]))
        for u in range(rf.map_size[a]):
            lo = rf.offset[a] + u * rf.stride[a]
            hi = lo + rf.size[a] - 1
            box_lo, box_hi = max(lo, 0), min(hi, last)
            outside = []  # the input pixels the unit sees through padded positions, outside its box
            for t in padded:
                if not (lo <= offset + t * jump and offset + t * jump + size - 1 <= hi):
                    continue  # the unit does not read padded position t
                if pad.mode == "reflect":
                    source = -t if t < 0 else 2 * (length - 1) - t
                else:
                    source = min(max(t, 0), length - 1)
                first = offset + source * jump
                outside += [p for p in range(max(first, 0), min(first + size, last + 1)) if not box_lo <= p <= box_hi]
            if outside:
                misses.append(f"the units of map {row} {u} (boxes over input {rows} {lo} to {hi}) also see input "
                              f"{rows} {min(outside)} to {max(outside)}")
                break
    return misses


def _warn_edge_pads(pads, rf: ReceptiveField, stacklevel: int) -> None:
    """SPEC.md 2's boxes are the theoretical fields; where a padding by reflection or replication is wider
    than the window after it reaches into the image, units near a border also see pixels past their
    boxes (the copies' sources), which no box nor crop holds: said, as for circular padding."""
    if rf.whole_image:
        return
    for pad in pads:
        misses = _edge_pad_misses(pad, rf)
        if misses:
            how = "reflection" if pad.mode == "reflect" else "replication"
            warnings.warn(f"receptive field: {pad.name} pads by {how} wider than the windows after it reach in, so "
                          f"units near a border also see pixels that their boxes (and the crops cut from them) leave "
                          f"out: {'; '.join(misses)}", stacklevel=stacklevel)


def _softmax_state(state, x, dim):
    """A softmax over ``dim`` of ``x``: pointwise over a dimension that holds no position (dim None:
    torch's implicit choice, the channels of a 4-d input), else every position mixes with its whole
    row, column or map: the whole image."""
    if state is None or state is WHOLE:
        return state
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return WHOLE
    if dim is None:
        dim = 1 if x.dim() == 4 else None
    return state if dim is not None and dim % x.dim() not in _axes(state, x) else WHOLE


# Functions whose Python signature is hidden (builtins, boolean-dispatch wrappers): where to read it.
_SIGNATURES = {
    F.conv2d: _conv2d_signature, F.avg_pool2d: _avg_pool2d_signature, F.max_pool2d: F._max_pool2d,
    torch.max_pool2d: F._max_pool2d, F.max_pool2d_with_indices: F._max_pool2d,
    F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices, torch.cat: _cat_signature,
    torch.concat: _cat_signature, torch.stack: _cat_signature, torch.softmax: _softmax_signature,
    torch.log_softmax: _softmax_signature,
}


def _bind(fn, args, kwargs):
    try:
        return inspect.signature(_SIGNATURES.get(fn, fn)).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        raise _Unsupported(f"cannot read the arguments of {getattr(fn, '__name__', fn)}") from None


def _norm_state(state, batch_statistics: bool):
    """A batch or instance normalisation: pointwise with running statistics (a per-channel scale and shift),
    but statistics of the input itself are taken over every position of the map: the whole image."""
    return WHOLE if batch_statistics and state is not None else state


def _module_state(module: nn.Module, state, x, out):
    if "forward" in module.__dict__:  # the layer itself (else traced) with a forward set on it: anything
        raise _Unsupported(f"a forward set on the {type(module).__name__} instance")
    if isinstance(module, nn.modules.batchnorm._NormBase):
        # BatchNorm in eval mode without running statistics (track_running_stats=False) normalises by
        # the batch's; InstanceNorm by the image's unless it tracks running statistics (torch's rules)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            return _norm_state(state, module.training or not module.track_running_stats)
        return _norm_state(state, module.training or (module.running_mean is None and module.running_var is None))
    if isinstance(module, nn.Conv2d):
        return _window(state, module.kernel_size, module.stride,
                       _conv_padding(module.padding, module.kernel_size, module.dilation), module.dilation)
    if isinstance(module, nn.MaxPool2d):
        return _window(state, module.kernel_size, module.stride or module.kernel_size, module.padding,
                       module.dilation)
    if isinstance(module, nn.AvgPool2d):
        return _window(state, module.kernel_size, module.stride or module.kernel_size, module.padding)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(state, _spatial(x), module.output_size)
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)):
        left, _, top, _ = module.padding if len(module.padding) == 4 else (module.padding[0],) * 4
        return _window(state, 1, 1, (top, left))
    if _known_pointwise(module):  # (the layer itself may be another subclass: not known, probed)
        return _softmax_state(state, x, module.dim) if isinstance(module, _SOFTMAX_MODULES) else state
    if isinstance(module, nn.Linear):
        return _last_dims_state(state, x, 1)
    if isinstance(module, nn.LayerNorm):
        return _last_dims_state(state, x, len(module.normalized_shape))
    if isinstance(module, nn.Flatten):
        return _flatten_state(state, (x, module.start_dim, module.end_dim), {}, out)
    if isinstance(module, _MIXING_MODULES):
        return WHOLE
    raise _Unsupported(f"module type {type(module).__name__}")


def _function_state(fn, args, kwargs, states, out):
    name = getattr(fn, "__name__", str(fn))
    if fn is F.batch_norm:
        return _norm_state(_union(states), bool(_bind(fn, args, kwargs).get("training", False)))
    if fn is F.instance_norm:
        return _norm_state(_union(states), bool(_bind(fn, args, kwargs).get("use_input_stats", True)))
    if fn in _POINTWISE_FUNCTIONS:
        merged = _union(states)
        if merged is not None and merged is not WHOLE and isinstance(out, torch.Tensor):
            # a 1 x 1 operand (a per-channel scale, a pooled gate) broadcasts without mixing positions;
            # where it comes from the image, the union of the states above holds it
            shapes = {_spatial(a) for a in _tensor_args(args, kwargs) if _spatial(a) not in (None, (1, 1))}
            if len(shapes) > 1 and fn not in (torch.cat, torch.concat):
                raise _Unsupported(f"{name} broadcasts maps of different sizes {sorted(shapes)}")
            if fn in (torch.cat, torch.concat):
                dim = _bind(fn, args, kwargs).get("dim", 0)
                if out.dim() >= 2 and dim % out.dim() in _axes(merged, out):
                    raise _Unsupported("concatenation along a spatial axis")
        return merged
    if fn is getattr:
        # x.shape, x.dtype, x.device (fx records them): sizes and settings, which carry no pixels
        if not isinstance(out, torch.Tensor) or _union(states) is None:
            return None
        raise _Unsupported(f"attribute .{args[1]} of a map")
    if fn is torch.stack:
        return _stack_state(_union(states), _bind(fn, args, kwargs), out)
    if fn in _MIXING_FUNCTIONS:
        return WHOLE if _union(states) is not None else None
    if fn in _REDUCING_FUNCTIONS:
        return _reduce_state(_union(states), args, kwargs, out)
    if fn in _PERMUTING_FUNCTIONS:
        return _moved(_union(states), args[0], out, lambda t: fn(t, *args[1:], **kwargs))
    if fn is torch.squeeze:
        return _squeeze_state(_union(states), args, kwargs, out)
    if fn is torch.flatten:
        return _flatten_state(_union(states), args, kwargs, out)
    if fn is F.linear:
        return _last_dims_state(_union(states), args[0] if args else kwargs.get("input"), 1)
    if fn is F.layer_norm:
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        count = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
        return _last_dims_state(_union(states), args[0] if args else kwargs.get("input"), count)
    if fn in _SOFTMAX_FUNCTIONS:
        a = _bind(fn, args, kwargs)
        return _softmax_state(_union(states), a.get("input"), a.get("dim"))
    state = states[0] if states else None
    if fn in (F.conv2d,):
        a = _bind(fn, args, kwargs)
        k = tuple(a["weight"].shape[-2:]) if isinstance(a["weight"], torch.Tensor) else _raise("conv2d weight")
        d = a.get("dilation", 1)
        return _window(state, k, a.get("stride", 1), _conv_padding(a.get("padding", 0), k, d), d)
    if fn in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d):
        a = _bind(fn, args, kwargs)
        return _window(state, a["kernel_size"], a.get("stride") or a["kernel_size"], a.get("padding", 0),
                       a.get("dilation", 1))
    if fn in (F.avg_pool2d,):
        a = _bind(fn, args, kwargs)
        return _window(state, a["kernel_size"], a.get("stride") or a["kernel_size"], a.get("padding", 0))
    if fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        a = _bind(fn, args, kwargs)
        return _adaptive(state, _spatial(a["input"]), a["output_size"])
    if fn is operator.getitem:
        return _getitem_state(args, state, out)
    if fn in _SPLITTING_FUNCTIONS:
        return _split_state(state, args, kwargs)
    if fn is F.pad:
        return _pad_state(state, args, kwargs)
    if state is None and not any(s is not None for s in states):
        return None  # arithmetic on sizes and other non-image values
    raise _Unsupported(f"function {name}")


def _stack_state(state, arguments, out):
    """torch.stack(tensors, dim): a new dimension at ``dim``, which moves the positions of the inputs
    that follow it (stack(..., -1) of maps puts them on dimensions 2 and 3 of a 5-d tensor); every
    position keeps its box, merged over the inputs as a concatenation's."""
    if state is None or state is WHOLE:
        return state
    tensors = [t for t in arguments.get("tensors", ()) if isinstance(t, torch.Tensor)]
    if not tensors or not isinstance(out, torch.Tensor):
        raise _Unsupported("torch.stack of values that are not tensors")
    new = arguments.get("dim", 0) % out.dim()
    return _relaid(state, tuple(a + (a >= new) for a in _axes(state, tensors[0])), out.dim())


def _squeeze_state(state, args, kwargs, out):
    x = args[0]
    if state is None or state is WHOLE or not isinstance(x, torch.Tensor):
        return state
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    ones = {d for d in range(x.dim()) if x.shape[d] == 1}
    return _without_dims(state, x, out, ones if dim is None else _dims(dim, x.dim()) & ones)


def _method_state(method, args, kwargs, states, out):
    self_arg = args[0]
    merged = _union(states)
    if merged is None:
        return None
    if method in _POINTWISE_METHODS:
        return merged
    if method in ("size", "dim", "numel", "shape"):
        return None
    if method in _SPLITTING_METHODS:
        return _split_state(merged, args, kwargs)
    if method not in _LAYOUT_METHODS or not isinstance(self_arg, torch.Tensor):
        raise _Unsupported(f"method .{method}()")
    if merged is WHOLE:
        return WHOLE
    if method in _REDUCING_METHODS:
        return _reduce_state(merged, args, kwargs, out)
    if method in _PERMUTING_METHODS:
        return _moved(merged, self_arg, out, lambda t: getattr(t, method)(*args[1:], **kwargs))
    if method == "squeeze":
        return _squeeze_state(merged, args, kwargs, out)
    if method == "flatten":
        return _flatten_state(merged, args, kwargs, out)
    if method in _SOFTMAX_METHODS:
        return _softmax_state(merged, self_arg, args[1] if len(args) > 1 else kwargs.get("dim"))
    # view, reshape, view_as, reshape_as
    if isinstance(out, torch.Tensor) and out.shape == self_arg.shape:
        return merged  # a reshape to the same shape
    if merged.axes is None and isinstance(out, torch.Tensor):
        if out.dim() >= 3 and _spatial(out) == _spatial(self_arg):
            # the last two sizes kept: in row-major order every element keeps its (y, x) whatever the
            # leading dimensions become (ShuffleNetV2's channel shuffle views [N, C, H, W] as
            # [N, g, C / g, H, W], transposes 1 and 2, and views it back)
            return merged
        if out.shape == self_arg.shape[:-2] + (self_arg.shape[-2] * self_arg.shape[-1],):
            _raise(_TOKENS)  # x.view(B, C, H * W): the positions alone flattened
        if _spatial(out) != _spatial(self_arg) or out.dim() < 3:
            return WHOLE  # positions mixed or flattened together
    raise _Unsupported(f"method .{method}()")


def _index_map(parts, ndim: int) -> dict:
    """Where each dimension of an ``ndim``-d tensor goes under ``tensor[parts]`` (basic indexing and one
    1-d index): its output dimension, None where an integer drops it, "sliced" where it is not whole."""
    consuming = sum(p is not None and p is not Ellipsis for p in parts)
    where, d, o = {}, 0, 0
    for p in parts:
        if p is Ellipsis:
            for _ in range(ndim - consuming):
                where[d], d, o = o, d + 1, o + 1
        elif p is None:
            o += 1
        elif isinstance(p, int):
            where[d], d = None, d + 1
        else:
            where[d], d, o = (o if isinstance(p, slice) and p == slice(None) else "sliced"), d + 1, o + 1
    while d < ndim:
        where[d], d, o = o, d + 1, o + 1
    return where


def _getitem_state(args, state, out):
    container, index = args
    if isinstance(container, (tuple, list)) or state is None or state is WHOLE:
        return state
    if isinstance(container, torch.Tensor) and container.dim() >= 3:
        parts = index if isinstance(index, tuple) else (index,)
        advanced = [p for p in parts if not (p is None or p is Ellipsis or isinstance(p, (int, slice)))]
        if len(advanced) > 1 or any(not (isinstance(p, torch.Tensor) and p.dim() == 1 and not p.is_floating_point())
                                    and not isinstance(p, list) for p in advanced):
            raise _Unsupported("advanced indexing of a map")
        where = _index_map(parts, container.dim())
        moved = tuple(where.get(a) for a in _axes(state, container))
        if any(not isinstance(m, int) for m in moved) or not isinstance(out, torch.Tensor):
            raise _Unsupported("indexing that slices spatial positions")
        return _relaid(state, moved, out.dim())  # a selection of batch items or channels, dims added or dropped
    return state


def _tensor_args(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


class _Tracer(fx.Tracer):
    def __init__(self, leaves=()):
        super().__init__()
        self.leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m, qualname):
        if id(m) in self.leaves or _known_pointwise(m):
            return True
        # a forward set on the instance (a patch, accelerate's hooks) is traced, as a subclass's is
        return "forward" not in m.__dict__ and super().is_leaf_module(m, qualname)


def _known_pointwise(m: nn.Module) -> bool:
    """Whether ``m`` is a module of _POINTWISE_MODULES or _SOFTMAX_MODULES that runs that class's own forward,
    or models.BandLocalResponseNorm (an LRN by another computation). A subclass that overrides forward may
    compute anything (a blur as well as a scaled ReLU), and so may a forward set on the instance: their
    graphs are walked instead."""
    from .models import BandLocalResponseNorm  # (models imports nothing of the walk: no cycle)

    return plain_module(m, _POINTWISE_MODULES + _SOFTMAX_MODULES + (BandLocalResponseNorm,))


def _trace(module: nn.Module, leaves=()) -> fx.GraphModule:
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(module)
        # its Python code too: fx writes a module named with a quote into a string literal it cannot close
        return fx.GraphModule(tracer.root, graph)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise _Unsupported(f"torch.fx cannot trace {type(module).__name__} ({type(exc).__name__}: {exc})") from None


class _Walk(fx.Interpreter):
    """Runs a traced graph on real tensors (for shapes) and carries each value's receptive field."""

    def __init__(self, gm: fx.GraphModule, input_states, target: str | None, edge_pads: list | None = None):
        super().__init__(gm)
        # The walk ends by raising _Reached; with extra_traceback, fx's handler of a raising node imports
        # torch._inductor (and sympy) there, ~1 s the first time, during which a Ctrl-C was lost inside
        # torch and the walk fell back to the probe with sympy half imported.
        self.extra_traceback = False
        self.input_states = list(input_states)
        self.target = target
        self.states: dict[fx.Node, object] = {}
        # the nodes whose values the layer reads, directly or not; None: every node (no layer, or not found)
        layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
        self.read_by_layer = _ancestors(layer_nodes[0]) if target is not None and layer_nodes else None
        # (node, _EdgePad) for every padding by reflection or replication met; node None inside a block
        # walked for the layer (all of it leads to the layer). Shared with the walks of such blocks.
        self.edge_pads = [] if edge_pads is None else edge_pads

    def edge_pads_before(self, node: fx.Node) -> list:
        """The paddings by reflection or replication whose output ``node`` reads, directly or not."""
        ancestors = _ancestors(node)
        return [pad for where, pad in self.edge_pads if where is None or where in ancestors]

    def _note_edge_pad(self, n: fx.Node, target, args, kwargs, state) -> None:
        padding = _edge_padding(target, args, kwargs)
        x = args[0] if args else None
        if padding is None or not isinstance(state, _Box) or state.axes is not None or _spatial(x) is None:
            return
        name = (f"module {n.target!r} ({type(target).__name__})" if n.op == "call_module"
                else f"{_node_name(n)}(mode={padding[0]!r})")
        pad = _EdgePad(name, padding[0], state, _spatial(x), tuple(padding[1]), tuple(padding[2]))
        self.edge_pads.append((self._pad_owner(n), pad))

    def _pad_owner(self, n: fx.Node):
        """The node a padding met at ``n`` is noted under: None inside a block walked for the layer."""
        return n if self.target is not None else None

    def _input_tensors(self, n: fx.Node):
        """(node, tensor) for the inputs of ``n`` that are tensors already computed."""
        return [(a, self.env[a]) for a in n.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)]

    def _states_of(self, n: fx.Node):
        found = []
        for a in n.all_input_nodes:
            found.append(self.states.get(a))
        return found

    def _is_target(self, n: fx.Node) -> bool:
        return n.target == self.target

    def run_node(self, n: fx.Node):
        # tensors this node may change in place (x.add_(y), ReLU(inplace=True)), with their versions
        inputs = [(a, t, t._version) for a, t in self._input_tensors(n)]
        out = super().run_node(n)
        if n.op == "output":
            return self._at_output(n, out)
        state = self._node_state(n, out)
        self.states[n] = state
        self._after_node(n, state, out, self._widened_in_place(n, inputs, state))
        return out

    def _at_output(self, n: fx.Node, out):
        if self.target is not None:  # the whole graph ran and never called the layer
            raise _Unsupported(f"layer {self.target!r} is not called as a module in the traced graph")
        raise _Reached(self._states_of(n)[0] if n.all_input_nodes else None, out)

    def _after_node(self, n: fx.Node, state, out, widened: str | None) -> None:
        if widened is not None:
            raise _Unsupported(widened)
        if self.target is not None and n.op == "call_module" and self._is_target(n):
            raise _Reached(state, out, n)

    def _node_state(self, n: fx.Node, out):
        if n.op == "placeholder":
            return self.input_states.pop(0) if self.input_states else None
        if n.op == "get_attr":
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        states = self._states_of(n)
        target = self.fetch_attr(n.target) if n.op == "call_module" else n.target
        if self.read_by_layer is not None and n not in self.read_by_layer:
            # a value the layer does not read (another branch, a second output): what it pads or mixes
            # neither widens the layer's field, nor warns, nor stops the walk; its field is still carried,
            # where known, for an in-place change of a value the layer reads (_widened_in_place)
            if any(s is _UNKNOWN for s in states):
                return _UNKNOWN
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (uneven adaptive pooling's, of a map the layer never sees)
                    return self._op_state(n, target, args, kwargs, states, out)
            except Exception:  # (an in-place change of a value the layer reads by it stops the walk, as it should)
                return _UNKNOWN
        if _union(states) is not None and _pads_circularly(target, args, kwargs):
            _warn_circular(f"module {n.target!r} ({type(target).__name__})" if n.op == "call_module"
                           else f"{_node_name(n)}(mode='circular')")
        self._note_edge_pad(n, target, args, kwargs, _union(states))
        return self._op_state(n, target, args, kwargs, states, out)

    def _op_state(self, n: fx.Node, target, args, kwargs, states, out):
        """The state after node ``n`` (not a placeholder nor an attribute) from its inputs' ``states``."""
        if n.op == "call_module":
            x = args[0] if args else None
            if self._is_target(n) and _walks_inside(target):
                return self._walk_block(n, target, _union(states), x)
            return _module_state(target, _union(states), x, out)
        if n.op == "call_function":
            return _function_state(n.target, args, kwargs, states, out)
        return _method_state(n.target, args, kwargs, states, out)

    def _walk_block(self, n: fx.Node, module: nn.Module, state, x):
        """The state after the layer ``n`` when it is a block: walked through its own graph."""
        return _module_walk(module, state, x, self.edge_pads)

    def _widened_in_place(self, n: fx.Node, inputs, state) -> str | None:
        """Why the walk cannot go on where ``n`` changed an input in place into a value of another field:
        later readers of the node that made it would see the old field (a pointwise change in place, a
        ReLU's, keeps it); else None."""
        for a, t, version in inputs:
            if t._version == version:
                continue
            if self.read_by_layer is not None and a not in self.read_by_layer and not self._holds_read_memory(t):
                continue  # a value the layer does not read, nor a view of one: its field is not the layer's
            if state is _UNKNOWN or self.states.get(a) != state:
                return f"an in-place change of a value that widens its field ({_node_name(n)})"
        return None

    def _holds_read_memory(self, t: torch.Tensor) -> bool:
        """Whether ``t`` shares memory with a value the layer reads (a view of it: a change of ``t`` in
        place is one of that value)."""
        if not t.numel():
            return False
        memory = t.untyped_storage().data_ptr()
        return any(isinstance(v, torch.Tensor) and v.numel() and v.untyped_storage().data_ptr() == memory
                   for node, v in self.env.items() if node in self.read_by_layer)


def _walks_inside(module: nn.Module) -> bool:
    """A layer that is a block (the user's module, a Sequential): walked through its own graph."""
    user_module = type(module).__module__.split(".")[0] != "torch" and not _known_pointwise(module)
    return user_module or isinstance(module, (nn.Sequential, nn.ModuleList))


def _ancestors(node: fx.Node) -> set:
    """``node`` and every node it reads, directly or not."""
    ancestors, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in ancestors:
                ancestors.add(a)
                todo.append(a)
    return ancestors


def _node_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _module_walk(module: nn.Module, state, x, edge_pads: list | None = None, gm: fx.GraphModule | None = None):
    """The state after a (non-leaf) module, walked through its own graph (``gm``, traced here where not
    given), noting its paddings by reflection or replication in ``edge_pads``."""
    gm = _trace(module) if gm is None else gm
    try:
        with torch.no_grad():
            _Walk(gm, [state], None, edge_pads).run(x)
    except _Reached as reached:
        return reached.state
    raise _Unsupported(f"{type(module).__name__} has no output")


def _to_rf(state, size, out, method, layer: str) -> ReceptiveField:
    map_size = _spatial(out) if isinstance(out, torch.Tensor) and out.dim() == 4 else (1, 1)
    if state is WHOLE or state is None:
        return ReceptiveField(size, (0, 0), (0, 0), size, map_size, True, method)
    if not isinstance(out, torch.Tensor):
        raise _Unsupported("the layer's output is not a tensor")
    if state.axes is not None or out.dim() != 4:
        # The probe would read this output as [N, C, H, W] and answer for the wrong axes (a channels-last
        # [N, H, W, C] map: "whole image", with map size (W, C)); the indexing reads maps the same way.
        axes = _axes(state, out)
        raise ValueError(f"layer {layer!r} outputs a tensor of shape {list(out.shape)} whose positions lie on its "
                         f"dimensions {axes[0]} and {axes[1]}, not on the last two of an [N, C, H, W] map (channels "
                         "last, as inside a ConvNeXt block between permute(0, 2, 3, 1) and the permute back): "
                         "index the layer whose output is [N, C, H, W], after the permute back")
    return ReceptiveField(state.size, state.jump, state.offset, size, map_size, False, method)


def _without_fx_note(exc: Exception) -> str:
    """The error's message without what torch.fx's interpreter appends (the failing node, a log tool)."""
    return str(exc).split("\n\nWhile executing")[0].strip()


@dataclass(frozen=True)
class _Found:
    """What the walk found at a layer: its state, its output on the blank input, and the paddings by
    reflection or replication on the way to it."""

    state: object
    output: object
    pads: list


def _field(found: _Found, size, layer: str, stacklevel: int) -> ReceptiveField:
    """The layer's receptive field from what the walk found there, its edge paddings warned of
    (``stacklevel``: where the warnings point, as seen from this function)."""
    rf = _to_rf(found.state, size, found.output, "analytic", layer)
    _warn_edge_pads(found.pads, rf, stacklevel + 1)
    return rf


def _analytic(model: nn.Module, layer: str, module: nn.Module, size, channels: int,
              stacklevel: int = 2) -> ReceptiveField:
    """The layer's field from a walk of the graph to it; ``stacklevel``: where its warnings point, as
    seen from this function (2: its caller)."""
    # traced in eval mode, as the layer is indexed: `if self.training` branches (auxiliary heads) are
    # those of inference
    with evaluating(model):
        gm = _trace(model, leaves=[module])
    if sum(n.op == "call_module" and n.target == layer for n in gm.graph.nodes) > 1:
        raise SharedModuleError(layer)  # as index_dataset: the outputs of several places are not one layer
    walk = _Walk(gm, [_START], layer)
    try:
        with evaluating(model), torch.no_grad():
            walk.run(_blank_input(model, size, channels))
    except _Reached as reached:
        found = reached
    except (_Unsupported, ValueError) as exc:
        raise type(exc)(_without_fx_note(exc)) from None
    except Exception as exc:
        # the model itself failing on these inputs (the wrong channels, too small an input): the error that
        # names the fix; else the traced graph is at fault
        try:
            _layer_output(model, layer, size, channels)
        except ValueError:
            raise
        except Exception:
            pass
        raise _Unsupported(f"running the traced graph failed ({type(exc).__name__}: {_without_fx_note(exc)})") from None
    else:
        raise _Unsupported("the traced graph has no output")
    return _field(_Found(found.state, found.output, walk.edge_pads_before(found.node)), size, layer, stacklevel + 1)


# ------------------------------------------------------------------------------- one walk, many layers
# receptive_fields(): the layers of one model at one input size from one trace and one walk, each layer's
# field what _analytic finds for it alone. The trace makes every requested layer a leaf (the innermost,
# where one holds another), where _analytic's makes its own layer alone one: a block (a user's module, a
# Sequential) is walked through its own graph, as _analytic walks its layer, and the walk goes on past it
# with the state that graph gives, which is the one the graph inlining it gives where the block reads one
# input and gives one output that depends on it. Where that or anything else may differ from the walk for
# a layer alone (a warning, which each layer must give itself; a node the walk does not know; an error)
# the walk stops, and the layers it did not vouch for are walked one by one.


class _Stop(Exception):
    """The shared walk can vouch for no layer after this node."""


class _SharedWalk(_Walk):
    """A walk through every layer of ``targets`` (call_module names, each called once), noting at each
    what a walk for it alone finds (``found``); ``blocks``: the graphs of the targets walked inside."""

    def __init__(self, gm: fx.GraphModule, targets: set, blocks: dict, caught: list):
        super().__init__(gm, [_START], None)
        self.targets, self.blocks, self.caught = targets, blocks, caught
        # as for one layer: what no target reads neither warns nor stops the walk
        self.read_by_layer = set().union(*(_ancestors(n) for n in gm.graph.nodes if self._is_target(n)))
        self.found: dict[str, _Found] = {}
        self.last = False  # the node just walked is the last the walk vouches for

    def _is_target(self, n: fx.Node) -> bool:
        return n.op == "call_module" and n.target in self.targets

    def _pad_owner(self, n: fx.Node):
        return n  # every layer has its own paddings: those its node reads

    def _at_output(self, n: fx.Node, out):
        return out  # the whole graph walked: every target found

    def _walk_block(self, n: fx.Node, module: nn.Module, state, x):
        inner = []
        state = _module_walk(module, state, x, inner, self.blocks[n.target])
        self.edge_pads += [(n, pad) for _, pad in inner]
        # the layers after are walked alone where the block's graph may differ from the inlined one, and
        # where it pads by reflection inside: which later layers read such a padding, the inlined graph tells
        self.last = bool(inner) or not _inlines_alike(n, self.blocks[n.target])
        return state

    def _after_node(self, n: fx.Node, state, out, widened: str | None) -> None:
        if self.caught:
            raise _Stop  # a warning, which the walk of each layer from here gives in its own place
        if self._is_target(n):
            if widened is None:  # (the output's shape as it is now: the walk goes on, and a later node may
                # change the tensor in place, e.g. transpose_, which a walk stopping at the layer never sees)
                self.found[n.target] = _Found(state, _as_meta(out), self.edge_pads_before(n))
            # a block changing its input in place fails its own layer's walk, not the inlined graph's
            if self.last or (widened is not None and n.target not in self.blocks):
                raise _Stop
        elif widened is not None:
            raise _Stop


def _as_meta(out):
    """A tensor's shape and layout without its values (what a field reads of a layer's output), on the
    meta device; anything else as it is."""
    return torch.empty_like(out, device="meta") if isinstance(out, torch.Tensor) else out


def _inlines_alike(n: fx.Node, block: fx.GraphModule) -> bool:
    """Whether the state after block node ``n``, from the block's own graph walked on its first input
    alone, is the one the graph inlining it gives, with the same nodes read: a call with one input to a
    graph of one placeholder (defaults trace otherwise in a graph of its own) that gives one value read
    from it."""
    placeholders = [p for p in block.graph.nodes if p.op == "placeholder"]
    output = next(o for o in reversed(block.graph.nodes) if o.op == "output")
    result = output.args[0] if output.args else None
    return (len(n.args) == 1 and not n.kwargs and len(placeholders) == 1 and isinstance(result, fx.Node)
            and placeholders[0] in _ancestors(result))


def _innermost(modules: dict) -> dict:
    """The layers of ``modules`` (name -> module) that hold none of the others (those that do are inlined:
    their inner layers are leaves of the shared trace, as they are of their own)."""
    requested = {id(m) for m in modules.values()}
    return {name: m for name, m in modules.items()
            if not any(id(sub) in requested for sub in m.modules() if sub is not m)}


def _shared_trace(model: nn.Module, leaves: dict):
    """(the model's graph with ``leaves`` (name -> module) as leaves, {name: graph} of the leaves walked
    inside, traced as _analytic traces them), or None where a trace fails: that graph may then fail
    or differ for the layers alone."""
    try:
        with evaluating(model):
            gm = _trace(model, leaves=leaves.values())
            with torch.no_grad():
                blocks = {name: _trace(m) for name, m in leaves.items() if _walks_inside(m)}
    except _Unsupported:
        return None
    return gm, blocks


def _analytic_shared(model: nn.Module, modules: dict, size, channels: int, seen: list) -> dict:
    """{name: _Found} for the layers of ``modules`` (name -> module) that one walk of the model's graph
    finds as _analytic finds them alone; the others are left for _analytic (SPEC.md 2). The warnings of
    the trace and walk go to ``seen`` (warnings.WarningMessage), not to the user: the walks of the
    layers left give theirs in their own places; the caller shows those no such walk gives again."""
    leaves = _innermost(modules)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning seen: each stops the sharing (see _SharedWalk)
        traced = _shared_trace(model, leaves)
        if traced is None or caught:
            seen.extend(caught)
            return {}
        gm, blocks = traced
        # a layer called twice (SharedModuleError) or not called as a module is left to _analytic
        calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        walk = _SharedWalk(gm, {name for name in leaves if calls[name] == 1}, blocks, caught)
        try:
            with evaluating(model), torch.no_grad():
                walk.run(_blank_input(model, size, channels))
        except Exception:  # _Stop, or an error that _analytic gives the layers after on their own
            pass
    seen.extend(caught)
    return walk.found
