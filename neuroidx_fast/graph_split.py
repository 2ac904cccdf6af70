"""Cut a model's forward at one layer with torch.fx: a prefix that runs once per batch and a suffix that
runs on masked replicas of the layer's output (the ablation engine, ``neuroidx_fast.ablation``).

The suffix is "the rest of the forward", not a slice of a Sequential: every value computed before the
layer that the rest still needs (a residual branch, the input itself) crosses the cut as an extra
input of the suffix, so that it can be replicated along with the masked layer output. Operations
that do not depend on the layer run once, in the prefix, even when the forward calls them later.

Both parts execute the traced graph: the same module calls and functions, with the same arguments,
in the same order as ``model.forward``, so the prefix and a suffix run on a batch of B images compute
bit for bit what the full forward computes on those B images.

Tracing: first at torch.fx's usual granularity (torch.nn modules are leaves, everything else is
traced), which exposes read-outs and residual blocks; if that fails, again with every module that
does not contain the layer kept opaque (only the forward methods of the layer's parents need to
trace). A model that neither trace can cut raises ``TypeError`` naming the reason.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .hooks import resolve_layers
from .prepare import first_line

__all__ = ["SplitModel", "ReadoutPlan", "split_model", "incoming_weight_l1", "readout_rank_problem"]

# Modules that act on each channel separately (eval mode): read-out chains and weight walks pass them.
PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh,
    nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
)
# Pooling acts on each channel of a batched input only: torch takes an input one dim short as unbatched,
# and a [B, C] input of a 1-D pooling as one [C_in=B, L=C] signal (it pools neighbouring channels).
_POOLING_RANK = {
    nn.MaxPool1d: 3, nn.AvgPool1d: 3, nn.AdaptiveAvgPool1d: 3, nn.AdaptiveMaxPool1d: 3,
    nn.MaxPool2d: 4, nn.AvgPool2d: 4, nn.AdaptiveAvgPool2d: 4, nn.AdaptiveMaxPool2d: 4,
    F.adaptive_avg_pool1d: 3, F.adaptive_avg_pool2d: 4, F.adaptive_max_pool2d: 4,
}
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.mish, torch.sigmoid,
    torch.tanh, F.dropout, torch.nn.functional.dropout2d,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_SHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}
_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device"}
_SCALAR_OPERATORS = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv,
                     operator.mod, operator.pow, operator.neg}


@dataclass
class ReadoutPlan:
    """The suffix is ``linear(pre(cut))`` with ``pre`` acting on each channel separately (activations,
    global average pooling, flatten): ``pre`` maps the layer output to the linear layer's input."""

    pre: fx.GraphModule
    weight: torch.Tensor
    bias: torch.Tensor | None
    description: str


@dataclass
class SplitModel:
    layer: str
    prefix: fx.GraphModule  # (*model inputs) -> (cut, *live)
    suffix: fx.GraphModule  # (cut, *live) -> model output
    live_names: list[str]
    batched: list[bool]  # per live value: computed from the input, so it carries the batch (replicate it)
    readout: ReadoutPlan | None = None
    readout_reason: str = ""
    traced: fx.GraphModule | None = field(default=None, repr=False)  # the full traced graph
    cut_node: fx.Node | None = field(default=None, repr=False)

    def run_prefix(self, x: torch.Tensor):
        out = self.prefix(x)
        cut, live = out[0], list(out[1:])
        if not isinstance(cut, torch.Tensor):
            raise TypeError(f"layer {self.layer!r} returned {type(cut).__name__}, not a tensor: ablate a module "
                            "whose output is a [B, C, H, W] or [B, C] tensor")
        batch = x.shape[0]
        for name, value, is_batched in zip(self.live_names, live, self.batched):
            if is_batched and not (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch):
                raise TypeError(
                    f"the forward after layer {self.layer!r} uses {name!r}, computed before it from the input, which "
                    f"is not a [B, ...] tensor ({type(value).__name__}); the masked replicas cannot carry it. "
                    "Compute it after the layer or from tensors only (e.g. x.flatten(1) instead of a size taken "
                    "earlier)")
        return cut, live

    def run_suffix(self, cut: torch.Tensor, live):
        return self.suffix(cut, *live)


