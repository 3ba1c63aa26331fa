"""FLOPs of (channel-masked) models: an analytic, differentiable count and a measured check.

Convention: **FLOPs = 2 x MACs** of the convolutions (``nn.Conv1d/2d/3d``, grouped and
depthwise included, transposed convs excluded) and ``nn.Linear`` layers for one image of shape
``(1, 3, H, W)``; biases, norms, activations, pooling, elementwise products (squeeze-excite
gates, layer scale) are not counted. This is the convention of
``torch.utils.flop_counter.FlopCounterMode`` (which counts ``2*M*N*K`` per matmul and
``2 * out_spatial * C_out * C_in/groups * k`` per conv), so :func:`measure_flops` agrees with the
analytic count on the supported CNNs. Divide by 2 for MACs (what Torch-Pruning and most papers'
"FLOPs" tables report).

:class:`FlopsModel` records each layer's geometry once (one forward pass with hooks) and then
evaluates the FLOPs for any per-unit keep vectors with a handful of tensor ops: a layer's FLOPs
scale with (kept input channels) x (kept output channels), a depthwise conv's with its kept
channels only. The result is differentiable in the keep vectors (soft-FLOPs penalties).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .channels import ChannelUnit, find_channel_units

__all__ = ["FlopsModel", "count_flops", "measure_flops", "count_parameters"]

KeepArg = Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None]


def _hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = input_size
    return int(h), int(w)


def _example_input(model: nn.Module, input_size, num_channels: int = 3) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, num_channels, *_hw(input_size), device=device, dtype=dtype)


def _run(model: nn.Module, x: torch.Tensor) -> None:
    was_training = model.training
    model.eval()  # BatchNorm with batch 1 and a 1x1 map fails in train mode
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)


def _is_counted(m: nn.Module) -> bool:
    conv = isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
    return conv or isinstance(m, nn.Linear)


def _record_layers(model: nn.Module, input_size, num_channels: int) -> list[dict]:
    """One entry per call of a conv/linear: name, MACs per (in x out) channel pair, channels."""
    layers: list[dict] = []
    handles = []

    def make_hook(name):
        def hook(mod, args, out):
            if isinstance(mod, nn.Linear):
                tokens = out.numel() // out.shape[-1]
                layers.append(dict(name=name, coef=float(tokens), c_in=mod.in_features,
                                   c_out=mod.out_features, groups=1))
            else:
                spatial = out.numel() // out.shape[1]  # batch is 1
                k = 1
                for s in mod.kernel_size:
                    k *= s
                layers.append(dict(name=name, coef=float(spatial * k), c_in=mod.in_channels,
                                   c_out=mod.out_channels, groups=mod.groups))

        return hook

    for name, mod in model.named_modules():
        if _is_counted(mod):
            handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        x = _example_input(model, input_size, num_channels)
        if x.shape[0] != 1:
            raise AssertionError
        _run(model, x)
    finally:
        for h in handles:
            h.remove()
    return layers


class FlopsModel:
    """Analytic FLOPs of ``model`` for any per-unit channel keep vectors, without a forward pass.

    Build once (one forward pass of a ``(1, 3, H, W)`` zero image records each conv/linear's output
    size), then call ``fm(keep)`` every step. ``keep``: one tensor of ``C_i`` values in [0, 1] per
    unit (hard 0/1 or soft; list in unit order or ``{unit.name: tensor}``; ``None`` or a missing
    entry keeps the unit whole). A layer's FLOPs scale with sum(keep of its input unit) x
    sum(keep of its output unit); a depthwise conv's with the sum of its unit's keep.

    Attributes: ``units``, ``dense_flops`` (float: FLOPs with every channel kept),
    ``layer_names`` (one per recorded conv/linear call).
    """

    def __init__(self, model: nn.Module, input_size, units: Sequence[ChannelUnit] | None = None,
                 num_channels: int = 3):
        self.units = list(units) if units is not None else []
        self.input_size = _hw(input_size)
        layers = _record_layers(model, input_size, num_channels)
        if not layers:
            raise ValueError(f"FlopsModel: {type(model).__name__} ran no conv or linear layer")
        U = len(self.units)
        in_role: dict[str, int] = {}
        out_role: dict[str, int] = {}
        dw_role: dict[str, int] = {}

        def put(d, name, i):
            if name in d or name in dw_role:
                raise ValueError(f"FlopsModel: layer {name} belongs to two units in the same role")
            d[name] = i

        for i, u in enumerate(self.units):
            put(out_role, u.producer, i)
            put(in_role, u.consumer, i)
            for n in (*u.se_reduce, *u.extra_consumers):
                put(in_role, n, i)
            for n in (*u.se_expand, *u.extra_producers):
                put(out_role, n, i)
            for n in u.depthwise:
                if n in in_role or n in out_role:
                    raise ValueError(f"FlopsModel: depthwise layer {n} also has another role")
                put(dw_role, n, i)
        seen = {layer["name"] for layer in layers}
        missing = sorted((set(in_role) | set(out_role) | set(dw_role)) - seen)
        if missing:
            raise ValueError(f"FlopsModel: unit layers {missing} did not run in the forward pass")

        coef, in_idx, out_idx = [], [], []
        for layer in layers:
            n, c = layer["name"], 2.0 * layer["coef"]  # FLOPs = 2 x MACs
            if n in dw_role:
                i = dw_role[n]
                if layer["groups"] != layer["c_in"] or layer["c_in"] != self.units[i].num_channels:
                    raise ValueError(f"FlopsModel: {n} is not a depthwise conv over unit {self.units[i].name}")
                in_idx.append(U)
                out_idx.append(i)
            else:
                if n in in_role:
                    if layer["groups"] != 1:
                        raise ValueError(f"FlopsModel: grouped conv {n} cannot consume a unit")
                    in_idx.append(in_role[n])
                else:
                    in_idx.append(U)
                    c *= layer["c_in"] / layer["groups"]
                if n in out_role:
                    out_idx.append(out_role[n])
                else:
                    out_idx.append(U)
                    c *= layer["c_out"]
            coef.append(c)
        self.layer_names = [layer["name"] for layer in layers]
        self._coef = torch.tensor(coef, dtype=torch.float64)
        self._in_idx = torch.tensor(in_idx, dtype=torch.long)
        self._out_idx = torch.tensor(out_idx, dtype=torch.long)
        self._cache: dict = {}
        self.dense_flops = self.flops(None)

    # -- evaluation ------------------------------------------------------------------------------

    def _keep_sums(self, keep: KeepArg | None) -> torch.Tensor:
        """(U + 1,) float64: kept-channel count per unit, then a constant 1."""
        if keep is None:
            keep = [None] * len(self.units)
        elif isinstance(keep, Mapping):
            names = {u.name for u in self.units}
            unknown = sorted(set(keep) - names)
            if unknown:
                raise ValueError(f"FlopsModel: unknown unit names {unknown}")
            keep = [keep.get(u.name) for u in self.units]
        keep = list(keep)
        if len(keep) != len(self.units):
            raise ValueError(f"FlopsModel: got {len(keep)} keep vectors for {len(self.units)} units")
        device = next((k.device for k in keep if isinstance(k, torch.Tensor)), torch.device("cpu"))
        sums = []
        for u, k in zip(self.units, keep):
            if k is None:
                sums.append(torch.tensor(float(u.num_channels), dtype=torch.float64, device=device))
                continue
            if not isinstance(k, torch.Tensor) or k.dim() != 1 or k.numel() != u.num_channels:
                shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
                raise ValueError(
                    f"FlopsModel: the keep vector of unit {u.name!r} must be a 1-D tensor of "
                    f"{u.num_channels} values, got {shape}"
                )
            sums.append(k.to(device=device, dtype=torch.float64).sum())
        sums.append(torch.ones((), dtype=torch.float64, device=device))
        return torch.stack(sums)

    def _buffers(self, device):
        if device not in self._cache:
            self._cache[device] = (self._coef.to(device), self._in_idx.to(device), self._out_idx.to(device))
        return self._cache[device]

    def layer_flops(self, keep: KeepArg | None = None) -> torch.Tensor:
        """FLOPs per recorded layer call (float64, aligned with ``layer_names``), differentiable."""
        s = self._keep_sums(keep)
        coef, in_idx, out_idx = self._buffers(s.device)
        return coef * s[in_idx] * s[out_idx]

    def __call__(self, keep: KeepArg | None = None) -> torch.Tensor:
        """Total FLOPs as a 0-dim tensor, differentiable in ``keep``.

        Computed in float64, returned in the keep vectors' floating dtype (float64 if none).
        """
        total = self.layer_flops(keep).sum()
        dtype = None
        if keep is not None:
            vals = keep.values() if isinstance(keep, Mapping) else keep
            dtype = next((k.dtype for k in vals if isinstance(k, torch.Tensor) and k.is_floating_point()), None)
        return total if dtype is None else total.to(dtype)

    def flops(self, keep: KeepArg | None = None) -> float:
        """Total FLOPs as a Python float (exact float64 evaluation, no graph)."""
        with torch.no_grad():
            if keep is not None:
                vals = keep.values() if isinstance(keep, Mapping) else keep
                keep_d = [k.detach() if isinstance(k, torch.Tensor) else k for k in vals]
                keep = dict(zip(keep.keys(), keep_d)) if isinstance(keep, Mapping) else keep_d
            return float(self.layer_flops(keep).sum())

    def ratio(self, keep: KeepArg | None = None) -> torch.Tensor:
        """FLOPs(keep) / dense FLOPs, differentiable."""
        return self(keep) / self.dense_flops


def count_flops(model: nn.Module, input_size, units: Sequence[ChannelUnit] | None = None,
                keep: KeepArg | None = None) -> float:
    """Analytic FLOPs (2 x MACs of conv/linear) of ``model`` for one ``(1, 3, S, S)`` image.

    With ``keep`` (per-unit keep vectors, see :class:`FlopsModel`) the FLOPs of the masked model;
    ``units`` default to :func:`find_channel_units` when ``keep`` is given. One forward pass per
    call: for a per-step (and differentiable) count build a :class:`FlopsModel` once.
    """
    if keep is not None and units is None:
        units = find_channel_units(model)
    return FlopsModel(model, input_size, units).flops(keep)


def measure_flops(model: nn.Module, input_size, num_channels: int = 3) -> float:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real forward (eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _example_input(model, input_size, num_channels)
    counter = FlopCounterMode(display=False)
    with counter:
        _run(model, x)
    return float(counter.get_total_flops())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
