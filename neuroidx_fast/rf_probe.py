"""The gradient probe (SPEC.md section 2): the receptive field measured, the oracle of the tests and the
fallback of ``receptive_field`` for graphs the walk does not know."""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _OldSpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _OldWeightNorm

from .hooks import LayerCapture
from .prepare import model_device
from .rf_field import (ReceptiveField, _as_channels, _as_size, _covering_window, _layer_module, _layer_output,
                       _map_index, _spatial)
from .rf_walk import _pair

__all__ = ["probe_gradient", "probe_receptive_field"]

# -------------------------------------------------------------------------------------------- probe
# Clamps, whose upper bound the probe drops (see _ProbeSubstitutions), out of place and in place; the
# clamp_max forms have no lower bound to keep.
_CLAMPS = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip}
_CLAMPS_IN_PLACE = {torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_}
_UPPER_CLAMPS = {torch.clamp_max, torch.Tensor.clamp_max}
_UPPER_CLAMPS_IN_PLACE = {torch.clamp_max_, torch.Tensor.clamp_max_}
_MAX_UNPOOLS = {F.max_unpool1d, F.max_unpool2d, F.max_unpool3d}
# Reductions that pick values (a maximum, a minimum, an order statistic) send the gradient to the chosen
# element alone; the probe makes each of their outputs the mean along the reduced dimension(s): the name
# of the dimension argument, its default (None: every dimension) and its place among the arguments.
_PICKING = {
    **dict.fromkeys((torch.max, torch.Tensor.max, torch.min, torch.Tensor.min, torch.median, torch.Tensor.median,
                     torch.nanmedian, torch.Tensor.nanmedian), ("dim", None, 1)),
    **dict.fromkeys((torch.amax, torch.Tensor.amax, torch.amin, torch.Tensor.amin), ("dim", None, 1)),
    **dict.fromkeys((torch.sort, torch.Tensor.sort, torch.mode, torch.Tensor.mode), ("dim", -1, 1)),
    **dict.fromkeys((torch.topk, torch.Tensor.topk, torch.kthvalue, torch.Tensor.kthvalue), ("dim", -1, 2)),
}
# Element-wise picks between tensors, which send the gradient to one of them: the probe sums them.
_PAIRWISE_PICKING = {torch.maximum, torch.Tensor.maximum, torch.minimum, torch.Tensor.minimum, torch.fmax,
                     torch.Tensor.fmax, torch.fmin, torch.Tensor.fmin}