class _Tracer(fx.Tracer):
    """torch.fx tracer with the cut layer kept as one call. ``minimal``: every module that does not
    contain the layer (and is not a Sequential) is opaque too."""

    def __init__(self, layer_module: nn.Module, ancestors: set[str], minimal: bool):
        super().__init__()
        self.layer_module, self.ancestors, self.minimal = layer_module, ancestors, minimal

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m is self.layer_module:
            return True
        if self.minimal:
            return module_qualified_name not in self.ancestors and not isinstance(m, nn.Sequential)
        return super().is_leaf_module(m, module_qualified_name)


def _default_keywords(model: nn.Module) -> dict:
    """The forward's parameters with a default value, as the engine calls it (``model(x)``): traced as
    those constants (``forward(self, x, return_features=False)`` has a branch on the flag)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _trace(model: nn.Module, layer: str, layer_module: nn.Module):
    parts = layer.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}
    errors = []
    concrete = _default_keywords(model)
    for minimal in (False, True):
        tracer = _Tracer(layer_module, ancestors, minimal)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as exc:  # data-dependent control flow, unsupported Python, ...
            errors.append(f"{type(exc).__name__}: {first_line(exc)}")
            continue
        try:
            return fx.GraphModule(tracer.root, graph), graph
        except SyntaxError:  # torch.fx writes getattr(self, "<name>") with the name's quotes unescaped
            odd = sorted({n.target for n in graph.nodes if n.op in ("call_module", "get_attr")
                          and any(c in n.target for c in "\"'\\\n")})
            raise TypeError(f"cannot cut {type(model).__name__} at layer {layer!r}: torch.fx cannot write code for "
                            f"modules whose names hold quotes or backslashes ({odd[:3]}). Rename those modules, or "
                            "count with naive_ablation_counts (one full forward per set)") from None
    chain = " > ".join(["model"] + [".".join(parts[:i]) for i in range(1, len(parts))])
    raise TypeError(
        f"cannot cut {type(model).__name__} at layer {layer!r}: torch.fx could not trace the forward of the modules "
        f"that contain it ({chain}): {errors[-1]}. The ablation engine runs the model up to the layer once and the "
        "rest on masked replicas, which needs a traceable forward there: make the control flow of those forward "
        "methods independent of tensor values, or ablate a layer whose parent modules trace")


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
            and node.args[1] in _METADATA_ATTRS:
        return True
    if node.op == "call_function" and node.target in _SCALAR_OPERATORS:
        inputs = node.all_input_nodes
        return bool(inputs) and all(_is_metadata(n) for n in inputs)
    return False


def _copy_graph(root: nn.Module, nodes, inputs, outputs_fn) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node, name in inputs:
        env[node] = graph.placeholder(name)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(outputs_fn(env))
    graph.lint()
    return fx.GraphModule(root, graph)


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.ipow, operator.iand, operator.ior, operator.ixor}


def _mutates(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its input tensors: ``h.relu_()``, ``F.relu(h, inplace=True)``,
    ``torch.relu_(h)``, ``h[i] = v``, a module with ``inplace=True``."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def _check_no_lost_writes(gm: fx.GraphModule, model: nn.Module, layer: str, nodes, kept: set) -> None:
    """The prefix and suffix hold only what the output needs, so an in-place op whose result is not used
    (a bare ``h.relu_()``) is in neither, though the values after it were computed from what it wrote:
    the parts would compute something else than ``model.forward``, on some images only. Refused."""
    for node in nodes:
        if node in kept or node.op in ("placeholder", "output") or not _mutates(gm, node):
            continue
        if any(arg in kept for arg in node.all_input_nodes):
            raise ValueError(
                f"cannot cut {type(model).__name__} at layer {layer!r}: its forward writes in place into a tensor "
                f"and never uses the result ({_label(node)}), which torch.fx's graph does not carry to the ops that "
                "read the tensor later. Assign in-place results (h = h.relu(), h = F.relu(h)), or count with "
                "naive_ablation_counts")


def logits_element(value):
    """The part of the forward's return value that holds the logits, as the ablation engine reads it (the
    first element of a tuple / list, a dict's 'logits'): the suffix computes only that, so that other
    entries (an auxiliary scalar computed from the input, features) need not cross the cut."""
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    if isinstance(value, dict) and "logits" in value:
        return value["logits"]
    return value


def split_model(model: nn.Module, layer: str) -> SplitModel:
    """Trace ``model`` and cut it right after the (single) call of module ``layer``."""
    layer_module = resolve_layers(model, layer)[layer]
    gm, graph = _trace(model, layer, layer_module)
    nodes = list(graph.nodes)
    cuts = [n for n in nodes if n.op == "call_module" and gm.get_submodule(n.target) is layer_module]
    if not cuts:
        raise ValueError(f"layer {layer!r} is never called by {type(model).__name__}.forward: nothing to ablate")
    if len(cuts) > 1:
        raise ValueError(f"layer {layer!r} is called {len(cuts)} times in {type(model).__name__}.forward (a shared "
                         "module): ablating it would change every call; ablate a module called once (e.g. the "
                         "conv or norm before it)")
    cut = cuts[0]
    output = next(n for n in nodes if n.op == "output")
    result = logits_element(output.args[0])
    result_nodes: list[fx.Node] = []
    fx.node.map_arg(result, result_nodes.append)

    after_cut, from_input = set(), set()
    for n in nodes:
        if n is cut or any(a in after_cut for a in n.all_input_nodes):
            after_cut.add(n)
        if n.op == "placeholder" or any(a in from_input for a in n.all_input_nodes):
            from_input.add(n)
    if not any(a in after_cut for a in result_nodes):
        raise ValueError(f"layer {layer!r} does not affect the output of {type(model).__name__}: ablating it "
                         "changes nothing")

    # The suffix: what the output needs that depends on the cut, with shape queries and parameters
    # pulled along; everything else it needs crosses the cut as a live value.
    suffix_set, live_set = set(), set()
    stack = list(result_nodes)
    while stack:
        n = stack.pop()
        if n is cut or n in suffix_set or n in live_set:
            continue
        if n in after_cut or n.op == "get_attr" or _is_metadata(n):
            suffix_set.add(n)
            stack.extend(n.all_input_nodes)
        else:
            live_set.add(n)
    prefix_set = set()
    stack = [cut] + list(live_set)
    while stack:
        n = stack.pop()
        if n in prefix_set:
            continue
        prefix_set.add(n)
        stack.extend(n.all_input_nodes)
    if prefix_set & after_cut - {cut}:
        raise AssertionError("graph split: a prefix node depends on the cut")  # cannot happen in a DAG

    _check_no_lost_writes(gm, model, layer, nodes, prefix_set | suffix_set)
    live = [n for n in nodes if n in live_set]
    prefix_nodes = [n for n in nodes if n in prefix_set]
    suffix_nodes = [n for n in nodes if n in suffix_set]
    prefix = _copy_graph(gm, prefix_nodes, [], lambda env: tuple(env[n] for n in [cut] + live))
    suffix = _copy_graph(gm, suffix_nodes, [(cut, "cut")] + [(n, f"live_{n.name}") for n in live],
                         lambda env: fx.node.map_arg(result, lambda n: env[n]))
    split = SplitModel(layer, prefix, suffix, [n.name for n in live], [n in from_input for n in live],
                       traced=gm, cut_node=cut)
    split.readout, split.readout_reason = _find_readout(gm, suffix, bool(live))
    return split


# ---------------------------------------------------------------------------------------------- read-out

def _all_ones(size) -> bool:
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


def _spatial_dims(dims) -> bool:
    """Reduction dims of a [B, C, ...] tensor that leave batch and channel alone (non-negative: >= 2;
    negative: counted from the end, and the rank is not known here: -1 is a position axis of any map
    that a working read-out reduces, -2 only together with -1 (H and W of [B, C, H, W]; alone, -2 is C
    of a [B, C, L] map)."""
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    if -2 in dims and -1 not in dims:
        return False
    return bool(dims) and all(isinstance(d, int) and (d >= 2 or d in (-1, -2)) for d in dims)


def plain_module(m: nn.Module, classes) -> bool:
    """Whether ``m`` is one of ``classes`` with that class's own forward (a subclass may compute anything,
    and so may a forward set on the instance: accelerate's hooks, a user's patch)."""
    classes = classes if isinstance(classes, tuple) else (classes,)
    return "forward" not in m.__dict__ and any(isinstance(m, c) and type(m).forward is c.forward for c in classes)


def runs_forward_hooks(m: nn.Module) -> bool:
    """Whether a call of ``m`` runs forward hooks (its own or global ones): code the read-out's arithmetic
    does not run."""
    from torch.nn.modules import module as torch_module

    return bool(m._forward_hooks or m._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _per_channel_step(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """A short name if ``node`` maps a [B, C, ...] tensor (its first argument) channel by channel, else None
    (pooling: given an input of the rank it takes as batched, which ``readout_rank_problem`` checks)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if plain_module(m, PER_CHANNEL_MODULES):
            return type(m).__name__
        if plain_module(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool1d)) \
                and _all_ones(m.output_size):
            return type(m).__name__
        if plain_module(m, nn.Flatten) and m.start_dim == 1:
            return "Flatten"
        return None
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return node.target.__name__
        if node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return node.target.__name__ if _all_ones(size) else None
        if node.target is torch.mean:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return "mean" if _spatial_dims(dims) else None
        if node.target in _SHAPE_FUNCTIONS:
            return node.target.__name__
        return None
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS or node.target in _SHAPE_METHODS:
            return node.target
        if node.target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return "mean" if _spatial_dims(dims) else None
    return None


