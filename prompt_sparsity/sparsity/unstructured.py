"""Unstructured weight masks (VPNS.md §3-4): which weights are pruned, scaled score init, exact thresholds,
straight-through gradients and a 1-bit packed format.

All scores of all pruned layers live in one flat tensor; each layer's scores and mask are views into it. The
global threshold therefore runs on one contiguous buffer with no per-step concatenation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PrunedLayer:
    name: str  # module name inside the base model
    shape: tuple[int, ...]
    offset: int  # start of this layer's slice in the flat score/mask tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"


def find_prunable_layers(model: nn.Module, target_modules=None, exclude_modules=None,
                         every_pattern_matches: bool = True) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear modules of `model` (every one by default), filtered by regular expressions on names.
    `every_pattern_matches`: refuse a pattern that matches no module (a typo that would silently prune or keep
    everything)."""
    include, exclude = _compile("target_modules", target_modules), _compile("exclude_modules", exclude_modules)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "weight", None) is not None]
    examples = ", ".join(repr(n) for n, _ in candidates[:2] + candidates[-1:])
    for flag, patterns in (("target_modules", include), ("exclude_modules", exclude)) if every_pattern_matches else ():
        for p in patterns:
            if not any(p.search(name) for name, _ in candidates):
                raise ValueError(
                    f"--{flag} {p.pattern!r} matches no Conv2d/Linear module of {type(model).__name__}. Fix: correct "
                    f"the regular expression (matched with re.search against module names such as {examples})."
                )
    found = [(name, module) for name, module in candidates
             if (not include or any(p.search(name) for p in include)) and not any(p.search(name) for p in exclude)]
    if not found:
        raise ValueError(
            f"no Conv2d/Linear layer of {type(model).__name__} is left to prune: target_modules={target_modules} "
            f"minus exclude_modules={exclude_modules} is empty. Fix: loosen the patterns (regular expressions matched "
            f"against module names such as {examples})."
        )
    return found


def _compile(flag: str, patterns) -> list[re.Pattern]:
    compiled = []
    for p in patterns or []:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"--{flag}: {p!r} is not a valid regular expression ({err}). Fix: escape special "
                             "characters (e.g. '\\.' for a dot) or correct the pattern.") from None
    return compiled


def layout(shapes: dict[str, tuple[int, ...]]) -> list[PrunedLayer]:
    layers, offset = [], 0
    for name, shape in shapes.items():
        layers.append(PrunedLayer(name, tuple(shape), offset))
        offset += math.prod(shape)
    return layers


def fan_in(weight: torch.Tensor) -> int:
    return int(math.prod(weight.shape[1:]))


