"""Unstructured weight masks (VPNS.md §3-4): which weights are pruned, scaled score init, exact thresholds,
straight-through gradients and a 1-bit packed format.

All scores of all pruned layers live in one flat tensor; each layer's scores and mask are views into it. The
global threshold therefore runs on one contiguous buffer with no per-step concatenation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
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


@torch.no_grad()
def mask_from_scores_(
    scores: torch.Tensor,
    mask: torch.Tensor,
    layers: list[PrunedLayer],
    sparsity: float,
    threshold: str = "global",
    finder: ThresholdFinder | None = None,
) -> torch.Tensor:
    """Write the hard mask (1 = keep) for `scores` into `mask` in place, pruning exactly floor(sparsity * n)
    weights globally (or per layer). Ties at the threshold are broken by position so the count is exact."""
    if threshold == "global":
        _mask_slice_(scores, mask, num_pruned(sparsity, scores.numel()), finder or ThresholdFinder())
    else:
        for layer in layers:
            sl = slice(layer.offset, layer.offset + layer.numel)
            _mask_slice_(scores[sl], mask[sl], num_pruned(sparsity, layer.numel), ThresholdFinder())
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


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a 0/1 mask: one bit per weight (uint8, big-endian bit order as numpy.packbits)."""
    bits = mask.detach().to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(bits))


def unpack_mask(packed: torch.Tensor, n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    bits = np.unpackbits(packed.detach().cpu().numpy(), count=n)
    return torch.from_numpy(bits).to(device=device or packed.device, dtype=dtype)


def packed_size(n: int) -> int:
    return (n + 7) // 8