class _ProbeSubstitutions(torch.overrides.TorchFunctionMode):
    """Inside the probe, the functions whose gradient depends on the values rather than on which pixels a
    unit reads become ones that do not (SPEC.md 2):

    - max pooling becomes average pooling of the same geometry;
    - activations that saturate from above (ReLU6, hardtanh, hardsigmoid, clamp's max) lose their upper
      bound: on the probe's positive input, values grow past it in deep nets (MobileNetV2's ReLU6 after
      residual sums see values above 6), where the gradient is zero and would hide pixels the unit reads;
    - reductions that pick an element (max, min, amax, amin, topk, sort, median, kthvalue, mode) become means
      along the same dimensions, and element-wise picks (torch.maximum, torch.max(a, b), minimum, fmax,
      fmin) sums: the gradient of a pick reaches the element picked alone, and a unit's field would miss
      the pixels that another input (an image where another position holds the maximum) makes it read;
    - max unpooling (SegNet's decoders) is refused: the pooling's indices, which decide where each value
      goes, are data, and the probe's average pooling has none.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d, F._max_pool2d):
            a = inspect.signature(F._max_pool2d).bind(*args, **kwargs).arguments
            if _pair(a.get("dilation", 1)) != (1, 1):
                raise ValueError("the gradient probe cannot model dilated max pooling")
            out = F.avg_pool2d(a["input"], a["kernel_size"], a.get("stride") or a["kernel_size"],
                               a.get("padding", 0), a.get("ceil_mode", False), count_include_pad=True)
            return (out, None) if a.get("return_indices", False) or func is F.max_pool2d_with_indices else out
        if func in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices):
            a = inspect.signature(F.adaptive_max_pool2d_with_indices).bind(*args, **kwargs).arguments
            out = F.adaptive_avg_pool2d(a["input"], a["output_size"])
            return (out, None) if func is not F.adaptive_max_pool2d or a.get("return_indices") else out
        if func in _MAX_UNPOOLS:
            raise ValueError("the gradient probe cannot measure a field through max unpooling (nn.MaxUnpool2d, as in "
                             "SegNet's decoder): where each value goes depends on the pooling's indices, which are "
                             "data, and the field of a unit after it has no fixed size nor stride; choose a layer "
                             "before the unpooling")
        unbounded = _without_upper_bound(func, args, kwargs)
        if unbounded is NotImplemented:
            unbounded = _without_picking(func, args, kwargs)
        return func(*args, **kwargs) if unbounded is NotImplemented else unbounded


def _without_picking(func, args, kwargs):
    """``func(*args, **kwargs)`` where ``func`` picks elements of a floating-point tensor (see _PICKING and
    _PAIRWISE_PICKING), with every value picked replaced by the mean along the reduced dimension(s), or
    by the sum of the tensors picked from; the indices, where it returns some, are the real ones (code that
    gathers with them still runs). Else NotImplemented."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or "out" in kwargs:
        return NotImplemented
    if func in _PAIRWISE_PICKING:
        other = args[1] if len(args) > 1 else kwargs.get("other")
        return x + other
    if func not in _PICKING:
        return NotImplemented
    name, default, place = _PICKING[func]
    dim = args[place] if len(args) > place else kwargs.get(name, default)
    if isinstance(dim, torch.Tensor):  # torch.max(a, b): an element-wise pick
        return x + dim
    if "other" in kwargs:
        return x + kwargs["other"]
    real = func(*args, **kwargs)
    values = real[0] if isinstance(real, tuple) else real
    if x.dim() == 0:
        mean = x.clone()
    elif dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        mean = x.mean().reshape((1,) * x.dim())
    else:
        mean = x.mean(dim=dim, keepdim=True)
    # kept dimensions (keepdim, topk, sort): every element along them the mean; dropped ones: squeezed
    mean = mean.expand(values.shape).contiguous() if values.dim() == x.dim() else mean.reshape(values.shape)
    return type(real)((mean,) + tuple(real[1:])) if isinstance(real, tuple) else mean