def _label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op.replace('_', ' ')} {target!r}"


def _get_attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _find_readout(gm: fx.GraphModule, suffix: fx.GraphModule, has_live: bool):
    """(ReadoutPlan, "") when the suffix is linear(per-channel ops(cut)), else (None, why not)."""
    if has_live:
        return None, "the forward after the layer also uses values computed before it (e.g. a residual branch)"
    graph = suffix.graph
    output = next(n for n in graph.nodes if n.op == "output")
    head = output.args[0]
    if not isinstance(head, fx.Node):
        return None, "the model returns a structure, not one logits tensor"
    weight = bias = None
    if head.op == "call_module" and isinstance(suffix.get_submodule(head.target), nn.Linear):
        linear = suffix.get_submodule(head.target)
        if not plain_module(linear, nn.Linear):
            return None, (f"the read-out {type(linear).__name__} has a forward of its own (a subclass's, or one "
                          "set on the module)")
        weight, bias = linear.weight, linear.bias
        source = head.args[0] if head.args else None
        if len(head.args) != 1 or head.kwargs:
            return None, "the linear read-out is called with extra arguments"
    elif head.op == "call_function" and head.target is F.linear:
        source = head.args[0] if head.args else head.kwargs.get("input")
        w_node = head.args[1] if len(head.args) > 1 else head.kwargs.get("weight")
        b_node = head.args[2] if len(head.args) > 2 else head.kwargs.get("bias")
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            return None, "F.linear's weight is not a parameter"
        weight = _get_attr(suffix, w_node.target)
        if isinstance(b_node, fx.Node) and b_node.op == "get_attr":
            bias = _get_attr(suffix, b_node.target)
        elif b_node is not None:
            return None, "F.linear's bias is not a parameter"
    else:
        return None, "the model's output is not a linear layer fed by the ablated layer"
    chain = []
    node = source
    while isinstance(node, fx.Node) and node.op != "placeholder":
        step = _per_channel_step(suffix, node)
        if step is None:
            return None, f"{_label(node)} between the layer and the linear read-out is not a per-channel op"
        chain.append(node)
        node = node.args[0] if node.args else None
    if not (isinstance(node, fx.Node) and node.op == "placeholder"):
        return None, "the linear read-out's input does not come from the ablated layer"
    hooked = [n for n in chain + [head] if n.op == "call_module" and runs_forward_hooks(suffix.get_submodule(n.target))]
    if hooked:
        return None, f"{_label(hooked[0])} after the layer runs forward hooks"
    compute = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr") and not _is_metadata(n)]
    if set(compute) != set(chain) | {head}:
        return None, "the forward after the layer computes more than a per-channel chain into one linear layer"
    for n in chain + [node]:
        users = [u for u in n.users if not _is_metadata(u)]
        if len(users) != 1:
            return None, "a value between the layer and the read-out is used twice"
    keep = [n for n in graph.nodes if n.op != "output" and n is not head and n.op != "placeholder"
            and (n in chain or n.op == "get_attr" or _is_metadata(n))]
    placeholder = node
    pre = _copy_graph(suffix, keep, [(placeholder, "cut")], lambda env: env[source] if source is not placeholder
                      else env[placeholder])
    description = " -> ".join([_per_channel_step(suffix, n) for n in reversed(chain)] + ["Linear"])
    return ReadoutPlan(pre, weight.detach(), None if bias is None else bias.detach(), description), ""


