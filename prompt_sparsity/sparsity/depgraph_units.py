"""Channel units of models without a hand-written rule, from Torch-Pruning's dependency graph.

:func:`find_depgraph_units` traces the model once with ``torch_pruning.DependencyGraph`` (one zero image of
``input_size``), takes, for every conv/linear in forward order not yet covered, the pruning group of its output
channels, and keeps the groups that can be a PASS unit *exactly*: masking the unit's channels during the search
must compute what removing them computes. The masks multiply the **inputs of the group's consumers** (the convs /
linears whose input channels are the unit), which is exact whatever lies between producer and consumer as long
as everything there treats channels separately. So a group is kept only if every member is one of

* a plain conv (``groups == 1``) or linear pruned on its output channels (the producers: the first one in forward
  order names the unit, the others, e.g. a squeeze-excite expand conv whose output gates the unit, are
  ``extra_producers``) or on its input channels (the consumers);
* a depthwise conv (``groups == in == out channels``), a BatchNorm;
* a channel-wise elementwise op (activations, gating products, spatial pooling, padding, dropout, ...; a
  whitelist of autograd node names) or the flatten between a global pooling and a linear head;

every member's indices are the unit's own ``0..C-1`` (no concatenation, split, slice or reshaping that moves
channels), and the group is not

* *residual-coupled*: an addition of two traced tensors carrying the channels (a residual stream, coupled across
  many blocks; left whole as by the hand-written rules, so removing a unit's channel changes no tensor outside
  its block);
* touching the classifier head (the last conv/linear called): its outputs are the logits (label mapping, FLM),
  its inputs are kept whole so a new head or a transfer sees the same feature width;
* using a module called more than once per forward (weight sharing), a grouped (non-depthwise) conv, a
  LayerNorm/GroupNorm (they normalise across channels), an ``nn.Parameter`` outside a module, or any op not above.

Each kept group becomes a :class:`~prompt_sparsity.sparsity.channels.ChannelUnit` with ``kind="depgraph"``, so
masking, compaction, the rebuild from widths, the FLOPs model and the hypernetwork treat it like a rule-based
unit. Discovery runs on the *dense* model only: after a compaction the units are the dense ones with their new
widths (:func:`~prompt_sparsity.sparsity.channels.resize_units`), since a depthwise conv cut to one channel
is a plain 1-to-1 conv to a tracer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DepGraphReport", "analyse_depgraph", "find_depgraph_units", "depgraph_report"]

# Autograd node names (without "Backward<n>") of ops that treat every channel separately; "T" is the weight
# transpose of a linear layer, "Mean" is checked to reduce spatial dims only.
_CHANNELWISE = frozenset((
    "Relu", "Hardtanh", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Silu", "Mish", "Sigmoid", "Tanh", "Hardswish",
    "Hardsigmoid", "Softplus", "Clamp", "Threshold", "Mul", "Div", "Add", "Sub", "Neg", "Pow", "ConstantPadNd",
    "Clone", "NativeDropout", "NativeBatchNorm", "CudnnBatchNorm", "T", "Mean",
))
_CHANNELWISE_PREFIXES = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "Upsample", "ReflectionPad",
                         "ReplicationPad")


def _channelwise(fn: str) -> bool:
    base = re.sub(r"Backward\d*$", "", fn)
    return base in _CHANNELWISE or base.startswith(_CHANNELWISE_PREFIXES)


@dataclass(frozen=True)
class DepGraphReport:
    """What :func:`find_depgraph_units` decided for one pruning group: its root (first producer in forward
    order), its channel count, and ``None`` if it became a unit, else why it was skipped."""

    root: str
    num_channels: int
    skipped: str | None


def _spatial_mean(grad_fn) -> bool:
    """A mean over the spatial dims (2, 3) of a 4-D NCHW map only (global pooling, squeeze-excite)."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dims = getattr(grad_fn, "_saved_dim", None)
    if sizes is None or dims is None or len(sizes) != 4:
        return False
    dims = {(int(d) - 2**64 if int(d) >= 2**63 else int(d)) % 4 for d in dims}  # saved as unsigned ints
    return bool(dims) and dims <= {2, 3}


