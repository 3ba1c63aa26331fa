"""Hard channel masks from per-unit scores under a FLOPs budget (PASS.md §2 "Discretisation + global pruning").

Both selections work on the *coupled* FLOPs of :class:`~prompt_sparsity.sparsity.flops.FlopsModel` (a layer's
FLOPs scale with kept-in x kept-out channels, a depthwise conv's with its kept channels), so the budget is met on
the compact model that :func:`~prompt_sparsity.sparsity.channels.compact_model` would produce.

* :func:`select_global`: one ranking over all units' channels (one global threshold tau: a channel is kept iff its
  score is >= tau, ties broken deterministically), the largest kept set whose FLOPs are <= the target. The scores
  must be comparable across units (hypernetwork probabilities are; importances need
  :func:`~prompt_sparsity.methods.channel_pruners.normalise_per_unit` first).
* :func:`select_uniform`: the same keep ratio rho in every unit (per-unit top-``ceil(rho * C_i)``), rho the
  largest whose FLOPs are <= the target (the "uniform" ablation / baselines).
* :func:`straight_through`: ``hard - soft.detach() + soft`` per unit (forward = hard mask, backward = identity
  to the soft probabilities).

Both selections are exact searches over the (finitely many) candidate kept sets, with one FlopsModel evaluation
per bisection step (~log2(#channels) evaluations, no Python loop over channels per candidate). Since FLOPs grow
monotonically with every kept channel, the search returns the largest candidate whose FLOPs are <= the target.
Channel granularity can leave that candidate more than ``tol`` (2% of dense FLOPs) below the target on tiny models;
the smallest candidate above the target is then taken instead if it is closer, and a warning is issued if neither
is within ``tol``.

Tie-breaking is deterministic: by score (descending), then by position (unit order, then channel index).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

__all__ = ["select_global", "select_uniform", "select_masks", "straight_through", "min_channel_counts",
           "SELECTION_MODES"]

SELECTION_MODES = ("global", "uniform")


# --------------------------------------------------------------------------------------------------- validation
def _check_target(target_ratio) -> float:
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, numbers.Real):
        raise TypeError(
            f"target_ratio must be a number in (0, 1] (the fraction of the dense model's FLOPs to keep), "
            f"got {type(target_ratio).__name__}"
        )
    r = float(target_ratio)
    if not (math.isfinite(r) and 0.0 < r <= 1.0):
        raise ValueError(
            f"target_ratio={target_ratio!r} is outside (0, 1]: it is the fraction of the dense model's FLOPs to "
            "keep (e.g. 0.5 keeps half the FLOPs; 1.0 keeps every channel). Pass a value in (0, 1]."
        )
    return r


def _check_scores(scores, flops_model) -> list[torch.Tensor]:
    if isinstance(scores, torch.Tensor):
        raise TypeError("scores must be a list of 1-D tensors (one per channel unit), not a single tensor")
    scores = list(scores)
    units = getattr(flops_model, "units", None)
    if units is not None:
        if len(scores) != len(units):
            raise ValueError(
                f"got {len(scores)} score vectors for the {len(units)} channel units of the FLOPs model; pass one "
                "1-D tensor per unit, in unit order"
            )
    for i, s in enumerate(scores):
        c = units[i].num_channels if units is not None else None
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or (c is not None and s.numel() != c) or s.numel() == 0:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            name = f" ({units[i].name!r})" if units is not None else ""
            raise ValueError(
                f"the scores of unit {i}{name} must be a 1-D tensor of {c or 'C_i >= 1'} values, got {shape}"
            )
        if bool(torch.isnan(s.detach()).any()):
            raise ValueError(f"the scores of unit {i} contain NaN")
    return scores


def min_channel_counts(sizes: Sequence[int], min_channels=1) -> list[int]:
    """Channels kept at least per unit: ``min(min_channels, C_i)`` for an int, ``ceil(min_channels * C_i)`` (at
    least 1) for a float ratio in (0, 1]."""
    if isinstance(min_channels, bool):
        raise TypeError("min_channels must be an int >= 1 or a float ratio in (0, 1], not a bool")
    if isinstance(min_channels, numbers.Integral):
        if min_channels < 1:
            raise ValueError(
                f"min_channels={min_channels}: every unit must keep at least one channel (a unit without channels "
                "cannot be compacted); use min_channels >= 1"
            )
        return [min(int(min_channels), int(c)) for c in sizes]
    if isinstance(min_channels, numbers.Real):
        f = float(min_channels)
        if not (0.0 < f <= 1.0):
            raise ValueError(
                f"min_channels={min_channels!r}: a float min_channels is a ratio of each unit's channels and must "
                "be in (0, 1]; pass an int for an absolute number of channels"
            )
        # the small slack keeps e.g. 0.1 * 30 = 3.0000000000000004 at 3
        return [max(1, min(int(c), math.ceil(f * int(c) - 1e-9))) for c in sizes]
    raise TypeError(f"min_channels must be an int >= 1 or a float ratio in (0, 1], got {type(min_channels).__name__}")


# --------------------------------------------------------------------------------------------------- helpers
def _unit_orders(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Per unit: channel indices by score descending, ties by channel index."""
    out, start = [], 0
    for c in sizes:
        out.append(torch.sort(flat[start:start + c], descending=True, stable=True).indices)
        start += c
    return out