class _RankCheck(fx.Interpreter):
    """Runs a read-out chain, recording the first step that is not per channel at the ranks it gets."""

    problem = ""

    def run_node(self, n: fx.Node):
        if not self.problem and n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            value = args[0] if args else None
            if isinstance(value, torch.Tensor):
                op = self.module.get_submodule(n.target) if n.op == "call_module" else n.target
                rank = next((r for kind, r in _POOLING_RANK.items()
                             if (isinstance(op, kind) if isinstance(kind, type) else op is kind)), None)
                if rank is not None and value.dim() != rank:
                    self.problem = (f"{_label(n)} gets a {value.dim()}-D input, which torch pools as one unbatched "
                                    f"signal across channels (it pools each channel of a {rank}-D input)")
                if (n.op, n.target) in (("call_function", torch.mean), ("call_method", "mean")):
                    dims = args[1] if len(args) > 1 else kwargs.get("dim")
                    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
                    if not all(isinstance(d, int) and d % value.dim() >= 2 for d in dims):
                        self.problem = f"{_label(n)} averages over the batch or the channels of a {value.dim()}-D input"
        return super().run_node(n)


def readout_rank_problem(plan: ReadoutPlan, cut: torch.Tensor) -> str:
    """Why ``plan``'s chain is not per channel on layer outputs shaped as ``cut`` (a 1-D pooling on [B, C]
    pools across channels, a mean over dim -1 of [B, C] averages the channels); "" where it is."""
    check = _RankCheck(plan.pre)
    with torch.no_grad():
        check.run(cut.clone())
    return check.problem


