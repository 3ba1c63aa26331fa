"""PASS's recurrent hypernetwork (PASS.md §2 "Our design"): visual prompt + weight statistics -> channel probabilities.

* Prompt encoder g_omega: ``conv(k4, s4) -> GELU -> conv(k3, s2) -> GELU -> global average pool -> Linear(2H)``
  on the full prompt canvas V (``VisualPrompt.full_prompt()``, zeros where there is no prompt), split into the
  LSTM's initial state ``h0 = tanh(.)``, ``c0``.
* Step i (units in forward order are the time axis) reads
  ``x_i = [LayerNorm_i(Linear_i(s_i)), Linear'_i(p^(i-1)), mean(p^(i-1))]`` (``stat_dim + stat_dim + 1`` values):
  the standardised per-channel weight statistics ``s_i`` of unit i (:func:`weight_statistics`), a projection of
  the previous unit's mask and its keep ratio. For the first unit, a learned summary takes their place
  (``start_mask``, ``start_ratio``; initialised to 0 and 1: all input channels present).
* One-layer ``nn.LSTM(d_in, H)``, stepped one unit at a time; per-unit head ``Linear(H -> C_i)`` gives the channel
  logits ``z_i`` (bias ``head_bias`` = +3, every channel starts on); ``p_i = sigmoid(z_i / T)``.

**How M^(i-1) is fed.** The hard masks come from one *global* threshold over all units' probabilities
(:func:`~prompt_sparsity.sparsity.selection.select_global`), known only after the last step. The recurrence
therefore feeds the previous unit's **soft** probabilities ``p^(i-1)`` (with the training noise when
``noise=True``), not detached: the gradient of later units' logits flows back into earlier units' heads. The
hard masks of the previous optimisation step can still enter through the weight statistics
(``weight_statistics(model, units, prev_masks=...)`` masks each producer's input channels by its input unit's mask).

Per-unit layers live in ``nn.ModuleList`` s indexed by unit position (unit names contain dots):
``stat_proj[i]``, ``stat_norm[i]``, ``heads[i]`` for unit i, and ``mask_proj[i - 1]`` (``Linear(C_{i-1} -> d)``)
for unit i >= 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .channels import ChannelUnit

__all__ = ["PromptHyperNetwork", "weight_statistics", "soft_flops_penalty"]


class PromptHyperNetwork(nn.Module):
    """Per-unit channel keep probabilities from a visual prompt and the frozen backbone's weight statistics.

    Args:
        unit_sizes: channels C_i of each unit, in forward order.
        prompt_channels: channels of the prompt canvas (3 for RGB).
        hidden_size: LSTM hidden size H (the paper sweeps 64/128/256).
        stat_dim: d, the width of each input projection.
        temperature: T in ``sigmoid(z / T)`` (a plain attribute: anneal it by assignment).
        head_bias: initial bias of every head (+3: every channel starts kept).
        encoder_channels: widths of the prompt encoder's two convs.
    """

    def __init__(self, unit_sizes: Sequence[int], prompt_channels: int = 3, hidden_size: int = 128,
                 stat_dim: int = 64, temperature: float = 0.4, head_bias: float = 3.0,
                 encoder_channels: tuple[int, int] = (16, 32)):
        super().__init__()
        sizes = [int(c) for c in unit_sizes]
        if not sizes or any(c < 1 for c in sizes):
            raise ValueError(f"unit_sizes must be a non-empty list of positive channel counts, got {list(unit_sizes)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.unit_sizes = sizes
        self.prompt_channels = int(prompt_channels)
        self.hidden_size = int(hidden_size)
        self.stat_dim = int(stat_dim)
        self.temperature = float(temperature)
        self.head_bias = float(head_bias)
        c1, c2 = encoder_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(self.prompt_channels, c1, kernel_size=4, stride=4),
            nn.GELU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c2, 2 * self.hidden_size),
        )
        d = self.stat_dim
        self.stat_proj = nn.ModuleList(nn.Linear(c, d) for c in sizes)
        self.stat_norm = nn.ModuleList(nn.LayerNorm(d) for _ in sizes)
        self.mask_proj = nn.ModuleList(nn.Linear(c, d) for c in sizes[:-1])  # mask_proj[i - 1] feeds unit i
        # the first unit has no previous mask: a learned mask summary (init: projection 0, keep ratio 1). Being
        # direct parameters, they also make transformers' init call `_init_weights` on this module itself (a
        # custom-code module without direct parameters is marked initialised without it).
        self.start_mask = nn.Parameter(torch.zeros(d))
        self.start_ratio = nn.Parameter(torch.ones(1))
        self.input_size = 2 * d + 1
        self.lstm = nn.LSTM(self.input_size, self.hidden_size, num_layers=1, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(self.hidden_size, c) for c in sizes)
        self.reset_parameters()

    @property
    def num_units(self) -> int:
        return len(self.unit_sizes)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every parameter, deterministically given the global torch seed.

        PyTorch's default init for each layer (in ``self.modules()`` order), then every head bias = ``head_bias``,
        ``start_mask = 0``, ``start_ratio = 1``.
        Uses ``torch.nn.init`` functions only, so under transformers' guarded init (``_is_hf_initialized``)
        weights loaded from a checkpoint are left alone.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for head in self.heads:
            nn.init.constant_(head.bias, self.head_bias)
        nn.init.zeros_(self.start_mask)
        nn.init.ones_(self.start_ratio)

    # ------------------------------------------------------------------------------------------ forward
    def initial_state(self, prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h0, c0), each (1, 1, H), from the prompt canvas; zeros for ``prompt=None`` (the no-prompt ablation)."""
        ref = self.heads[0].weight
        if prompt is None:
            z = torch.zeros(1, 1, self.hidden_size, device=ref.device, dtype=ref.dtype)
            return z, z.clone()
        if prompt.dim() == 3:
            prompt = prompt.unsqueeze(0)
        if prompt.dim() != 4 or prompt.shape[0] != 1 or prompt.shape[1] != self.prompt_channels:
            raise ValueError(
                f"PromptHyperNetwork: the prompt must be one canvas of shape (1, {self.prompt_channels}, H, W) "
                f"(VisualPrompt.full_prompt()), got {tuple(prompt.shape)}"
            )
        if min(prompt.shape[-2:]) < 4:
            raise ValueError(f"PromptHyperNetwork: the prompt canvas must be at least 4x4, got {tuple(prompt.shape)}")
        e = self.encoder(prompt.to(device=ref.device, dtype=ref.dtype))
        h0, c0 = e.split(self.hidden_size, dim=-1)
        return torch.tanh(h0).view(1, 1, -1).contiguous(), c0.reshape(1, 1, -1).contiguous()

    def _check_stats(self, weight_stats) -> list[torch.Tensor]:
        stats = list(weight_stats)
        if len(stats) != self.num_units:
            raise ValueError(f"PromptHyperNetwork: got {len(stats)} weight statistics for {self.num_units} units")
        for i, (s, c) in enumerate(zip(stats, self.unit_sizes)):
            if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() != c:
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(
                    f"PromptHyperNetwork: the weight statistics of unit {i} must have shape ({c},), got {shape}"
                )
        return stats

    def logits(self, prompt: torch.Tensor | None, weight_stats: Sequence[torch.Tensor], *, noise: bool = False,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Per-unit channel logits ``z_i / T`` (noise added to ``z_i`` before the temperature when ``noise``)."""
        stats = self._check_stats(weight_stats)
        h, c = self.initial_state(prompt)
        ref = self.heads[0].weight
        prev = None
        out = []
        for i in range(self.num_units):
            s = stats[i].detach().to(device=ref.device, dtype=ref.dtype)
            parts = [self.stat_norm[i](self.stat_proj[i](s))]
            if prev is None:
                parts.append(self.start_mask)
                parts.append(self.start_ratio)
            else:
                parts.append(self.mask_proj[i - 1](prev))
                parts.append(prev.mean().view(1))
            x = torch.cat(parts).view(1, 1, -1)
            y, (h, c) = self.lstm(x, (h, c))
            z = self.heads[i](y.view(-1))
            if noise:
                dev = z.device if generator is None else generator.device
                u = torch.rand(z.shape, generator=generator, device=dev, dtype=z.dtype).to(z.device)
                u = u.clamp(1e-6, 1 - 1e-6)
                z = z + torch.log(u) - torch.log1p(-u)  # logistic noise: the binary Gumbel(-softmax) relaxation
            zt = z / self.temperature
            out.append(zt)
            prev = torch.sigmoid(zt)
        return out

    def forward(self, prompt: torch.Tensor | None, weight_stats: Sequence[torch.Tensor], *, noise: bool = False,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Per-unit keep probabilities ``p_i = sigmoid(z_i / T)``, each of shape (C_i,).

        Args:
            prompt: the prompt canvas V, (1, C, H, W) (``VisualPrompt.full_prompt()``); ``None``: zero initial state.
            weight_stats: per unit, a (C_i,) tensor (:func:`weight_statistics`; used detached).
            noise: add logistic noise to the logits (binary concrete relaxation; for training).
            generator: the random generator of the noise (default: the global one).

        Step i sees the previous unit's soft probabilities p^(i-1) (see the module docstring).
        """
        return [torch.sigmoid(z) for z in self.logits(prompt, weight_stats, noise=noise, generator=generator)]

    def extra_repr(self) -> str:
        return (f"units={self.num_units}, channels={sum(self.unit_sizes)}, hidden_size={self.hidden_size}, "
                f"stat_dim={self.stat_dim}, temperature={self.temperature}, head_bias={self.head_bias}")


@torch.no_grad()
def weight_statistics(model: nn.Module, units: Sequence[ChannelUnit],
                      prev_masks: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None] | None = None,
                      eps: float = 1e-5) -> list[torch.Tensor]:
    """Per unit, the standardised per-output-channel L2 norm of the producer's weight (detached, float32).

    ``s_c = ||W[c]||_2`` over everything but the output dim of ``model.get_submodule(unit.producer).weight``, then
    ``(s - mean(s)) / (std(s) + eps)`` within the unit (population std; a 1-channel unit gives 0). With
    ``prev_masks`` (one mask per unit, list in unit order or ``{unit.name: mask}``; typically the previous
    optimisation step's hard masks), a producer whose input channels are another unit (``unit.input_unit``) has
    them multiplied by that unit's mask first: the statistics of ``W^(i) * M^(i-1)``.
    """
    units = list(units)
    masks_by_name: dict[str, torch.Tensor | None] = {}
    if prev_masks is not None:
        if isinstance(prev_masks, Mapping):
            masks_by_name = dict(prev_masks)
        else:
            prev_masks = list(prev_masks)
            if len(prev_masks) != len(units):
                raise ValueError(f"weight_statistics: got {len(prev_masks)} prev_masks for {len(units)} units")
            masks_by_name = {u.name: m for u, m in zip(units, prev_masks)}
    out = []
    for u in units:
        w = model.get_submodule(u.producer).weight.detach()
        if w.shape[0] != u.num_channels:
            raise RuntimeError(
                f"weight_statistics: unit {u.name!r} says {u.num_channels} channels but {u.producer} has "
                f"{w.shape[0]} output channels (stale units? call find_channel_units(model) again)"
            )
        w = w.float()
        m = masks_by_name.get(u.input_unit) if u.input_unit is not None else None
        if m is not None:
            m = m.detach().to(device=w.device, dtype=w.dtype).reshape(-1)
            if m.numel() != w.shape[1]:
                raise ValueError(
                    f"weight_statistics: the mask of unit {u.input_unit!r} has {m.numel()} values but "
                    f"{u.producer} has {w.shape[1]} input channels"
                )
            w = w * m.view(1, -1, *([1] * (w.dim() - 2)))
        s = w.flatten(1).norm(dim=1)
        out.append((s - s.mean()) / (s.std(unbiased=False) + eps))
    return out


def soft_flops_penalty(flops_model, probs: Sequence[torch.Tensor], target_ratio: float,
                       lam: float = 2.0) -> torch.Tensor:
    """``lam * log(max(F_soft / F_dense, r) / r)``: 0 at or below the budget ``r``, differentiable in ``probs``.

    ``F_soft`` is the coupled FLOPs of the soft keep probabilities (``flops_model.ratio(probs)``).
    """
    r = float(target_ratio)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"target_ratio={target_ratio!r} is outside (0, 1]: pass the kept fraction of dense FLOPs")
    ratio = flops_model.ratio(list(probs))
    return lam * torch.log(torch.clamp(ratio, min=r) / r)