def _masks_from_flat(keep: torch.Tensor, sizes: list[int], like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(keep, sizes)
    return [p.to(dtype=s.dtype if s.is_floating_point() else torch.float32) for p, s in zip(parts, like)]


def _bisect_last_feasible(f, lo: int, hi: int, target: float) -> int:
    """Largest k in [lo, hi] with f(k) <= target, f non-decreasing and f(lo) <= target."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _infeasible(min_ratio: float, r: float, min_channels, what: str, strict: bool) -> None:
    msg = (
        f"{what}: target_ratio={r:g} is below the smallest FLOPs ratio reachable with min_channels="
        f"{min_channels!r}, {min_ratio:.4f} (the layers outside the prunable units and the channels every unit "
        f"must keep cost that much)."
    )
    if strict:
        raise ValueError(msg + f" Use target_ratio >= {min_ratio:.4f} or a smaller min_channels.")
    warnings.warn(msg + " Returning the minimal masks (strict=False).")


def _closest(f_le: float, f_gt: float | None, target: float, tol_flops: float, dense: float, r: float,
             what: str) -> bool:
    """Whether to take the candidate above the target; warns when neither is within tolerance."""
    take_above = f_gt is not None and target - f_le > tol_flops and (f_gt - target) < (target - f_le)
    got = f_gt if take_above else f_le
    if abs(got - target) > tol_flops * (1 + 1e-9):
        warnings.warn(
            f"{what}: the closest kept set has a FLOPs ratio of {got / dense:.4f} for target_ratio={r:g} (channel "
            "granularity too coarse for the tolerance)"
        )
    return take_above


# --------------------------------------------------------------------------------------------------- selections
@torch.no_grad()
def select_global(scores: Sequence[torch.Tensor], flops_model, target_ratio: float, *, min_channels=1,
                  tol: float = 0.02, strict: bool = True) -> list[torch.Tensor]:
    """Hard 0/1 masks (one per unit, dtype/device of the scores) from one global ranking of all channels.

    Keeps the ``k`` best-scoring channels overall (ties by unit order, then channel index), plus each unit's
    ``min_channels`` best (int, or a float ratio of the unit), with ``k`` the largest whose coupled FLOPs
    (``flops_model``) are <= ``target_ratio`` x dense FLOPs (see the module docstring for the granularity rule).
    Equivalent to one global threshold tau on the scores. The scores must be comparable across units.

    Raises ``ValueError`` for a ``target_ratio`` outside (0, 1] or below what ``min_channels`` allows (more than
    ``tol`` of dense FLOPs below the FLOPs of the minimal masks); with ``strict=False`` the latter returns the
    minimal masks (each unit's ``min_channels`` best) with a warning instead.
    """
    r = _check_target(target_ratio)
    scores = _check_scores(scores, flops_model)
    sizes = [int(s.numel()) for s in scores]
    mins = min_channel_counts(sizes, min_channels)
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=torch.float64) for s in scores])
    n = flat.numel()
    # forced channels: each unit's top-`min` by the same tie-breaking
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    start = 0
    for c, m, order in zip(sizes, mins, _unit_orders(flat, sizes)):
        forced[start + order[:m]] = True
        start += c
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[torch.sort((~forced[order]).to(torch.uint8), stable=True).indices]  # forced first
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device)

    dense = float(flops_model.dense_flops)
    target = r * dense * (1 + 1e-12)
    tol_flops = tol * dense
    k_min = int(sum(mins))

    def masks(k: int) -> list[torch.Tensor]:
        return _masks_from_flat((rank < k).to(torch.float64), sizes, scores)

    def flops(k: int) -> float:
        return flops_model.flops(masks(k))

    f_min = flops(k_min)
    if f_min > target:
        if f_min - target > tol_flops:
            _infeasible(f_min / dense, r, min_channels, "select_global", strict)
        return masks(k_min)
    k = _bisect_last_feasible(flops, k_min, n, target)
    if k < n and _closest(flops(k), flops(k + 1), target, tol_flops, dense, r, "select_global"):
        k += 1
    return masks(k)


@torch.no_grad()
def select_uniform(scores: Sequence[torch.Tensor], flops_model, target_ratio: float, *, min_channels=1,
                   tol: float = 0.02, strict: bool = True) -> list[torch.Tensor]:
    """Hard 0/1 masks keeping the same ratio rho of every unit: its top-``ceil(rho * C_i)`` channels by score.

    rho is the largest ratio whose coupled FLOPs are <= ``target_ratio`` x dense (exact search over the
    breakpoints ``j / C_i``). Where several units would gain a channel at the next breakpoint, a prefix of them (in
    unit order) gains it if that stays within the budget, so per-unit counts differ from ``rho * C_i`` by less than
    one channel. Each unit keeps at least ``min_channels`` (int, or a float ratio). Scores need not be comparable
    across units. Errors (and ``strict``) as :func:`select_global`.
    """
    r = _check_target(target_ratio)
    scores = _check_scores(scores, flops_model)
    sizes = [int(s.numel()) for s in scores]
    mins = min_channel_counts(sizes, min_channels)
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=torch.float64) for s in scores])
    ranks = []
    for c, order in zip(sizes, _unit_orders(flat, sizes)):
        rk = torch.empty(c, dtype=torch.long, device=device)
        rk[order] = torch.arange(c, device=device)
        ranks.append(rk)

    def masks(counts: Sequence[int]) -> list[torch.Tensor]:
        return [(rk < k).to(dtype=s.dtype if s.is_floating_point() else torch.float32)
                for rk, k, s in zip(ranks, counts, scores)]

    def flops(counts: Sequence[int]) -> float:
        return flops_model.flops(masks(counts))

    def counts_at(rho: float) -> list[int]:
        return [max(m, min(c, math.ceil(rho * c - 1e-9))) for c, m in zip(sizes, mins)]

    dense = float(flops_model.dense_flops)
    target = r * dense * (1 + 1e-12)
    tol_flops = tol * dense
    f_min = flops(mins)
    if f_min > target:
        if f_min - target > tol_flops:
            _infeasible(f_min / dense, r, min_channels, "select_uniform", strict)
        return masks(mins)
    # breakpoints j / C (exact fractions are distinct floats for C < 2**26), ascending; 0 = the minimal masks
    rhos = torch.unique(torch.cat([torch.arange(0, c + 1, dtype=torch.float64) / c for c in set(sizes)]))
    rhos = rhos.tolist()
    j = _bisect_last_feasible(lambda i: flops(counts_at(rhos[i])), 0, len(rhos) - 1, target)
    counts = counts_at(rhos[j])
    if j == len(rhos) - 1:
        return masks(counts)
    nxt = counts_at(rhos[j + 1])
    stepping = [i for i, (a, b) in enumerate(zip(counts, nxt)) if b > a]

    def partial(q: int) -> list[int]:  # the first q stepping units take their next count
        out = list(counts)
        for i in stepping[:q]:
            out[i] = nxt[i]
        return out

    q = _bisect_last_feasible(lambda q: flops(partial(q)), 0, len(stepping), target)
    f_le = flops(partial(q))
    # the smallest step above the target: one more stepping unit (q < len(stepping) by construction)
    f_gt = flops(partial(q + 1)) if q < len(stepping) else None
    if _closest(f_le, f_gt, target, tol_flops, dense, r, "select_uniform"):
        q += 1
    return masks(partial(q))


def select_masks(scores: Sequence[torch.Tensor], flops_model, target_ratio: float, *, mode: str = "global",
                 min_channels=1, tol: float = 0.02, strict: bool = True) -> list[torch.Tensor]:
    """:func:`select_global` (``mode="global"``) or :func:`select_uniform` (``mode="uniform"``)."""
    kwargs = dict(min_channels=min_channels, tol=tol, strict=strict)
    if mode == "global":
        return select_global(scores, flops_model, target_ratio, **kwargs)
    if mode == "uniform":
        return select_uniform(scores, flops_model, target_ratio, **kwargs)
    raise ValueError(f"unknown selection mode {mode!r}; use one of {list(SELECTION_MODES)}")


def straight_through(hard, soft):
    """``hard - soft.detach() + soft``: the hard values forward, the gradient of ``soft`` backward.

    ``hard`` and ``soft``: lists of per-unit tensors (or two tensors); returns the same structure.
    """
    if isinstance(hard, torch.Tensor) and isinstance(soft, torch.Tensor):
        return hard.to(soft.dtype) - soft.detach() + soft
    hard, soft = list(hard), list(soft)
    if len(hard) != len(soft):
        raise ValueError(f"straight_through: got {len(hard)} hard masks for {len(soft)} soft ones")
    out = []
    for i, (h, s) in enumerate(zip(hard, soft)):
        if h.shape != s.shape:
            raise ValueError(f"straight_through: unit {i}: hard mask shape {tuple(h.shape)} != soft {tuple(s.shape)}")
        out.append(h.to(device=s.device, dtype=s.dtype) - s.detach() + s)
    return out
