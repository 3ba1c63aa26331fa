"""Channel importances of the structured baselines (PASS.md §3), per channel unit: **larger = keep**.

Every criterion returns ``list[Tensor]``, one detached float32 ``(C_i,)`` tensor per unit of ``units`` (from
:func:`~prompt_sparsity.sparsity.channels.find_channel_units`), on the model's device:

* ``l1``: L1 norm of the producer's output filters (Li et al., "Pruning Filters for Efficient ConvNets").
* ``bn_scale``: ``|gamma|`` of the unit's first BatchNorm (network slimming).
* ``random``: uniform [0, 1) noise.
* ``taylor``: first-order Taylor, ``|dL/dm_c|`` at the all-ones channel mask ``m`` (= ``|sum a_c * dL/da_c|`` over
  every point the unit's channels are masked), averaged over batches (Molchanov et al. 2017/2019).
* ``depgraph``: DepGraph's group L2-norm importance computed by the real ``torch_pruning`` library (the group of
  the producer's output channels: producer, norms, depthwise convs, consumer inputs, ...).

Turning importances into masks at equal FLOPs: the *uniform* variants take per-unit top-k
(:func:`~prompt_sparsity.sparsity.selection.select_uniform`, raw importances); the *global* variants need scores
comparable across units, so :func:`normalise_per_unit` divides each unit by its mean before
:func:`~prompt_sparsity.sparsity.selection.select_global`. :func:`importance_masks` does either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sparsity.channels import ChannelMasker, ChannelUnit
from ..sparsity.depgraph_units import output_logits
from ..sparsity.selection import select_global, select_uniform

__all__ = [
    "CHANNEL_CRITERIA",
    "NORMALISATIONS",
    "l1_importance",
    "bn_scale_importance",
    "random_importance",
    "taylor_importance",
    "depgraph_importance",
    "normalise_per_unit",
    "channel_importance",
    "importance_masks",
]

CHANNEL_CRITERIA = {"l1", "taylor", "bn_scale", "random", "depgraph"}
NORMALISATIONS = ("mean", "max", "none")


def _producer(model: nn.Module, u: ChannelUnit) -> nn.Module:
    mod = model.get_submodule(u.producer)
    w = getattr(mod, "weight", None)
    if w is None or w.shape[0] != u.num_channels:
        got = None if w is None else w.shape[0]
        raise RuntimeError(
            f"unit {u.name!r} says {u.num_channels} channels but its producer {u.producer} has {got} output "
            "channels: stale units? call find_channel_units(model) again"
        )
    return mod


@torch.no_grad()
def l1_importance(model: nn.Module, units: Sequence[ChannelUnit]) -> list[torch.Tensor]:
    """L1 norm of each output filter of the unit's producer: ``sum |W[c]|``."""
    return [_producer(model, u).weight.detach().float().abs().flatten(1).sum(1) for u in units]


@torch.no_grad()
def bn_scale_importance(model: nn.Module, units: Sequence[ChannelUnit]) -> list[torch.Tensor]:
    """``|gamma|`` of the first BatchNorm over the unit's channels (``unit.norms``)."""
    out = []
    for u in units:
        bn = next((model.get_submodule(n) for n in u.norms if isinstance(model.get_submodule(n), _BatchNorm)), None)
        if bn is None or bn.weight is None:
            why = "no BatchNorm" if bn is None else "a BatchNorm without affine weight"
            raise ValueError(
                f"bn_scale importance: unit {u.name!r} ({u.kind or 'unknown kind'}) has {why} over its channels; "
                "the BN-scale criterion needs one (e.g. ConvNeXt's MLP units have none): use 'l1', 'taylor' or "
                "'depgraph' for this architecture"
            )
        out.append(bn.weight.detach().float().abs().clone())
    return out