def output_logits(output):
    """The logits tensor of a model output (a tensor, a ModelOutput, a dict or a tuple): Torch-Pruning's trace
    (`output_transform`) needs one tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    raise TypeError(f"cannot find the logits in a {type(output).__name__} output to trace the dependency graph")


def _example_input(model: nn.Module, input_size, num_channels: int) -> torch.Tensor:
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, num_channels, int(h), int(w), device=device, dtype=dtype)


def _is_layer(m) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def _forward_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """{name: number of calls} of every conv/linear/BatchNorm, in first-call order."""
    from .channels import _is_bn

    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in model.named_modules() if _is_layer(m) or _is_bn(m)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def analyse_depgraph(model: nn.Module, input_size=224, num_channels: int = 3):
    """Trace once; return ``(units, reports)`` (see :func:`find_depgraph_units` and :func:`depgraph_report`)."""
    import torch_pruning as tp

    from .channels import ChannelUnit, _is_bn, _is_depthwise

    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # BatchNorm with batch 1 (and 1x1 maps) fails in train mode; eval is deterministic
        x = _example_input(model, input_size, num_channels)
        calls = _forward_calls(model, x)
        for p, _ in flags:
            p.requires_grad_(True)  # torch-pruning traces through autograd
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, output_transform=output_logits,
                                                       verbose=False)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training

    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(calls)}
    layer_names = [n for n in calls if _is_layer(model.get_submodule(n))]
    head = layer_names[-1] if layer_names else None  # the last conv/linear called: the classifier
    covered: set[str] = set()
    units, reports = [], []
    for root_name in layer_names:
        root = model.get_submodule(root_name)
        if root_name in covered or root not in dg.module2node:
            continue
        if isinstance(root, nn.Conv2d) and root.groups != 1:
            continue  # a depthwise/grouped conv is never a group's first producer (a plain layer feeds it)
        c = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(c)))
        producers, consumers, depthwise, norms = [], [], [], []
        why = None
        for dep, idxs in group:
            node, mod = dep.target, dep.target.module
            out = dg.is_out_channel_pruning_fn(dep.handler)
            name = names.get(mod) if isinstance(mod, nn.Module) else None
            if out and name is not None and _is_layer(mod):
                covered.add(name)
            if why is not None:
                continue
            if sorted(int(i) for i in idxs) != list(range(c)):
                why = f"{node.name} sees the channels at other indices (concatenation, split or reshape)"
            elif isinstance(mod, nn.Parameter):
                why = f"{node.name}: an nn.Parameter outside a module (e.g. layer scale) holds the channels"
            elif _is_layer(mod):
                if calls.get(name, 0) != 1:
                    why = f"{name} is called {calls.get(name, 0)} times per forward (shared weights)"
                elif isinstance(mod, nn.Conv2d) and _is_depthwise(mod):
                    depthwise.append(name)
                elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
                    why = f"{name} is a grouped conv (groups={mod.groups}); whole groups would have to go together"
                else:
                    (producers if out else consumers).append(name)
            elif _is_bn(mod) and name is not None:
                if calls.get(name, 0) != 1:
                    why = f"{name} is called {calls.get(name, 0)} times per forward (shared BatchNorm)"
                norms.append(name)
            elif node.type == tp.ops.OPTYPE.ELEMENTWISE:
                fn = type(node.grad_fn).__name__ if node.grad_fn is not None else ""
                if not _channelwise(fn):
                    why = f"{node.name}: op {fn or '?'} is not known to treat channels separately"
                elif fn.startswith(("Add", "Sub")) and len(node.inputs) >= 2:
                    why = "residual-coupled: an addition merges several tensors carrying these channels"
                elif fn.startswith("Mean") and not _spatial_mean(node.grad_fn):
                    why = f"{node.name}: a mean over other than the spatial dims of an NCHW map may mix channels"
            elif node.type == tp.ops.OPTYPE.RESHAPE:
                pass  # identity indices checked above; only a flatten into linear consumers (checked below)
            else:
                why = f"{node.name}: {node.type.name} layers are not supported in a unit"
        has_reshape = any(dep.target.type == tp.ops.OPTYPE.RESHAPE for dep, _ in group)
        if why is None:  # forward order: the first BatchNorm is the producer's (bn_scale reads it)
            producers, consumers, depthwise, norms = (sorted(set(x), key=order.__getitem__)
                                                      for x in (producers, consumers, depthwise, norms))
            layers = [model.get_submodule(n) for n in consumers]
            if not producers or producers[0] != root_name:
                why = "no plain conv/linear produces these channels first"
            elif not consumers:
                why = "the channels reach the model output without a consumer"
            elif head in producers or head in consumers:
                why = f"touches the classifier head {head}"
            elif len({isinstance(m, nn.Linear) for m in layers}) > 1:
                why = "mixed conv and linear consumers"
            elif has_reshape and not all(isinstance(m, nn.Linear) for m in layers):
                why = "a reshape feeds conv consumers"
        if why is None:
            dim = -1 if isinstance(layers[0], nn.Linear) else 1
            u = ChannelUnit(
                name=root_name, num_channels=c, producer=root_name, consumer=consumers[0], norms=tuple(norms),
                depthwise=tuple(depthwise), mask_points=tuple((n, "input") for n in consumers), channel_dim=dim,
                kind="depgraph", extra_producers=tuple(producers[1:]), extra_consumers=tuple(consumers[1:]),
            )
            try:
                from .channels import _check_unit

                _check_unit(model, u)
            except RuntimeError as err:
                why = f"inconsistent channel counts ({err})"
            else:
                units.append(u)
        reports.append(DepGraphReport(root_name, c, why))
    by_consumer = {n: u.name for u in units for n in (u.consumer, *u.extra_consumers)}
    units = [ChannelUnit(**{**u.to_dict(), "input_unit": by_consumer.get(u.producer)}) for u in units]
    return units, reports


def find_depgraph_units(model: nn.Module, input_size=224, num_channels: int = 3):
    """The PASS-safe channel units of ``model`` from Torch-Pruning's dependency graph (see the module docstring),
    in forward order; ``[]`` if none. ``input_size``: side (or ``(H, W)``) of the zero image traced (use the size
    the model sees, e.g. ``config.output_size``). The model is not changed (modes and flags are restored)."""
    return analyse_depgraph(model, input_size, num_channels)[0]


def depgraph_report(model: nn.Module, input_size=224, num_channels: int = 3) -> list[DepGraphReport]:
    """One :class:`DepGraphReport` per pruning group considered: which became units, and why the others did
    not (for error messages and for checking a new architecture)."""
    return analyse_depgraph(model, input_size, num_channels)[1]
