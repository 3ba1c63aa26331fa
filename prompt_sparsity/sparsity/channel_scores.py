"""VPNs with channel-granularity scores (VPNS.md §8, "Structured (channel scores)"): one learnable score per
output channel of every channel unit, searched jointly with the visual prompt while the backbone is frozen, then
compacted and fine-tuned through the structured path PASS uses (`config.structure_search="scores"`).

* **Granularity: per output channel** of each unit (the producer's filters), i.e. exactly the channels that
  :func:`~prompt_sparsity.sparsity.channels.compact_model` can remove. Per-kernel scores (one per (out, in) 2-D
  kernel) are not offered: a kernel mask removes no whole channel, so it would not compact into a smaller dense
  model and would give no speed-up through this path.
* **Mask.** At every forward of the search the hard 0/1 masks are recomputed from the current scores by the same
  FLOPs-budget selection as PASS (:func:`~prompt_sparsity.sparsity.selection.select_global`, or
  :func:`~prompt_sparsity.sparsity.selection.select_uniform` with ``channel_selection="uniform"``; ``min_channels``
  per unit), so every step's subnetwork meets the FLOPs target exactly as the selection defines it; the masks act
  through :class:`~prompt_sparsity.sparsity.channels.ChannelMasker`. The raw scores are ranked (a larger score
  keeps its channel; unlike the unstructured VPNs mask no ``|s|``: a channel score has no sign to mirror).
* **Gradient.** Straight-through (:func:`~prompt_sparsity.sparsity.selection.straight_through`): forward the hard
  mask, backward ``dL/ds_c = dL/dm_c``, so pruned channels get a gradient too and can come back. The masks act at
  each unit's *last* mask point only (:func:`gate_units`; exact, since the unit's channels reach it through
  per-channel operations alone), so ``dL/dm_c = sum a_c * dL/dy_c`` holds the channel's real activation ``a_c``:
  the first-order estimate of turning it on (or off), as HYDRA's ``w * g`` is for a weight. Masking every point
  (as the PASS masker does) zeroes a pruned channel before its depthwise conv, and its gradient then only sees the
  constant that the next norm's bias leaves in it. Measured on EfficientNet-Lite0 (benchmark protocol, 40 search
  steps, seed 7, default lr): with every point masked the search never changed the initial mask (0 of 8,960
  channels flipped; 99.7% of the pruned channels' scores only fell); with the last point only it turned 1,178
  channels on and 1,322 off.
* **Initialisation** (:func:`initial_channel_scores`): ``s_c = ||W[c]||_1 / mean_c' ||W[c']||_1`` over the
  producer's output filters, per unit (every unit averages 1). The initial hard mask is therefore exactly the
  global L1-norm baseline's (``l1`` importance, ``normalise_per_unit("mean")``, ``select_global``): the search
  starts from that mask and whatever differs at the end was learned. Not HYDRA's scaled init
  (``sqrt(6 / fan_in) * W / max|W|``, which the unstructured VPNs scores use): applied per channel its scale falls
  with the unit's fan-in, so one global threshold would empty the units with the widest inputs (the last, cheapest
  stages) before touching any other; mean normalisation makes the units comparable, as for the baselines.
* **Learning rate**: ``score_lr`` and its ``auto`` rule (``prompt_sparsity.optim.SCORE_LR_RULE``), unchanged: over
  the paper's ~11.7k search steps a score may travel ``1e-4 x 11.7k ~ 1.2``, about the spread of these mean-1
  scores, so a full-length search can reorder the whole ranking; short runs get the rule's larger lr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .channels import ChannelUnit
from .selection import select_global, select_uniform, straight_through

__all__ = ["ChannelScores", "initial_channel_scores", "gate_units"]

# Unit kinds of `find_channel_units` whose mask points follow one chain of per-channel operations (depthwise conv,
# norm, activation) that ends at the consumer (or at its squeeze-excite, which then reads the masked channels).
CHAINED_KINDS = frozenset({"resnet_basic", "resnet_bottleneck", "inverted_residual", "stem", "edge_residual",
                           "convnext_mlp"})


def gate_units(units: Sequence[ChannelUnit]) -> list[ChannelUnit]:
    """The units with only their last mask point where that is exact (kinds in :data:`CHAINED_KINDS`): masking
    there gives what masking every point gives (the compact model's function), while upstream of it a pruned
    channel keeps its real activations, which its straight-through gradient needs. Other units keep every point."""
    return [dataclasses.replace(u, mask_points=u.mask_points[-1:]) if u.kind in CHAINED_KINDS else u for u in units]


@torch.no_grad()
def initial_channel_scores(model: nn.Module, units: Sequence[ChannelUnit], eps: float = 1e-12) -> torch.Tensor:
    """Flat (sum C_i,) float32 scores in unit order: each producer filter's L1 norm over its unit's mean filter
    norm (an all-zero unit scores 0)."""
    out = []
    for u in units:
        w = model.get_submodule(u.producer).weight
        if w.shape[0] != u.num_channels:
            raise RuntimeError(
                f"initial_channel_scores: unit {u.name!r} says {u.num_channels} channels but {u.producer} has "
                f"{w.shape[0]} output channels (stale units? call find_channel_units(model) again)"
            )
        norms = w.detach().float().abs().flatten(1).sum(1)
        out.append(norms / norms.mean().clamp_min(eps))  # no data-dependent branch: also runs on meta tensors
    return torch.cat(out)


class ChannelScores(nn.Module):
    """One trainable score per channel of every unit, stored flat in unit order (``scores``, so the state-dict key
    is ``structure.channel_scores.scores``; the unit sizes come from ``config.channel_units``)."""

    def __init__(self, unit_sizes: Sequence[int]):
        super().__init__()
        sizes = [int(c) for c in unit_sizes]
        if not sizes or any(c < 1 for c in sizes):
            raise ValueError(f"ChannelScores: unit_sizes must be a non-empty list of positive channel counts, got "
                             f"{list(unit_sizes)}")
        self.unit_sizes = sizes
        self.scores = nn.Parameter(torch.ones(sum(sizes)))

    def per_unit(self) -> list[torch.Tensor]:
        """Views of ``scores``, one (C_i,) tensor per unit (gradients flow back into ``scores``)."""
        return list(torch.split(self.scores, self.unit_sizes))

    @torch.no_grad()
    def reset_from_weights(self, model: nn.Module, units: Sequence[ChannelUnit]) -> None:
        """Scores from the producers' filter norms (:func:`initial_channel_scores`)."""
        self.scores.copy_(initial_channel_scores(model, units).to(self.scores))

    def masks(self, flops_model, target_ratio: float, *, selection: str = "global", min_channels=1,
              hard_only: bool = False) -> list[torch.Tensor]:
        """Per-unit masks at ``target_ratio`` of dense FLOPs: hard 0/1 values forward; unless ``hard_only``,
        straight-through to the scores backward."""
        if selection not in ("global", "uniform"):
            raise ValueError(f"ChannelScores.masks: selection={selection!r}; use 'global' or 'uniform'.")
        scores = self.per_unit()
        select = select_global if selection == "global" else select_uniform
        hard = select([s.detach() for s in scores], flops_model, target_ratio, min_channels=min_channels)
        return hard if hard_only else straight_through(hard, scores)

    def extra_repr(self) -> str:
        return f"units={len(self.unit_sizes)}, channels={sum(self.unit_sizes)}"
