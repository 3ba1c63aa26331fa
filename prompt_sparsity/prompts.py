"""Visual prompts (VPNS.md §2): a learnable tensor added to the un-normalised image, then normalisation.

Input: images in [0, 1] of size `input_size`. With the prompt: zero-pad (centred) to `output_size`, add
`T(delta) * M`, clamp to [0, 1], normalise. Without it: normalise only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VisualPrompt(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.method = config.prompt_method
        self.input_size = config.input_size
        self.output_size = config.output_size
        self.pad_size = config.pad_size
        self.mask_size = config.mask_size
        self.num_channels = config.num_channels
        self._mean = tuple(float(v) for v in config.image_mean)
        self._std = tuple(float(v) for v in config.image_std)
        self._cache = {}
        c, out, p, m = self.num_channels, self.output_size, self.pad_size, self.mask_size
        if self.method == "pad":
            # Only the frame is stored: 4 pieces, c * (out^2 - (out - 2p)^2) values in all.
            self.pad_up = nn.Parameter(torch.zeros(1, c, p, out))
            self.pad_down = nn.Parameter(torch.zeros(1, c, p, out))
            self.pad_left = nn.Parameter(torch.zeros(1, c, out - 2 * p, p))
            self.pad_right = nn.Parameter(torch.zeros(1, c, out - 2 * p, p))
        elif self.method in ("fix", "random"):
            self.patch = nn.Parameter(torch.zeros(1, c, m, m))
        elif self.method == "expand":
            self.canvas = nn.Parameter(torch.zeros(1, c, out, out))

    def reset_parameters(self, init_fn=None):
        """Zero every prompt tensor (the paper's init). `init_fn` lets the caller use guarded init functions."""
        zeros_ = init_fn or nn.init.zeros_
        for param in self.parameters(recurse=False):
            zeros_(param)

    @property
    def num_effective_values(self) -> int:
        c, out, p, m = self.num_channels, self.output_size, self.pad_size, self.mask_size
        if self.method == "pad":
            return c * (out * out - (out - 2 * p) ** 2)
        if self.method in ("fix", "random"):
            return c * m * m
        if self.method == "expand":
            return c * (out * out - self.input_size**2)
        return 0

    def _constants(self, ref: torch.Tensor):
        key = (ref.device, ref.dtype)
        if key not in self._cache or torch.compiler.is_compiling():
            mean = torch.tensor(self._mean, device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self._std, device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)
            ring = None
            if self.method == "expand":
                ring = torch.ones(1, 1, self.output_size, self.output_size, device=ref.device, dtype=ref.dtype)
                lo = (self.output_size - self.input_size) // 2
                ring[..., lo : lo + self.input_size, lo : lo + self.input_size] = 0
            if torch.compiler.is_compiling():
                return mean, std, ring  # traced tensors are graph constants: never cache them
            self._cache[key] = (mean, std, ring)
        return self._cache[key]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std, _ = self._constants(x)
        return (x - mean) / std

    def prompt_image(self, x: torch.Tensor) -> torch.Tensor:
        """The prompted image in [0, 1] on the `output_size` canvas (before normalisation)."""
        if self.method == "none":
            return x
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(
                f"the visual prompt expects {self.input_size}x{self.input_size} images, got "
                f"{tuple(x.shape[-2:])}; resize the images to input_size (the saved image processor does this)."
            )
        out = self.output_size
        if self.input_size < out:
            lo = (out - self.input_size) // 2
            hi = out - self.input_size - lo
            x = F.pad(x, (lo, hi, lo, hi))
        if self.method == "pad":
            return torch.clamp(x + self.full_prompt(), 0.0, 1.0)
        if self.method in ("fix", "random"):
            m = self.mask_size
            if self.method == "random" and self.training:
                # A new position every forward pass in training; evaluation uses the top-left corner, like `fix`,
                # so that inference is deterministic.
                top, left = (int(v) for v in torch.randint(0, out - m + 1, (2,)))
            else:
                top = left = 0
            delta = F.pad(torch.sigmoid(self.patch), (left, out - m - left, top, out - m - top))
            return torch.clamp(x + delta, 0.0, 1.0)
        # expand: the ring outside the resized image.
        _, _, ring = self._constants(x)
        return torch.clamp(x + torch.sigmoid(self.canvas) * ring, 0.0, 1.0)

    def full_prompt(self) -> torch.Tensor:
        """The prompt as one (1, C, output_size, output_size) tensor T(delta) * M (zeros where there is none):
        the input of PASS's prompt encoder. Differentiable w.r.t. the prompt parameters."""
        out, c = self.output_size, self.num_channels
        ref = next(self.parameters(), None)
        if ref is None:
            return torch.zeros(1, c, out, out)
        if self.method == "pad":
            p = self.pad_size
            inner = torch.zeros(1, c, out - 2 * p, out - 2 * p, device=ref.device, dtype=ref.dtype)
            middle = torch.cat([self.pad_left, inner, self.pad_right], dim=3)
            return torch.cat([self.pad_up, middle, self.pad_down], dim=2)
        if self.method in ("fix", "random"):
            m = self.mask_size
            return F.pad(torch.sigmoid(self.patch), (0, out - m, 0, out - m))
        _, _, ring = self._constants(ref)
        return torch.sigmoid(self.canvas) * ring

    def forward(self, x: torch.Tensor, use_prompt: bool = True) -> torch.Tensor:
        if use_prompt and self.method != "none":
            x = self.prompt_image(x)
        return self.normalize(x)