@torch.no_grad()
def scaled_scores(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's scaled init: s = sqrt(6 / fan_in) * W / max|W| (a layer of zeros gets zero scores)."""
    peak = weight.abs().max()
    scale = math.sqrt(6.0 / fan_in(weight))
    if peak == 0:
        return torch.zeros_like(weight)
    return weight * (scale / peak)


def num_pruned(sparsity: float, n: int) -> int:
    """k = floor(sparsity * n), robust to float error (0.9 * 10 is 9, not 8)."""
    return int(math.floor(sparsity * n + 1e-9))


class StraightThroughMask(torch.autograd.Function):
    """Forward: the hard mask (precomputed). Backward: the gradient w.r.t. the mask goes to |s| unchanged,
    hence to s times sign(s), as in HYDRA."""

    @staticmethod
    def forward(ctx, scores, mask):
        ctx.save_for_backward(scores)
        return mask.view_as(mask)

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        return grad * torch.sign(scores), None


class ThresholdFinder:
    """Exact k-th smallest |score| over one flat tensor, fast when called repeatedly on slowly moving scores.

    A fresh selection (`torch.kthvalue`) costs O(N) with a large constant. Scores move little between optimiser
    steps, so we count the values below a narrow band around the previous threshold and select only inside the
    band (a few streaming passes over preallocated buffers). Falls back to the full selection when the band misses.
    """

    def __init__(self, band: float = 1e-3):
        self.rel_band = band
        self.tau = None
        self.num_at_or_below = None  # count of |scores| <= tau, when the fast path knows it for free
        self._abs = None
        self._below = None
        self._inband = None
        self.stats = {"fast": 0, "full": 0}

    def _buffers(self, scores: torch.Tensor):
        if self._abs is None or self._abs.shape != scores.shape or self._abs.device != scores.device:
            self._abs = torch.empty_like(scores)
            self._below = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
            self._inband = torch.empty_like(self._below)
            self.tau = None
        return self._abs, self._below, self._inband

    @torch.no_grad()
    def kth_smallest_abs(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Return (tau, |scores| buffer) where tau is the k-th smallest |score| (1-based k)."""
        a, below, inband = self._buffers(scores)
        torch.abs(scores, out=a)
        if self.tau is not None:
            for _ in range(3):
                width = max(abs(self.tau) * self.rel_band, 1e-12)
                lo, hi = self.tau - width, self.tau + width
                torch.lt(a, lo, out=below)
                n_below = int(torch.count_nonzero(below))  # ~10x faster than bool.sum() (no int64 upcast)
                if n_below < k:
                    torch.le(a, hi, out=inband)
                    inband.logical_xor_(below)  # below is a subset of (a <= hi): xor leaves lo <= a <= hi
                    band = a[inband]
                    if n_below + band.numel() >= k:
                        tau = torch.kthvalue(band, k - n_below).values
                        self.tau = float(tau)
                        self.num_at_or_below = n_below + int(torch.count_nonzero(band <= tau))
                        self.stats["fast"] += 1
                        # Keep the band small but not so narrow that it misses next time.
                        if band.numel() > 64 * max(1, a.numel() // 10_000):
                            self.rel_band *= 0.5
                        return tau, a
                self.rel_band *= 8
        tau = torch.kthvalue(a, k).values
        self.tau = float(tau)
        self.num_at_or_below = None  # unknown: the caller counts
        self.stats["full"] += 1
        return tau, a


# ------------------------------------------------------------------------------------------ layer-collapse floor
# A global threshold can empty whole layers (at 90% the scaled init empties the classifier of MobileNetV2 and
# EfficientNet, and the label-mapped rows of a 1000-way head keep 0.3% of their weights): the network then
# outputs constants. A floor keeps, in every group, at least `min_keep` weights (the group's largest scores) and
# takes the difference from the rest of the network, so the global count stays exact.
DEFAULT_MIN_LAYER_DENSITY = 0.01
COLLAPSE_WARNING_SPARSITY = 0.99


@dataclass(frozen=True)
class Floor:
    """At least `min_keep` of the `length` weights starting at `start` (flat layout) are kept."""

    start: int
    length: int
    min_keep: int


def density_floors(layers: list[PrunedLayer], min_density: float,
                   protected_rows: dict[str, list[int]] | None = None) -> list[Floor]:
    """One floor per pruned layer (ceil(min_density * numel) weights) and one per protected row (e.g. the rows of
    a pretrained head that the label mapping reads: each keeps ceil(min_density * row length)). Empty when
    `min_density` is 0 (collapse allowed: asked for)."""
    if not min_density:
        return []
    if not 0.0 < min_density <= 1.0:
        raise ValueError(f"min_layer_density={min_density} must be in [0, 1] (0 disables the floor).")
    floors = [Floor(layer.offset, layer.numel, math.ceil(min_density * layer.numel)) for layer in layers]
    by_name = {layer.name: layer for layer in layers}
    for name, rows in (protected_rows or {}).items():
        layer = by_name.get(name)
        if layer is None:
            continue
        row = layer.numel // layer.shape[0]
        floors += [Floor(layer.offset + r * row, row, math.ceil(min_density * row)) for r in rows]
    return floors


@torch.no_grad()
def select_with_floors_(values: torch.Tensor, mask: torch.Tensor, k: int, prune_fn, floors: list[Floor],
                        by_magnitude: bool = False, forced: set | None = None) -> None:
    """`prune_fn(values, mask, k)` writes an exact mask pruning the k smallest (of |values| with `by_magnitude`);
    then every floor group that kept fewer than `min_keep` gets its `min_keep` largest entries forced in (set to
    +inf in a copy of `values`) and the selection is redone, until no group is below its floor. `values`, `mask`
    and the floors share one flat layout starting at 0.

    `forced` (updated in place) carries the groups forced last time: forcing a group that is not short changes
    nothing but the order of exact ties (a global threshold keeps a group's largest entries first), so starting from them is exact and keeps
    one selection per call (and the incremental threshold's band) while the scores move slowly."""
    forced = set() if forced is None else forced
    forced &= set(floors)
    if forced:
        values = values.clone()
        _force_(values, forced, by_magnitude)
    prune_fn(values, mask, k)
    if not floors:
        return
    for _ in range(len(floors) + 1):
        short = [f for f in floors if f not in forced
                 and int(torch.count_nonzero(mask[f.start:f.start + f.length])) < min(f.min_keep, f.length)]
        if not short:
            return
        if not forced:
            values = values.clone()
        _force_(values, short, by_magnitude)
        forced.update(short)
        need, free = int(torch.isinf(values).sum()), values.numel() - k
        if need > free:
            raise ValueError(
                f"the layer-collapse floor needs {need:,} kept weights but sparsity keeps only {free:,}; lower "
                "min_layer_density (0 disables the floor) or the sparsity.")
        prune_fn(values, mask, k)
    raise RuntimeError("layer-collapse floor did not converge")  # unreachable: each pass forces a new group


def _force_(values: torch.Tensor, groups, by_magnitude: bool) -> None:
    """Set each group's `min_keep` largest entries to +inf (always kept by an exact k-smallest selection)."""
    for f in groups:
        sl = slice(f.start, f.start + f.length)
        key = values[sl].abs() if by_magnitude else values[sl]
        top = torch.topk(key, min(f.min_keep, f.length), sorted=False).indices
        values[sl][top] = float("inf")


def collapsed_layers(mask: torch.Tensor, layers: list[PrunedLayer],
                     limit: float = COLLAPSE_WARNING_SPARSITY) -> dict[str, float]:
    """{layer name: sparsity} for every layer of the flat 0/1 `mask` pruned above `limit`."""
    out = {}
    for layer in layers:
        kept = int(torch.count_nonzero(mask[layer.offset:layer.offset + layer.numel]))
        sparsity = 1.0 - kept / layer.numel
        if sparsity > limit:
            out[layer.name] = sparsity
    return out


@torch.no_grad()
def mask_from_scores_(
    scores: torch.Tensor,
    mask: torch.Tensor,
    layers: list[PrunedLayer],
    sparsity: float,
    threshold: str = "global",
    finder: ThresholdFinder | None = None,
    floors: list[Floor] | None = None,
    forced: set | None = None,
    nm_pattern: str | None = None,
) -> torch.Tensor:
    """Write the hard mask (1 = keep) for `scores` into `mask` in place, pruning exactly floor(sparsity * n)
    weights globally (or per layer). Ties at the threshold are broken by position so the count is exact. `floors`
    (see `density_floors`) keep a minimum of weights in each layer / protected row.

    `nm_pattern` (`"N:M"`): instead keep the N largest |scores| of every M consecutive weights along the input
    dimension of each eligible layer (`semi_structured.nm_mask_`); `sparsity`, `threshold` and `floors` do not
    apply."""
    if nm_pattern is not None:
        from .semi_structured import nm_mask_, parse_nm

        nm_mask_(scores.abs(), mask, layers, *parse_nm(nm_pattern))
        return mask
    floors = floors or []
    if threshold == "global":
        finder = finder or ThresholdFinder()
        select_with_floors_(scores, mask, num_pruned(sparsity, scores.numel()),
                            lambda v, m, k: _mask_slice_(v, m, k, finder), floors, by_magnitude=True, forced=forced)
    else:
        for layer in layers:
            sl = slice(layer.offset, layer.offset + layer.numel)
            inside = [Floor(f.start - layer.offset, f.length, f.min_keep) for f in floors
                      if layer.offset <= f.start < layer.offset + layer.numel]
            local = ThresholdFinder()
            select_with_floors_(scores[sl], mask[sl], num_pruned(sparsity, layer.numel),
                                lambda v, m, k: _mask_slice_(v, m, k, local), inside, by_magnitude=True)
    return mask


def _mask_slice_(scores, mask, k, finder):
    if k <= 0:
        mask.fill_(1)
        return
    tau, a = finder.kth_smallest_abs(scores, k)
    torch.gt(a, tau, out=mask)  # written straight into the float mask: no temporary
    n_pruned = finder.num_at_or_below
    if n_pruned is None:
        n_pruned = mask.numel() - int(torch.count_nonzero(mask))
    if n_pruned > k:  # ties at tau: keep the last (n_pruned - k) of them
        tied = torch.nonzero(a == tau).flatten()
        mask[tied[tied.numel() - (n_pruned - k) :]] = 1


# Bit weights of one packed byte, most significant first (numpy.packbits' big-endian order, the saved format).
_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a 0/1 mask: one bit per weight (uint8, big-endian bit order as numpy.packbits), on its device."""
    bits = mask.detach().flatten().ne(0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The first `n` bits of a packed mask as 0/1 values. Torch ops only (no numpy), so `torch.export` and
    `torch.compile` trace it."""
    packed = packed.to(device) if device is not None else packed
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(-1), weights).ne(0)
    return bits.flatten()[:n].to(dtype)


def packed_size(n: int) -> int:
    return (n + 7) // 8
