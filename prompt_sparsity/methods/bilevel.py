"""BiP (Zhang et al., NeurIPS 2022, "Advancing Model Pruning via Bi-level Optimization"): the mask scores are the
upper level, the weights the lower level,

    min_m  L(m * theta*(m))   s.t.   theta*(m) = argmin_theta  L(m * theta) + gamma/2 |theta|^2,

solved by alternating one step of each per iteration (`bilevel_iteration`):

1. **Lower level (weights)**: one SGD step on `L(m * theta)` with the mask fixed; the ridge `gamma/2 |theta|^2` is the
   weight group's weight decay (`bip_gamma`).
2. **Upper level (scores)**: at the updated weights, the straight-through score gradient `dL/ds` (as VPNs/HYDRA:
   `dL/dm` passed to `s` times `sign(s)`) plus the implicit-gradient term `IG`, then one score step; the hard mask is
   recomputed from the scores (exact top-k, global threshold, layer floors) before the next forward, as in VPNs.

The implicit gradient `(dtheta*/dm)^T dL/dtheta`. With the Hessian-free assumption (`grad^2_theta L = 0`, and the
Hessian of L in `z = m * theta` dropped, which the bi-linearity of `m * theta` allows) the implicit function theorem
gives `dtheta*/dm = -(1/gamma) diag(dL/dz)`, so the paper's term is

    IG_m = -(1/gamma) * dL/dz (.) dL/dtheta        ( = -(1/gamma) * (dL/dtheta)^2 for a 0/1 mask, dL/dtheta = m (.) dL/dz)

`bip_implicit_gradient="paper"` uses it, carried to the scores like the rest of the straight-through gradient
(`IG_s = sign(s) (.) IG_m`). The authors' code (OPTML-Group/BiP, `trainer/bilevel.py`) computes something else: it
multiplies the score gradient of the loss by itself, `IG_s = -lr2 * (dL/ds)^2` with `lr2 = 1e-4` (`mask_grad_vec *
param_grad_vec`, both vectors holding the same score gradient at the score positions): that is
`-lr2 * (theta (.) dL/dz)^2`, the paper's form with `theta^2` in place of `m` and no `sign(s)`. It is the default
(`"code"`), as the published numbers come from it. `bip_ig_scale` is the coefficient in both (the paper's `1/gamma`,
the code's `lr2`); like the code, it is set apart from the weight decay `bip_gamma`.

Batches: the lower-level step takes the augmented, unprompted view and the upper-level step the un-augmented view,
prompted when the run has a prompt ("VPNs w. BiP": the prompt is trained with the scores), as BiP's two loaders give
each level its own batch. So a bilevel epoch is two passes over the training data, like a VPNs epoch.
"""

from __future__ import annotations

import torch

IMPLICIT_GRADIENTS = ("code", "paper")


@torch.no_grad()
def implicit_gradient(form: str, scores: torch.Tensor, score_grad: torch.Tensor,
                      weight_grad: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The implicit-gradient term on the flat scores (see the module docstring). `score_grad` = dL/ds (straight-
    through), `weight_grad` = dL/dtheta of the pruned weights in the same flat layout (needed by "paper" only)."""
    if form == "code":
        return score_grad.square().mul_(-scale)
    if form == "paper":
        if weight_grad is None:
            raise ValueError("the paper's implicit gradient needs dL/dtheta of the pruned weights.")
        # dL/dz (.) dL/dtheta = m (.) (dL/dz)^2 = (dL/dtheta)^2 for a 0/1 mask; to the scores through sign(s).
        return weight_grad.square().mul_(torch.sign(scores)).mul_(-scale)
    raise ValueError(f"bip_implicit_gradient={form!r}: use one of {list(IMPLICIT_GRADIENTS)}.")


def _flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def bilevel_iteration(model, optimizer, accelerator, upper_batch: dict, lower_batch: dict, *, scores: torch.Tensor,
                      weights: list[torch.Tensor], pruned_weights: list[torch.Tensor], upper_only: list[torch.Tensor],
                      form: str, scale: float, use_prompt: bool) -> tuple[float, float]:
    """One BiP iteration: a weight step on `lower_batch`, then a score step (with the implicit gradient) on
    `upper_batch`. One optimiser holds every group: each step leaves the other level's gradients as None, so the
    optimiser skips those parameters (no update, no weight decay, no momentum). `weights`: the lower level's
    parameters; `upper_only`: the scores and the prompt; `pruned_weights`: the masked weights in the flat score
    layout. Returns the two losses."""
    lower = model(pixel_values=lower_batch["pixel_values"], labels=lower_batch["labels"], use_prompt=False)
    accelerator.backward(lower.loss)
    for p in upper_only:
        p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    upper = model(pixel_values=upper_batch["pixel_values"], labels=upper_batch["labels"], use_prompt=use_prompt)
    accelerator.backward(upper.loss)  # (averaged over processes: every rank adds the same term)
    if scale and scores.grad is not None:
        weight_grad = _flat_grads(pruned_weights) if form == "paper" else None
        scores.grad.add_(implicit_gradient(form, scores.detach(), scores.grad, weight_grad, scale))
    for p in weights:
        p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(lower.loss.detach()), float(upper.loss.detach())