# ---------------------------------------------------------------------------------------------- weights

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _weight_l1(module: nn.Module, channels: int):
    w = module.weight
    if w.shape[0] != channels:
        return None
    return w.detach().double().abs().reshape(channels, -1).sum(dim=1).cpu()


def _walk_back(gm: fx.GraphModule, node, channels: int, depth: int):
    """L1 of the incoming weights of the conv / linear that produces ``node``'s channels, walking back
    through per-channel ops (and into composite modules); None where that is ambiguous (a sum, a cat)."""
    for _ in range(1000):
        if not isinstance(node, fx.Node) or depth > 8:
            return None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _WEIGHTED):
                return _weight_l1(m, channels)
            if not isinstance(m, PER_CHANNEL_MODULES) and _per_channel_step(gm, node) is None:
                return _module_weight_l1(m, channels, depth + 1)
        elif _per_channel_step(gm, node) is None:
            return None
        node = node.args[0] if node.args else None
    return None


def _module_weight_l1(module: nn.Module, channels: int, depth: int = 0):
    if isinstance(module, _WEIGHTED):
        return _weight_l1(module, channels)
    try:
        gm = fx.symbolic_trace(module)
    except Exception:
        return None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return _walk_back(gm, output.args[0], channels, depth)


def incoming_weight_l1(model: nn.Module, split: SplitModel, channels: int) -> torch.Tensor:
    """[C] float64: per unit of the cut layer, the L1 norm of the incoming weights of the conv / linear
    layer that produces it (walking back through BatchNorm, activations, pooling and composite modules);
    NaN where no single such layer exists (e.g. the output of a residual sum)."""
    module = model.get_submodule(split.layer)
    if split.cut_node is not None and _per_channel_step(split.traced, split.cut_node) is not None:
        found = _walk_back(split.traced, split.cut_node.args[0] if split.cut_node.args else None, channels, 0)
    else:
        found = _module_weight_l1(module, channels)
    return found if found is not None else torch.full((channels,), float("nan"), dtype=torch.float64)