def _without_upper_bound(func, args, kwargs):
    """``func(*args, **kwargs)`` without its upper bound where ``func`` is a saturating activation or a
    clamp of a floating-point tensor (its lower bound kept: ReLU6 becomes ReLU), else NotImplemented.
    Integer clamps (indices kept in range) stay as they are."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return NotImplemented
    if func in (F.hardtanh, F.hardtanh_):  # nn.Hardtanh and nn.ReLU6 call F.hardtanh
        a = inspect.signature(F.hardtanh).bind(*args, **kwargs).arguments
        floor = a.get("min_val", -1.0)
        return x.clamp_(min=floor) if func is F.hardtanh_ or a.get("inplace", False) else x.clamp(min=floor)
    if func is F.relu6:
        return F.relu(x, inplace=bool(args[1] if len(args) > 1 else kwargs.get("inplace", False)))
    if func is F.hardsigmoid:  # clamp(x / 6 + 1 / 2, 0, 1)
        if args[1] if len(args) > 1 else kwargs.get("inplace", False):
            return x.div_(6).add_(0.5).clamp_(min=0)
        return (x / 6 + 0.5).clamp(min=0)
    if func in _CLAMPS or func in _CLAMPS_IN_PLACE:
        floor = args[1] if len(args) > 1 else kwargs.get("min")
        if func in _CLAMPS_IN_PLACE:
            return x if floor is None else x.clamp_(min=floor)
        return x.clone() if floor is None else x.clamp(min=floor)
    if func in _UPPER_CLAMPS:
        return x.clone()
    if func in _UPPER_CLAMPS_IN_PLACE:
        return x
    return NotImplemented


def _positive_copy(model: nn.Module) -> nn.Module:
    """The probe's model: positive weights, drawn at random (a fixed seed) in [0.5, 1.5) / fan-in so that
    channels differ (identical ones cancel in a normalisation over channels: LayerNorm, softmax), zero
    biases, running statistics of batch and instance norms 0 and 1."""
    # tensors computed by a forward that kept the graph (old-style weight_norm's weight, after a forward
    # with gradients) refuse deepcopy: copied detached (the hook computes them anew anyway)
    computed = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
                if isinstance(v, torch.Tensor) and not v.is_leaf}
    probe = copy.deepcopy(model, computed).to(torch.float64).eval()
    _fix_computed_weights(probe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in probe.modules():
            weight = getattr(module, "weight", None)
            # (none where the norm takes the input's statistics: BatchNorm(track_running_stats=False))
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
            if isinstance(weight, torch.Tensor):
                fan_in = weight[0].numel() if weight.dim() > 1 else 1
                drawn = torch.rand(weight.shape, generator=generator, dtype=torch.float64) + 0.5
                weight.copy_(drawn / fan_in)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
        for p in probe.parameters():
            p.requires_grad_(False)
    return probe


def _fix_computed_weights(probe: nn.Module) -> None:
    """Weights that each forward recomputes (weight_norm, spectral_norm, parametrizations) made plain
    parameters of their current value: the probe's positive weights, copied into ``module.weight``, would
    otherwise land in a temporary that the next forward rebuilds from the original (negative) ones."""
    for module in list(probe.modules()):
        if parametrize.is_parametrized(module):
            # by hand: remove_parametrizations deletes the property from the module's class, which a deep
            # copy shares with the user's model (whose weights would then be gone)
            with torch.no_grad():
                values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            kinds = {name: any(True for _ in plist.parameters()) for name, plist in module.parametrizations.items()}
            module.__class__ = parametrize.type_before_parametrizations(module)
            del module._modules["parametrizations"]
            for name, value in values.items():
                if kinds[name]:
                    module.register_parameter(name, nn.Parameter(value))
                else:
                    module.register_buffer(name, value)
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, (_OldWeightNorm, _OldSpectralNorm)):  # torch.nn.utils.weight_norm and the like
                hook.remove(module)
                del module._forward_pre_hooks[key]


def _probe_and_inputs(model: nn.Module, count: int, size, channels: int):
    """The probe's model (``_positive_copy``) and ``count`` positive input images [count, channels, *size] of
    ones, float64 on its device, that take gradients."""
    probe = _positive_copy(model)
    images = torch.ones((count, channels) + tuple(size), dtype=torch.float64, device=model_device(probe, None),
                        requires_grad=True)
    return probe, images


def probe_gradient(model: nn.Module, layer: str, input_size, positions, channels: int = 3) -> torch.Tensor:
    """SPEC.md 2's probe: for each (y, x) of ``positions``, the mask [H, W] of input pixels where
    d sum_c r_c F_c(0, y, x) / d input is nonzero, on a copy of the model with positive weights and
    average pooling in place of max pooling, in eval mode, on a positive input: the union of the fields
    of every unit at (y, x) (the layer's field: a concatenation's channels see different boxes, and its
    field is their union). The distinct r_c in [1, 2) keep a layer that normalises over its channels (a
    LayerNorm's outputs sum to 0) from cancelling. A module that runs more than once in a forward raises
    SharedModuleError. Returns [P, H, W] bool."""
    size, channels = _as_size(input_size), _as_channels(channels)
    _layer_module(model, layer)  # an unknown name: the error that lists the model's names
    positions = [(_map_index(y, "y", None), _map_index(x, "x", None)) for y, x in positions]
    if not positions:
        return torch.zeros((0,) + size, dtype=torch.bool)
    # One image per position, all in one batch: in eval mode the images do not interact, so the
    # gradient of the sum of the chosen outputs holds each position's gradient in its own image.
    probe, images = _probe_and_inputs(model, len(positions), size, channels)
    device = images.device
    with _ProbeSubstitutions(), LayerCapture(probe, [layer]) as capture:
        # a module called again later (shared by several places) is a SharedModuleError, as in the walk and the
        # indexing, not its first call measured: one image without gradients runs the whole forward to see it,
        # and the probe's own forward stops at the layer (the layers after it, with gradients, cost 2-4 times)
        with torch.no_grad():
            capture.run_whole(images[:1])
        out = capture.run(images)[layer]
        _check_map_shape(layer, out)
        flat = out.reshape(out.shape[0], out.shape[1], -1)
        coefficients = 1 + torch.arange(flat.shape[1], dtype=flat.dtype, device=flat.device) / flat.shape[1]
        maps = torch.einsum("bcp,c->bp", flat, coefficients).reshape(
            (out.shape[0],) + (tuple(out.shape[2:]) if out.dim() == 4 else (1, 1)))
        for y, x in positions:
            if not (0 <= y < maps.shape[1] and 0 <= x < maps.shape[2]):
                raise ValueError(f"position {(y, x)} is outside the {tuple(maps.shape[1:])} map of {layer!r}")
        ys = torch.tensor([p[0] for p in positions], device=device)
        xs = torch.tensor([p[1] for p in positions], device=device)
        (grad,) = torch.autograd.grad(maps[torch.arange(len(positions), device=device), ys, xs].sum(), images)
    return (grad != 0).any(dim=1).cpu()


def _bounds(mask: torch.Tensor):
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    if ys.numel() == 0:
        return None
    return int(ys[0]), int(xs[0]), int(ys[-1]), int(xs[-1])


def _check_map_shape(layer, out) -> None:
    """As index_dataset: a [B, C] output is a map of one position (SPEC.md 1), and any other shape than
    that and [B, C, H, W] has no [H, W] map whose positions the probe could name."""
    if out.dim() not in (2, 4):
        raise ValueError(f"layer {layer!r} outputs shape {tuple(out.shape)}: the gradient probe measures a layer "
                         "whose output is [B, C, H, W] or [B, C]")


# Functions that copy some elements of their first argument: a crop of a map, not a map (a slice is a view,
# whose base is the map).
_CROPS = {torch.Tensor.__getitem__, torch.index_select, torch.Tensor.index_select, torch.gather, torch.Tensor.gather,
          torch.take_along_dim, torch.Tensor.take_along_dim, torch.masked_select, torch.Tensor.masked_select}


class _LastMap(torch.overrides.TorchFunctionMode):
    """Records the last [B, C, H, W] floating-point map computed from the input (``last``): the whole map where a
    function slices or crops one (``y[:, :, 1:3, 1:3]`` records ``y``), as a unit that reads a crop of a map
    reads no whole map."""

    def __init__(self):
        super().__init__()
        self.last = None
        self._crops = {}  # id of a crop: (the crop, the map it was cut from)

    def _map(self, tensor):
        """The map that ``tensor`` is, or is a view or a crop of."""
        tensor = tensor if tensor._base is None else tensor._base
        crop = self._crops.get(id(tensor))
        return crop[1] if crop is not None and crop[0] is tensor else tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if func in _CROPS and args and isinstance(args[0], torch.Tensor):
            source = self._map(args[0])
            self._crops.update((id(t), (t, source)) for t in outs if isinstance(t, torch.Tensor))
        for tensor in outs:
            if isinstance(tensor, torch.Tensor):
                root = self._map(tensor)
                if root.dim() == 4 and root.is_floating_point() and root.requires_grad:
                    self.last = root
        return out


def _last_map_read(model, layer, size, channels):
    """Bounds of the input pixels that the last [B, C, H, W] map computed before ``layer``'s output reads (the
    whole map, not a crop of it: see _LastMap), on the probe's model and input (as probe_gradient); None where
    there is no such map."""
    probe, image = _probe_and_inputs(model, 1, size, channels)
    with _ProbeSubstitutions(), _LastMap() as recorded, LayerCapture(probe, [layer]) as capture:
        capture.run(image)
        if recorded.last is None:
            return None
        (grad,) = torch.autograd.grad(recorded.last.sum(), image)
    return _bounds((grad[0] != 0).any(dim=0))


def _one_position_field(model, layer, size, channels) -> ReceptiveField:
    """The field of a [B, C] layer, a map of one position (SPEC.md 1), measured at ``size``: the whole image
    after global pooling or a flatten before a linear, but a box where the layer reads fixed positions of a
    map (``conv(x)[:, :, 3, 4]``). Whole where the box spans the image, or where it grows with the input (a
    unit that mixes every position of a map whose pooling leaves the image's last rows unread: AlexNet's
    classifier at 99 px sees rows 0 to 96), or, where no larger input runs, where it reads every pixel that the
    last [B, C, H, W] map before it reads; else the box at this size, which no other input size has."""
    box = _bounds(probe_gradient(model, layer, size, [(0, 0)], channels)[0])
    if box is None:
        raise ValueError(f"the gradient probe found no input pixel that reaches {layer!r}")
    whole = box == (0, 0, size[0] - 1, size[1] - 1)
    if not whole:
        try:
            grown = _bounds(probe_gradient(model, layer, (2 * size[0], 2 * size[1]), [(0, 0)], channels)[0])
        except Exception:
            grown = None  # the model accepts no larger input (a flatten before a linear sized for this one)
        if grown is None:
            # whole where the unit reads every pixel that the last map before it reads (VGG-M's fc6 at 64 px:
            # rows 0 to 62, row 63 read by no conv)
            whole = box == _last_map_read(model, layer, size, channels)
        else:
            whole = any(grown[a + 2] - grown[a] > box[a + 2] - box[a] for a in (0, 1))
    if whole:
        return ReceptiveField(size, (0, 0), (0, 0), size, (1, 1), True, "probe")
    return ReceptiveField((box[2] - box[0] + 1, box[3] - box[1] + 1), (1, 1), (box[0], box[1]), size, (1, 1), False,
                          "probe")


# The side under which the probe goes on enlarging the input past 4 times its size to measure a field clear
# of the border.
_SMALL_INPUT = 256


def probe_receptive_field(model: nn.Module, layer: str, input_size, channels: int = 3) -> ReceptiveField:
    """Size, stride and offset measured by the gradient probe at three positions near the centre of
    the map (the centre and its diagonal neighbours; two more off the diagonal check that each axis of the
    fields follows the same axis of the map, which a transpose breaks: a ValueError), on inputs enlarged, along
    each axis apart and up to a bound on their pixels, until the field of view no longer touches the image
    border. A field that spans the whole input along an axis of a map wider than one position (a unit that
    mixes a whole row or column) is the whole image; fields of unequal
    sizes or spacings (adaptive pooling's uneven windows, branches merged at different strides) take
    boxes that hold the fields measured, with a warning. Fields that move by less than a pixel per map
    position (after an upsampling) have no size and stride: a ValueError says so. A [B, C] layer is a map
    of one position, measured at ``input_size`` (see _one_position_field). A map one position wide along an axis
    whose unit sees the whole input along it sees it whole along it once a larger input shows it again (size the
    input's, offset 0; pooling to (1, None)), and the whole image where both axes are so (global pooling): at a
    small input, a field larger than the image is measured on larger ones."""
    size = _as_size(input_size)
    _layer_module(model, layer)  # an unknown name: the error that lists the model's names
    channels = _as_channels(channels)
    out = _layer_output(model, layer, size, channels)  # a model that cannot run on these inputs: a ValueError
    _check_map_shape(layer, out)
    if out.dim() == 2:
        return _one_position_field(model, layer, size, channels)
    map_size = _spatial(out)
    # the most pixels a probe's input may hold: 4 times the input's, or a small input's sides doubled up to
    # twice _SMALL_INPUT (a thin input grows along its short side alone: (27, 1000) to (216, 1000))
    most = max(4 * size[0] * size[1], (2 * _SMALL_INPUT) ** 2)
    best, previous, scale, grew = None, None, [1, 1], (False, False)
    whole_along = [False, False]  # the axes along which the unit has seen the whole input at two sizes
    while True:
        probe_size = (size[0] * scale[0], size[1] * scale[1])
        try:
            probe_map = out if previous is None else _layer_output(model, layer, probe_size, channels)
        except Exception:
            break  # the model accepts no larger input
        h, w = _spatial(probe_map)
        if previous is not None and any(grew[a] and (h, w)[a] == previous[0][a] > 1 for a in (0, 1)):
            break  # the map did not grow along an axis (adaptive pooling): the larger input has another geometry
        cy, cx = max(0, (h - 1) // 2), max(0, (w - 1) // 2)
        points = sorted({(max(cy - 1, 0), max(cx - 1, 0)), (cy, cx), (min(cy + 1, h - 1), min(cx + 1, w - 1))})
        # off the diagonal too, where a net that swaps its axes (a transpose) shows: on the diagonal, a field
        # that moves along x from one map row to the next looks like one that moves along y
        across = sorted({(cy, min(cx + 1, w - 1)), (min(cy + 1, h - 1), cx)} - set(points))
        # and the corners: the last position's field ends at the last row and column that the layer reads,
        # and a field at a corner that its box does not hold shows a layer that moves positions around
        corners = sorted({(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)} - set(points + across))
        probed = points + across + corners
        found = [_bounds(m) for m in probe_gradient(model, layer, probe_size, probed, channels)]
        if any(b is None for b in found[:len(points) + len(across)]):
            raise ValueError(f"the gradient probe found no input pixel that reaches {layer!r}")
        boxes, across = found[:len(points)], list(zip(across, found[len(points):len(points) + len(across)]))
        # a field that ends where the last one does may be cut there: by the image's border, or by the last
        # rows that the net's pooling leaves unread (VGG-M's conv5 at 160 px: its map row 5 reads rows 28 to
        # 158 of a field 139 rows high); a last unit that reads padding alone (a conv padded by more than
        # its kernel reaches) says nothing of them: the image's border then
        last_box = found[probed.index((h - 1, w - 1))]
        last_read = last_box[2:] if last_box is not None else (probe_size[0] - 1, probe_size[1] - 1)
        # one map position along an axis whose field spans the input there: whole along it where larger inputs
        # show it again, up to _SMALL_INPUT or as far as the probe can go (global pooling; pooling to (1, None));
        # at a small input, it may be a field larger than the input at a large stride (VGG-M's conv5 at 35 px:
        # 139 px wide, stride 16; five 3x3/2 convs at 16 and 32 px: 63 px, stride 32), which a larger map shows
        spanned = tuple((h, w)[a] == 1 and boxes[0][a] == 0 and boxes[0][a + 2] == probe_size[a] - 1
                        for a in (0, 1))
        for a in (0, 1):
            if grew[a]:
                whole_along[a] = spanned[a] and previous[1][a]
        settled = [whole_along[a] and probe_size[a] >= _SMALL_INPUT for a in (0, 1)]
        # a box from border to border on an axis along which the map has several positions, at the
        # largest input tried: the unit mixes a whole row or column
        spans = ((h > 1 and any(b[0] == 0 and b[2] == probe_size[0] - 1 for b in boxes))
                 or (w > 1 and any(b[1] == 0 and b[3] == probe_size[1] - 1 for b in boxes)))
        clear = [[p for p, b in zip(points, boxes) if not (b[a] == 0 or b[a + 2] >= last_read[a])] for a in (0, 1)]
        inside = [(p, b) for p, b in zip(points, boxes) if all(whole_along[a] or p in clear[a] for a in (0, 1))]
        at_corners = [(p, b) for p, b in zip(probed, found) if p in corners and b is not None]
        best = (probe_size, points, boxes, tuple(whole_along), spans, inside, across, at_corners)
        # enlarged, along each axis apart, until every field is clear of the border and of the rows left unread:
        # two clear ones at the input size are not enough, as a third, cut, spaces the fields wrongly (VGG-M's
        # conv3 at 100x140: 12 px, not 16). Past 4 times the input size, only while the input is small and fewer
        # than two fields clear of the border (a 13 px field at 3 px needs 24 px; ResNet18's layer3, 147 px, at
        # 16 px needs 256), and never past ``most`` pixels
        grew = tuple(not settled[a] and len(clear[a]) < len(points)
                     and (scale[a] < 4 or (len(clear[a]) < 2 and probe_size[a] < _SMALL_INPUT)) for a in (0, 1))
        if not any(grew) or math.prod(probe_size) * 2 ** sum(grew) > most:
            break
        previous = ((h, w), spanned)
        scale = [scale[a] * 2 if grew[a] else scale[a] for a in (0, 1)]
    probe_size, points, boxes, whole_along, spans, inside, across, at_corners = best
    if all(whole_along) or (spans and len(inside) < 2):
        return ReceptiveField(size, (0, 0), (0, 0), size, map_size, True, "probe")
    measured = list(zip(points, boxes))  # every field measured, a part of the unit's field where cut
    _check_per_axis(layer, measured + across)
    # the fields the image border does not cut, where there are two; else every field, of which some
    # reach the border at every size tried (their size is a lower bound: warned below)
    if len(inside) >= 2:
        points, boxes = [p for p, _ in inside], [b for _, b in inside]
    sizes = [(b[2] - b[0] + 1, b[3] - b[1] + 1) for b in boxes]
    rf_size = tuple(max(sz[a] for sz in sizes) for a in (0, 1))  # the largest: crops then hold every field
    last = (probe_size[0] - 1, probe_size[1] - 1)
    # each field's start along each axis: where the image's border cuts it (a thin input), from its end
    # and the size; None where the border cuts both
    starts = [tuple(box[a] if box[a] > 0 else box[a + 2] - rf_size[a] + 1 if box[a + 2] < last[a] else None
                    for a in (0, 1)) for box in boxes]
    steps = [tuple((sq[a] - sp[a]) / (q[a] - p[a]) if q[a] != p[a] and None not in (sp[a], sq[a]) else None
                   for a in (0, 1))
             for (p, sp), (q, sq) in zip(zip(points, starts), list(zip(points, starts))[1:])]
    for step in steps:
        for a in (0, 1):
            # fields that move by less than a pixel per map position, or by a fraction of one: units that
            # share input pixels with their neighbours' fields at a finer spacing than the input's
            if step[a] is not None and (step[a] < 1 or step[a] != int(step[a])):
                raise ValueError(
                    f"the gradient probe measured fields of {layer!r} that move by {step[a]:g} input pixels from one "
                    f"map position to the next along {'y' if a == 0 else 'x'} (boxes {boxes} at map positions "
                    f"{points}): a stride below one pixel, or a fraction of one, as after an upsampling "
                    "(nn.Upsample, F.interpolate, ConvTranspose2d, adaptive pooling to a larger map); no size and "
                    "stride describe such fields: choose a layer before the upsampling")
    # per axis, the spacing of the first two points apart along it (a map 2 wide puts the first two
    # points in one column); 1 where the map has one position along the axis
    stride = tuple(next((int(step[a]) for step in steps if step[a] is not None), 1) for a in (0, 1))

    def origin(a):
        """Where position 0's field starts along axis a (from the first field with a known start)."""
        for point, start in zip(points, starts):
            if start[a] is not None:
                return start[a] - point[a] * stride[a]
        return boxes[0][a] - points[0][a] * stride[a]

    offset = (origin(0), origin(1))

    def holds(a, box, point):
        """Whether the box at ``point`` holds the field measured there along axis a (clipped to the image,
        as the measured field is; one that wraps around from border to border, circular padding, is left
        out: no box holds it)."""
        if box[a] == 0 and box[a + 2] == last[a]:
            return True
        start = offset[a] + point[a] * stride[a]
        return max(start, 0) <= box[a] and box[a + 2] <= min(start + rf_size[a] - 1, last[a])

    uneven = len(inside) >= 2 and (len(set(sizes)) > 1 or len(set(steps)) > 1)
    if uneven or not all(holds(a, box, point) for point, box in measured for a in (0, 1)):
        # boxes that hold every field measured (the walk's, for adaptive pooling's uneven windows, hold
        # every window), at a stride between the smallest and largest spacing seen: the fields near the
        # centre alone (10 -> 4 adaptive pooling: rows 2-4 and 5-7) miss the others (rows 0-2)
        cover = []
        for a in (0, 1):
            spacings = {stride[a]} | {(q_box[a] - p_box[a]) // (q[a] - p[a])
                                      for (p, p_box), (q, q_box) in zip(measured, measured[1:])
                                      if q[a] != p[a] and q_box[a] > p_box[a]}
            spans = [(point[a], box[a], box[a + 2] + 1) for point, box in measured
                     if not (box[a] == 0 and box[a + 2] == last[a])] or [(0, offset[a], offset[a] + rf_size[a])]
            cover.append(_covering_window(spans, range(max(1, min(spacings)), max(spacings) + 1)))
        (rf_size, stride, offset) = (tuple(c[i] for c in cover) for i in range(3))
        warnings.warn(f"the gradient probe measured fields of {layer!r} that no single size and stride describe "
                      f"(boxes {[b for _, b in measured]} at map positions {[p for p, _ in measured]}: windows of "
                      f"unequal sizes or spacings, or branches merged at different strides); using size {rf_size}, "
                      f"stride {stride} and offset {offset}, whose boxes hold the fields measured: an approximation, "
                      "near the centre of the map at best", stacklevel=3)
    for point, box in measured + across:
        if not all(holds(a, box, point) for a in (0, 1)):
            raise _not_per_axis(layer, measured + across)
    missed = [(point, box) for point, box in at_corners if not all(holds(a, box, point) for a in (0, 1))]
    if missed and not uneven:  # (the uneven fields' boxes are warned of as an approximation above)
        warnings.warn(f"the gradient probe measured fields of {layer!r} at corners of its map that their boxes do not "
                      f"hold (boxes {[b for _, b in missed]} at map positions {[p for p, _ in missed]}): units near "
                      "its border read pixels outside their boxes, which their crops miss (padding by reflection or "
                      "replication wider than the windows after it, or a layer that moves positions across the map: "
                      "torch.roll, a 1-d conv over its flattened rows)", stacklevel=3)
    if math.prod(rf_size) >= probe_size[0] * probe_size[1]:
        warnings.warn(f"the receptive field of {layer!r} covers every input size the probe tried; its size is a "
                      "lower bound", stacklevel=3)
    # along an axis seen whole, every row (or column) of the input, from the first
    rf_size, stride, offset = (tuple(whole[a] if whole_along[a] else v[a] for a in (0, 1))
                               for whole, v in ((size, rf_size), ((1, 1), stride), ((0, 0), offset)))
    return ReceptiveField(rf_size, stride, offset, size, map_size, False, "probe")


def _check_per_axis(layer, measured) -> None:
    """A receptive field places the rows of a unit's box by its map row alone and the columns by its map
    column alone (SPEC.md 2: a stride and an offset per axis). Fields measured at positions that share a row
    (or a column) must then span the same input rows (or columns), cut by the image's border or not; where
    they do not (a net that transposes its map: the rows of a box follow the map column), no size and stride
    describe them, and boxes on the wrong axes would pass unnoticed."""
    for a in (0, 1):
        extents = {}
        for point, box in measured:
            if extents.setdefault(point[a], (box[a], box[a + 2])) != (box[a], box[a + 2]):
                raise _not_per_axis(layer, measured)


def _not_per_axis(layer, measured) -> ValueError:
    return ValueError(f"the layer's positions do not map to input positions by a stride and an offset per axis (a "
                      f"transpose of its height and width?): the gradient probe measured fields of {layer!r} whose "
                      f"rows do not follow the map's rows alone, or whose columns do not follow its columns alone "
                      f"(boxes {[b for _, b in measured]} at map positions {[p for p, _ in measured]}): no receptive "
                      "field describes it; choose a layer before the transpose, or transpose the map back")