def random_importance(units: Sequence[ChannelUnit], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Uniform [0, 1) scores (CPU, or the generator's device); reproducible with a seeded ``generator``."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return [torch.rand(u.num_channels, generator=generator, device=dev) for u in units]


def taylor_importance(model: nn.Module, units: Sequence[ChannelUnit], batches: Iterable,
                      forward_fn: Callable[[object], torch.Tensor]) -> list[torch.Tensor]:
    """First-order Taylor importance: the mean over ``batches`` of ``|dL/dm|`` at all-ones channel masks ``m``.

    A :class:`ChannelMasker` multiplies the unit's activations by ``m`` (requires grad) at every point its channels
    flow; ``forward_fn(batch)`` runs ``model`` and returns the scalar loss. Only the masks' gradients are computed
    (``torch.autograd.grad``): parameters' ``.grad`` and modes are untouched (set the mode you want, usually eval,
    before calling). Do not leave another masker attached on the same units.
    """
    units = list(units)
    ref = next(model.parameters())
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    masks = [torch.ones(u.num_channels, device=ref.device, dtype=dtype, requires_grad=True) for u in units]
    total = [torch.zeros(u.num_channels, device=ref.device, dtype=torch.float32) for u in units]
    n = 0
    masker = ChannelMasker(model, units)
    with torch.enable_grad(), masker:
        masker.set_masks(masks)
        for batch in batches:
            loss = forward_fn(batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("taylor_importance: forward_fn(batch) must return the scalar loss tensor")
            if not loss.requires_grad:
                raise ValueError(
                    "taylor_importance: the loss does not depend on the channel masks; forward_fn must run the "
                    "model whose modules the units name (hooks are attached to it), with autograd enabled"
                )
            grads = torch.autograd.grad(loss.reshape(()), masks, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.detach().float().abs()
            n += 1
    if n == 0:
        raise ValueError("taylor_importance: no batch given (batches is empty)")
    return [t / n for t in total]


def depgraph_importance(model: nn.Module, units: Sequence[ChannelUnit], example_inputs) -> list[torch.Tensor]:
    """DepGraph's group-norm importance, through ``torch_pruning`` (``tp.importance.GroupMagnitudeImportance(p=2)``).

    Builds ``tp.DependencyGraph().build_dependency(model, example_inputs)`` (HF ``ModelOutput`` s are reduced to
    their logits by ``output_transform``), and for each unit scores the pruning group of the producer's output
    channels: the mean over the group's conv/linear/BN layers of the squared L2 norm of each channel's weights,
    divided by its mean over the group (torch-pruning's default ``normalizer="mean"``; so each unit's scores average
    1). Tracing needs autograd: parameters are made to require grad for the trace and restored, as are the
    modules' train/eval modes (torch-pruning switches to eval). The model is not changed.
    """
    import torch_pruning as tp

    units = list(units)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                          output_transform=output_logits, verbose=False)
        scorer = tp.importance.GroupMagnitudeImportance(p=2)
        out = []
        for u in units:
            mod = _producer(model, u)
            if isinstance(mod, nn.modules.conv._ConvNd):
                fn = tp.prune_conv_out_channels
            elif isinstance(mod, nn.Linear):
                fn = tp.prune_linear_out_channels
            else:
                raise TypeError(f"depgraph_importance: unsupported producer {type(mod).__name__} for unit {u.name!r}")
            group = graph.get_pruning_group(mod, fn, idxs=list(range(u.num_channels)))
            imp = scorer(group)
            if imp is None or imp.shape != (u.num_channels,):
                got = None if imp is None else tuple(imp.shape)
                raise RuntimeError(f"depgraph_importance: torch_pruning scored unit {u.name!r} with shape {got}, "
                                   f"expected ({u.num_channels},)")
            out.append(imp.detach().float())
        return out
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def normalise_per_unit(scores: Sequence[torch.Tensor], mode: str = "mean", eps: float = 1e-12) -> list[torch.Tensor]:
    """Make non-negative importances comparable across units for a global threshold.

    ``mode="mean"`` (default): divide each unit by its mean, so a unit's average channel scores 1 and the global
    ranking compares each channel with its own layer's average (torch-pruning's ``normalizer="mean"``; layers with
    large weights or many inputs do not win by scale alone). ``"max"``: divide by the unit's max (its best channel
    scores 1). ``"none"``: unchanged. An all-zero unit stays zero.
    """
    if mode not in NORMALISATIONS:
        raise ValueError(f"normalise_per_unit: unknown mode {mode!r}; use one of {list(NORMALISATIONS)}")
    out = []
    for i, s in enumerate(scores):
        s = s.detach()
        if bool((s < 0).any()):
            raise ValueError(f"normalise_per_unit: unit {i} has negative importances; importances must be >= 0")
        if mode == "none":
            out.append(s.clone())
        else:
            denom = s.mean() if mode == "mean" else s.max()
            out.append(s / (denom + eps))
    return out


def channel_importance(name: str, model: nn.Module, units: Sequence[ChannelUnit], *, batches=None,
                       forward_fn=None, example_inputs=None, generator=None) -> list[torch.Tensor]:
    """Dispatch to a criterion of :data:`CHANNEL_CRITERIA` (``taylor`` needs ``batches`` and ``forward_fn``,
    ``depgraph`` needs ``example_inputs``, ``random`` takes ``generator``)."""
    if name not in CHANNEL_CRITERIA:
        raise ValueError(f"unknown channel criterion {name!r}; choose one of: {', '.join(sorted(CHANNEL_CRITERIA))}")
    if name == "l1":
        return l1_importance(model, units)
    if name == "bn_scale":
        return bn_scale_importance(model, units)
    if name == "random":
        return random_importance(units, generator)
    if name == "taylor":
        if batches is None or forward_fn is None:
            raise ValueError("the 'taylor' criterion needs batches=... and forward_fn=(batch -> scalar loss)")
        return taylor_importance(model, units, batches, forward_fn)
    if example_inputs is None:
        raise ValueError("the 'depgraph' criterion needs example_inputs=... (e.g. a (1, 3, H, W) tensor) to trace")
    return depgraph_importance(model, units, example_inputs)


def importance_masks(scores: Sequence[torch.Tensor], flops_model, target_ratio: float, *, mode: str = "global",
                     min_channels=1, normalisation: str = "mean") -> list[torch.Tensor]:
    """Hard masks at ``target_ratio`` of dense FLOPs from importances: ``global`` ranks
    :func:`normalise_per_unit` (``normalisation``) scores across units, ``uniform`` takes per-unit top-k."""
    if mode == "global":
        return select_global(normalise_per_unit(scores, normalisation), flops_model, target_ratio,
                             min_channels=min_channels)
    if mode == "uniform":
        return select_uniform(list(scores), flops_model, target_ratio, min_channels=min_channels)
    raise ValueError(f"unknown selection mode {mode!r}; use 'global' or 'uniform'")
