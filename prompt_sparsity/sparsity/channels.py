"""Channel units, channel masking during search, and physical compaction.

A *channel unit* is a set of channels that must be removed together: the output channels of a
producing conv/linear, everything they flow through (its BatchNorm, depthwise convs, the
squeeze-excite convs of the block) and the input channels of the consuming conv/linear. Only the
*inner* channels of residual blocks are units; residual-stream channels stay whole, so removing
a unit's channel never changes any tensor outside the block.

Discovery is hand-written per block type over ``named_modules()`` (not Torch-Pruning's traced
dependency graph): the supported blocks are few, the matching is exact and cheap (no trace, no
forward pass), it works on ``from_config`` models in train mode and inside wrappers, and it yields
exactly the inner-channel units PASS wants (Torch-Pruning's default groups also couple
residual-stream channels, which we leave alone). Every unit is checked for consistent channel
counts when found. Models without a rule can use Torch-Pruning's traced dependency graph instead
(``find_channel_units(model, discovery="depgraph" | "auto")``, :mod:`.depgraph_units`): its
groups that are exact PASS units become units of ``kind="depgraph"``.

The three operations share the unit description, so they agree by construction:

* :class:`ChannelMasker` multiplies the activations by a per-unit mask at every point the unit's
  channels flow (forward hooks; differentiable; no state-dict change);
* :func:`compact_model` index-selects the kept channels out of every weight the unit touches;
* :func:`shrink_to_widths` rebuilds the compact architecture (first ``k`` channels) on a fresh
  model so that a compact state dict loads strictly.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ChannelUnit",
    "ChannelMasker",
    "find_channel_units",
    "resize_units",
    "compact_model",
    "shrink_to_widths",
    "masks_to_indices",
]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "transformers ResNet (ResNetModel / ResNetForImageClassification), basic and bottleneck layers",
    "transformers MobileNetV2 (MobileNetV2Model / MobileNetV2ForImageClassification)",
    "transformers ConvNeXt v1 (ConvNextModel / ConvNextForImageClassification)",
    "timm EfficientNet / MobileNetV2 / MobileNetV3 family (stem, InvertedResidual and EdgeResidual "
    "blocks, e.g. efficientnet_lite0, efficientnet_b0, mobilenetv2_100, "
    "mobilenetv3_small_050), bare or inside transformers.TimmWrapperForImageClassification",
    "any other CNN through Torch-Pruning's dependency graph (discovery='auto' or 'depgraph'): the groups of "
    "plain conv/linear output channels that only flow through BatchNorms, depthwise convs and channel-wise ops "
    "into other convs/linears (no residual addition, concatenation, LayerNorm/GroupNorm or classifier head); "
    "verified on transformers MobileNetV1, timm ResNet and DenseNet (inner units), and transformers RegNet (its "
    "stem and squeeze-excite units, and plain-conv stages; grouped 3x3 convs are skipped)",
)
DISCOVERY = ("rules", "depgraph", "auto")

_TIMM_ROOTS = ("EfficientNet", "EfficientNetFeatures", "MobileNetV3", "MobileNetV3Features")


@dataclass(frozen=True)
class ChannelUnit:
    """One prunable set of coupled channels (all names are ``model.named_modules()`` names).

    Attributes:
        name: stable id; the producer's module name.
        num_channels: current number of channels C of the unit.
        producer: conv/linear whose *output* channels are the unit (weight dim 0).
        consumer: conv/linear whose *input* channels are the unit (weight dim 1).
        norms: BatchNorms over the unit's channels (the producer's and the depthwise convs').
        depthwise: depthwise convs in the chain (groups == channels; they shrink with the unit).
        se_reduce: squeeze-excite reduce convs (their *input* channels are the unit).
        se_expand: squeeze-excite expand convs (their *output* channels are the unit).
        mask_points: ``(module, "output" | "input")``: where :class:`ChannelMasker` multiplies the
            activations by the mask (a module's output, or its first positional input).
        channel_dim: dimension of the channels in the masked activations (1 for NCHW, -1 for
            channels-last activations such as ConvNeXt's MLP).
        input_unit: name of the unit whose channels are the producer's *input* channels, if any
            (e.g. a bottleneck's conv2 unit has the conv1 unit as input); ``None`` otherwise.
        kind: block type, e.g. ``"resnet_basic"``, ``"inverted_residual"``, ``"convnext_mlp"``, ``"depgraph"``.
        extra_producers: further convs/linears whose *output* channels are the unit (depgraph units, e.g. a
            squeeze-excite expand conv gating it).
        extra_consumers: further convs/linears whose *input* channels are the unit (depgraph units).
    """

    name: str
    num_channels: int
    producer: str
    consumer: str
    norms: tuple[str, ...] = ()
    depthwise: tuple[str, ...] = ()
    se_reduce: tuple[str, ...] = ()
    se_expand: tuple[str, ...] = ()
    mask_points: tuple[tuple[str, str], ...] = ()
    channel_dim: int = 1
    input_unit: str | None = None
    kind: str = ""
    extra_producers: tuple[str, ...] = ()
    extra_consumers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-serialisable description of the unit."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


def _j(prefix: str, *parts: str) -> str:
    return ".".join(p for p in (prefix, *parts) if p)


def _is_plain_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1


def _is_depthwise(m) -> bool:
    # groups == channels (a compacted depthwise conv may be down to one channel, groups=1)
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels


def _is_bn(m) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _se_parts(se, prefix: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(se_reduce, se_expand) names of a timm SqueezeExcite, () for none, None if unsupported."""
    if _is_identity(se):
        return (), ()
    reduce_, expand = getattr(se, "conv_reduce", None), getattr(se, "conv_expand", None)
    if _is_plain_conv(reduce_) and _is_plain_conv(expand):
        return (_j(prefix, "se.conv_reduce"),), (_j(prefix, "se.conv_expand"),)
    return None


def _hf_resnet(name: str, mod: nn.Module) -> list[ChannelUnit]:
    layer = getattr(mod, "layer", None)
    if not (isinstance(layer, nn.Sequential) and len(layer) >= 2
            and all(_is_plain_conv(getattr(c, "convolution", None)) for c in layer)):
        return []
    n = len(layer) - 1  # basic: 1 unit (conv1 out), bottleneck: 2 (conv1 out, conv2 out)
    kind = "resnet_basic" if n == 1 else "resnet_bottleneck"
    units = []
    for i in range(n):
        units.append(
            ChannelUnit(
                name=_j(name, f"layer.{i}.convolution"),
                num_channels=layer[i].convolution.out_channels,
                producer=_j(name, f"layer.{i}.convolution"),
                consumer=_j(name, f"layer.{i + 1}.convolution"),
                norms=(_j(name, f"layer.{i}.normalization"),),
                mask_points=((_j(name, f"layer.{i}"), "output"),),
                kind=kind,
            )
        )
    return units


def _hf_mnv2_chain(name: str, producer: str, dw: str, consumer: str, mod, kind: str) -> ChannelUnit:
    """HF MobileNetV2ConvLayer chain producer -> depthwise conv_3x3 -> consumer (1x1)."""
    prod, dwl = mod.get_submodule(producer), mod.get_submodule(dw)
    norms = tuple(_j(name, p, "normalization") for p, layer in ((producer, prod), (dw, dwl))
                  if layer.normalization is not None)
    return ChannelUnit(
        name=_j(name, producer, "convolution"),
        num_channels=prod.convolution.out_channels,
        producer=_j(name, producer, "convolution"),
        consumer=_j(name, consumer, "convolution"),
        norms=norms,
        depthwise=(_j(name, dw, "convolution"),),
        mask_points=((_j(name, producer), "output"), (_j(name, dw), "output")),
        kind=kind,
    )


def _hf_mnv2_block(name: str, mod: nn.Module) -> list[ChannelUnit]:
    if not _is_depthwise(mod.conv_3x3.convolution):
        return []
    return [_hf_mnv2_chain(name, "expand_1x1", "conv_3x3", "reduce_1x1", mod, "inverted_residual")]


def _hf_mnv2_stem(name: str, mod: nn.Module) -> list[ChannelUnit]:
    if not _is_depthwise(mod.conv_3x3.convolution):
        return []
    if mod.expand_1x1 is None:  # first_conv -> depthwise -> reduce
        return [_hf_mnv2_chain(name, "first_conv", "conv_3x3", "reduce_1x1", mod, "stem")]
    first = ChannelUnit(  # first_conv -> expand_1x1, then expand_1x1 -> depthwise -> reduce
        name=_j(name, "first_conv.convolution"),
        num_channels=mod.first_conv.convolution.out_channels,
        producer=_j(name, "first_conv.convolution"),
        consumer=_j(name, "expand_1x1.convolution"),
        norms=(_j(name, "first_conv.normalization"),) if mod.first_conv.normalization is not None else (),
        mask_points=((_j(name, "first_conv"), "output"),),
        kind="stem",
    )
    return [first, _hf_mnv2_chain(name, "expand_1x1", "conv_3x3", "reduce_1x1", mod, "stem")]


def _hf_convnext(name: str, mod: nn.Module) -> list[ChannelUnit]:
    if not (isinstance(mod.pwconv1, nn.Linear) and isinstance(mod.pwconv2, nn.Linear)):
        return []
    return [
        ChannelUnit(
            name=_j(name, "pwconv1"),
            num_channels=mod.pwconv1.out_features,
            producer=_j(name, "pwconv1"),
            consumer=_j(name, "pwconv2"),
            # the hidden channels only flow pwconv1 -> act -> pwconv2: masking pwconv2's input is
            # exact whatever the activation; layer scale (gamma) acts on pwconv2's output dim.
            mask_points=((_j(name, "pwconv2"), "input"),),
            channel_dim=-1,
            kind="convnext_mlp",
        )
    ]


def _timm_inverted_residual(name: str, mod: nn.Module) -> list[ChannelUnit]:
    if not (_is_plain_conv(mod.conv_pw) and _is_bn(mod.bn1) and _is_depthwise(mod.conv_dw)
            and _is_bn(mod.bn2) and _is_identity(getattr(mod, "aa", None))
            and isinstance(mod.conv_pwl, nn.Conv2d) and mod.conv_pwl.groups == 1):
        return []
    se = _se_parts(mod.se, name)
    if se is None:
        warnings.warn(f"{name}: unsupported squeeze-excite {type(mod.se).__name__}; block skipped")
        return []
    return [
        ChannelUnit(
            name=_j(name, "conv_pw"),
            num_channels=mod.conv_pw.out_channels,
            producer=_j(name, "conv_pw"),
            consumer=_j(name, "conv_pwl"),
            norms=(_j(name, "bn1"), _j(name, "bn2")),
            depthwise=(_j(name, "conv_dw"),),
            se_reduce=se[0],
            se_expand=se[1],
            mask_points=((_j(name, "bn1"), "output"), (_j(name, "bn2"), "output")),
            kind="inverted_residual",
        )
    ]


def _timm_edge_residual(name: str, mod: nn.Module) -> list[ChannelUnit]:
    if not (_is_plain_conv(mod.conv_exp) and _is_bn(mod.bn1) and _is_identity(getattr(mod, "aa", None))
            and isinstance(mod.conv_pwl, nn.Conv2d) and mod.conv_pwl.groups == 1):
        return []
    se = _se_parts(mod.se, name)
    if se is None:
        warnings.warn(f"{name}: unsupported squeeze-excite {type(mod.se).__name__}; block skipped")
        return []
    return [
        ChannelUnit(
            name=_j(name, "conv_exp"),
            num_channels=mod.conv_exp.out_channels,
            producer=_j(name, "conv_exp"),
            consumer=_j(name, "conv_pwl"),
            norms=(_j(name, "bn1"),),
            se_reduce=se[0],
            se_expand=se[1],
            mask_points=((_j(name, "bn1"), "output"),),
            kind="edge_residual",
        )
    ]


def _timm_stem(name: str, mod: nn.Module) -> list[ChannelUnit]:
    """conv_stem -> bn1 -> first block (no skip): the stem's output channels.

    The first block consumes them with its first conv: a DepthwiseSeparable block's depthwise conv
    (+ its bn1 and SE, then conv_pw), an InvertedResidual's conv_pw, an EdgeResidual's conv_exp or
    a ConvBnAct's conv.
    """
    stem, bn, blocks = getattr(mod, "conv_stem", None), getattr(mod, "bn1", None), getattr(mod, "blocks", None)
    if not (_is_plain_conv(stem) and _is_bn(bn) and isinstance(blocks, nn.Sequential) and len(blocks)):
        return []
    first = blocks[0][0] if isinstance(blocks[0], nn.Sequential) and len(blocks[0]) else blocks[0]
    p = _j(name, "blocks.0.0" if first is not blocks[0] else "blocks.0")
    kind = type(first).__name__
    if getattr(first, "has_skip", True) or getattr(first, "conv_s2d", None) is not None:
        return []
    common = dict(name=_j(name, "conv_stem"), num_channels=stem.out_channels,
                  producer=_j(name, "conv_stem"), kind="stem")
    if kind == "DepthwiseSeparableConv":
        if not (_is_depthwise(first.conv_dw) and _is_bn(first.bn1)
                and _is_identity(getattr(first, "aa", None)) and _is_plain_conv(first.conv_pw)):
            return []
        se = _se_parts(first.se, p)
        if se is None:
            return []
        return [ChannelUnit(
            **common,
            consumer=_j(p, "conv_pw"),
            norms=(_j(name, "bn1"), _j(p, "bn1")),
            depthwise=(_j(p, "conv_dw"),),
            se_reduce=se[0],
            se_expand=se[1],
            mask_points=((_j(name, "bn1"), "output"), (_j(p, "bn1"), "output")),
        )]
    first_conv = {"InvertedResidual": "conv_pw", "EdgeResidual": "conv_exp", "ConvBnAct": "conv"}.get(kind)
    if first_conv is None or not _is_plain_conv(getattr(first, first_conv, None)):
        return []
    return [ChannelUnit(**common, consumer=_j(p, first_conv), norms=(_j(name, "bn1"),),
                        mask_points=((_j(name, "bn1"), "output"),))]


_MATCHERS = {
    "ResNetBasicLayer": _hf_resnet,
    "ResNetBottleNeckLayer": _hf_resnet,
    "MobileNetV2InvertedResidual": _hf_mnv2_block,
    "MobileNetV2Stem": _hf_mnv2_stem,
    "ConvNextLayer": _hf_convnext,
    # timm (exact class names: CondConvResidual subclasses InvertedResidual and is not supported)
    "InvertedResidual": _timm_inverted_residual,
    "EdgeResidual": _timm_edge_residual,
    **{root: _timm_stem for root in _TIMM_ROOTS},
}


def _channels(mod: nn.Module, role: str) -> int:
    if role == "out":
        return mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
    if role == "in":
        return mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
    if role == "norm":
        return mod.num_features
    raise AssertionError(role)


def _check_unit(model: nn.Module, u: ChannelUnit) -> None:
    roles = ([(u.producer, "out")] + [(n, "norm") for n in u.norms] + [(n, "out") for n in u.depthwise]
             + [(n, "in") for n in u.se_reduce] + [(n, "out") for n in u.se_expand] + [(u.consumer, "in")]
             + [(n, "out") for n in u.extra_producers] + [(n, "in") for n in u.extra_consumers])
    for mod_name, role in roles:
        c = _channels(model.get_submodule(mod_name), role)
        if c != u.num_channels:
            raise RuntimeError(
                f"unit {u.name!r} says {u.num_channels} channels but {mod_name} has {c}: the units are "
                "stale (found before a compaction?) or belong to another model; call "
                "find_channel_units(model) again"
            )


def find_channel_units(model: nn.Module, discovery: str = "rules", input_size=224) -> list[ChannelUnit]:
    """The prunable channel units of ``model``, in forward order.

    ``discovery``: ``"rules"`` (the hand-written block rules), ``"depgraph"`` (Torch-Pruning's traced dependency
    graph, :func:`~prompt_sparsity.sparsity.depgraph_units.find_depgraph_units`; traces a zero image of
    ``input_size``) or ``"auto"`` (the rules, else the dependency graph). Call it on the *dense* model for
    depgraph units; after a compaction use :func:`resize_units`.
    Raises ``ValueError`` naming the model class and the supported architectures when none is found.
    """
    if discovery not in DISCOVERY:
        raise ValueError(f"find_channel_units: discovery={discovery!r} is not one of {', '.join(DISCOVERY)}")
    units: list[ChannelUnit] = []
    if discovery != "depgraph":
        for name, mod in model.named_modules():
            matcher = _MATCHERS.get(type(mod).__name__)
            if matcher is not None:
                units.extend(matcher(name, mod))
    if not units and discovery != "rules":
        from .depgraph_units import analyse_depgraph

        units, reports = analyse_depgraph(model, input_size)
        if not units:
            reasons = sorted({r.skipped for r in reports}) or ["no conv/linear layer ran in the traced forward"]
            raise ValueError(
                f"find_channel_units: no prunable channel unit found in {type(model).__name__}: no hand-written "
                "rule matches and Torch-Pruning's dependency graph has no group that is an exact unit (reasons: "
                + "; ".join(reasons[:6]) + "). Supported architectures:\n  - " + "\n  - ".join(SUPPORTED_ARCHITECTURES)
            )
        return units
    if not units:
        raise ValueError(
            f"find_channel_units: no prunable channel unit found in {type(model).__name__}. "
            "Supported architectures:\n  - " + "\n  - ".join(SUPPORTED_ARCHITECTURES)
            + "\n(use discovery='auto' to try Torch-Pruning's dependency graph when no rule matches)"
        )
    by_consumer = {u.consumer: u.name for u in units}
    units = [
        ChannelUnit(**{**asdict(u), "input_unit": by_consumer.get(u.producer)}) for u in units
    ]
    for u in units:
        _check_unit(model, u)
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise RuntimeError("internal error: duplicate unit names")
    return units


def resize_units(model: nn.Module, units: Sequence[ChannelUnit], widths: Mapping[str, int]) -> list[ChannelUnit]:
    """The units of ``model`` after a compaction to ``widths`` (``{unit.name: kept}``; missing units whole): the
    same units with their new channel counts, checked against ``model``. Exact for every discovery, whereas a
    traced rediscovery of a compact model may see a depthwise conv cut to one channel as a plain conv."""
    out = [replace(u, num_channels=int(widths.get(u.name, u.num_channels))) for u in units]
    for u in out:
        _check_unit(model, u)
    return out


# --------------------------------------------------------------------------------------------
# masking during search
# --------------------------------------------------------------------------------------------

MaskArg = Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None]


def _normalise_masks(units: Sequence[ChannelUnit], masks: MaskArg | None, what: str) -> list:
    if masks is None:
        return [None] * len(units)
    if isinstance(masks, Mapping):
        known = {u.name for u in units}
        unknown = sorted(set(masks) - known)
        if unknown:
            raise ValueError(f"{what}: unknown unit names {unknown}; known units: {sorted(known)}")
        masks = [masks.get(u.name) for u in units]
    masks = list(masks)
    if len(masks) != len(units):
        raise ValueError(f"{what}: got {len(masks)} masks for {len(units)} units")
    for u, m in zip(units, masks):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.numel() != u.num_channels:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(
                f"{what}: the mask of unit {u.name!r} must be a 1-D tensor of {u.num_channels} "
                f"channels, got {shape}"
            )
    return masks


def _apply_mask(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ChannelMasker: expected a tensor activation, got {type(x).__name__}")
    m = m.to(device=x.device, dtype=x.dtype if x.is_floating_point() else m.dtype)
    if dim == -1 or dim == x.dim() - 1:
        return x * m
    shape = [1] * x.dim()
    shape[dim] = m.numel()
    return x * m.view(shape)


class ChannelMasker:
    """Zeroes masked channels of ``units`` in ``model`` with forward hooks.

    Masks multiply the activations at every point a unit's channels flow (``unit.mask_points``),
    so the masked model computes exactly what :func:`compact_model` would give for a 0/1 mask, and
    gradients reach the mask tensors (straight-through masks from a hypernetwork work as is).
    Hooks read the current masks at call time: call :meth:`set_masks` every step while attached.
    No parameter or buffer is added, so ``state_dict`` keys and ``torch.func.functional_call``
    are unaffected. A unit whose mask is ``None`` is left unmasked.

    Usage::

        masker = ChannelMasker(model, units)
        with masker:                      # or masker.attach() ... masker.detach()
            masker.set_masks(masks)       # list of (C_i,) tensors, or {unit.name: tensor}
            logits = model(x).logits
    """

    def __init__(self, model: nn.Module, units: Sequence[ChannelUnit]):
        self.model = model
        self.units = list(units)
        self._masks: list[torch.Tensor | None] = [None] * len(self.units)
        self._handles: list = []
        for u in self.units:  # fail early on a stale unit list
            for mod_name, where in u.mask_points:
                model.get_submodule(mod_name)
                if where not in ("output", "input"):
                    raise ValueError(f"unit {u.name!r}: bad mask point kind {where!r}")

    @property
    def masks(self) -> list[torch.Tensor | None]:
        return list(self._masks)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def set_masks(self, masks: MaskArg | None) -> None:
        """One 1-D tensor of ``C_i`` values per unit (list in unit order or dict by unit name)."""
        self._masks = _normalise_masks(self.units, masks, "ChannelMasker.set_masks")

    def clear_masks(self) -> None:
        self._masks = [None] * len(self.units)

    def _output_hook(self, i: int, dim: int):
        def hook(module, args, output):
            m = self._masks[i]
            return None if m is None else _apply_mask(output, m, dim)

        return hook

    def _input_hook(self, i: int, dim: int):
        def hook(module, args):
            m = self._masks[i]
            if m is None:
                return None
            return (_apply_mask(args[0], m, dim), *args[1:])

        return hook

    def attach(self) -> "ChannelMasker":
        if self._handles:
            return self
        for i, u in enumerate(self.units):
            for mod_name, where in u.mask_points:
                mod = self.model.get_submodule(mod_name)
                if where == "output":
                    h = mod.register_forward_hook(self._output_hook(i, u.channel_dim))
                else:
                    h = mod.register_forward_pre_hook(self._input_hook(i, u.channel_dim))
                self._handles.append(h)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ChannelMasker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


# --------------------------------------------------------------------------------------------
# physical compaction
# --------------------------------------------------------------------------------------------


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:  # buffer
        setattr(mod, name, value.contiguous())


def _slice(mod: nn.Module, attr: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(mod, attr, None)
    if t is not None:
        _set_param(mod, attr, t.detach().index_select(dim, idx.to(t.device)))


def _shrink_out(mod: nn.Module, idx: torch.Tensor, where: str) -> None:
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise ValueError(f"{where}: cannot shrink the output channels of a grouped conv")
        _slice(mod, "weight", 0, idx)
        _slice(mod, "bias", 0, idx)
        mod.out_channels = len(idx)
    elif isinstance(mod, nn.Linear):
        _slice(mod, "weight", 0, idx)
        _slice(mod, "bias", 0, idx)
        mod.out_features = len(idx)
    else:
        raise TypeError(f"{where}: unsupported producer type {type(mod).__name__}")


def _shrink_in(mod: nn.Module, idx: torch.Tensor, where: str) -> None:
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise ValueError(f"{where}: cannot shrink the input channels of a grouped conv")
        _slice(mod, "weight", 1, idx)
        mod.in_channels = len(idx)
    elif isinstance(mod, nn.Linear):
        _slice(mod, "weight", 1, idx)
        mod.in_features = len(idx)
    else:
        raise TypeError(f"{where}: unsupported consumer type {type(mod).__name__}")


def _shrink_depthwise(mod: nn.Module, idx: torch.Tensor, where: str) -> None:
    if not _is_depthwise(mod):
        raise TypeError(f"{where}: expected a depthwise conv, got {mod}")
    _slice(mod, "weight", 0, idx)
    _slice(mod, "bias", 0, idx)
    mod.in_channels = mod.out_channels = mod.groups = len(idx)


def _shrink_norm(mod: nn.Module, idx: torch.Tensor, where: str) -> None:
    if _is_bn(mod):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _slice(mod, attr, 0, idx)
        mod.num_features = len(idx)
    elif isinstance(mod, nn.GroupNorm) and mod.num_groups == mod.num_channels:  # per-channel norm
        _slice(mod, "weight", 0, idx)
        _slice(mod, "bias", 0, idx)
        mod.num_groups = mod.num_channels = len(idx)
    else:
        raise TypeError(f"{where}: unsupported per-channel norm {type(mod).__name__}")


def _shrink_unit(model: nn.Module, u: ChannelUnit, idx: torch.Tensor) -> None:
    get = model.get_submodule
    _shrink_out(get(u.producer), idx, u.producer)
    for n in u.norms:
        _shrink_norm(get(n), idx, n)
    for n in u.depthwise:
        _shrink_depthwise(get(n), idx, n)
    for n in u.se_reduce:
        _shrink_in(get(n), idx, n)
    for n in u.se_expand:
        _shrink_out(get(n), idx, n)
    for n in u.extra_producers:
        _shrink_out(get(n), idx, n)
    _shrink_in(get(u.consumer), idx, u.consumer)
    for n in u.extra_consumers:
        _shrink_in(get(n), idx, n)


def masks_to_indices(units: Sequence[ChannelUnit], masks: MaskArg, tol: float = 1e-3) -> list[torch.Tensor]:
    """Kept channel indices (sorted int64) per unit of hard 0/1 masks; ``None`` keeps all.

    Values within ``tol`` of 0/1 are accepted (straight-through masks carry float noise); soft
    values raise, as does a mask keeping no channel.
    """
    masks = _normalise_masks(units, masks, "masks_to_indices")
    out = []
    for u, m in zip(units, masks):
        if m is None:
            out.append(torch.arange(u.num_channels))
            continue
        v = m.detach().float().cpu()
        if not bool(((v - v.round()).abs() <= tol).all()) or bool(((v < -tol) | (v > 1 + tol)).any()):
            raise ValueError(
                f"the mask of unit {u.name!r} is not a hard 0/1 mask (values {v.min():.3g}..{v.max():.3g}); "
                "compaction needs hard masks (threshold your scores first)"
            )
        idx = torch.nonzero(v > 0.5).flatten()
        if idx.numel() == 0:
            raise ValueError(
                f"the mask of unit {u.name!r} keeps no channel; keep at least one channel per unit "
                "(e.g. min_channels=1 when thresholding)"
            )
        out.append(idx)
    return out


@torch.no_grad()
def compact_model(model: nn.Module, units: Sequence[ChannelUnit], masks: MaskArg) -> dict[str, int]:
    """Physically remove the channels whose mask is 0, in place; return ``{unit.name: kept}``.

    ``masks``: one hard 0/1 tensor of ``C_i`` values per unit (list or dict by unit name; ``None``
    keeps a unit whole). All masks are validated before anything changes. ``units`` become stale
    (call :func:`find_channel_units` again; names stay the same).
    """
    units = list(units)
    indices = masks_to_indices(units, masks)
    for u in units:
        _check_unit(model, u)  # stale units (from before a previous compaction) fail here
    for u, idx in zip(units, indices):
        if idx.numel() != u.num_channels:
            _shrink_unit(model, u, idx)
    return {u.name: int(idx.numel()) for u, idx in zip(units, indices)}


@torch.no_grad()
def shrink_to_widths(
    model: nn.Module, units: Sequence[ChannelUnit] | None, widths: Mapping[str, int]
) -> nn.Module:
    """Rebuild the compact architecture on a fresh model: keep the first ``widths[name]`` channels.

    Meant for a freshly built (``from_config``) model whose values are then overwritten by loading
    a compact state dict. Units not named in ``widths`` stay whole. ``units=None`` finds them.
    Returns ``model`` (changed in place).
    """
    units = find_channel_units(model) if units is None else list(units)
    by_name = {u.name: u for u in units}
    unknown = sorted(set(widths) - set(by_name))
    if unknown:
        raise ValueError(
            f"shrink_to_widths: unknown unit names {unknown} for {type(model).__name__}; "
            f"known units: {sorted(by_name)}"
        )
    widths = dict(widths)
    for name, k in widths.items():
        c = by_name[name].num_channels
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= c:
            raise ValueError(f"shrink_to_widths: width {k!r} of unit {name!r} must be an int in [1, {c}]")
        widths[name] = int(k)
    for u in units:
        _check_unit(model, u)
    for u in units:
        k = widths.get(u.name, u.num_channels)
        if k != u.num_channels:
            _shrink_unit(model, u, torch.arange(k))
    return model
