"""One-shot unstructured pruning criteria used as baselines (VPNS.md §7): magnitude (OMP), random, SNIP, GraSP
and SynFlow, as importance scores over the flat weight layout of `PromptedSparseModel` (`model.sparsity.layers`).

Every criterion returns one flat float tensor of importances (length `model.sparsity.numel`, the same layout as
the mask): **larger = keep**. `mask_from_importance` turns it into an exact 0/1 mask, `prune_once` does both and
installs the mask with `model.set_mask`.

All criteria but `kept_magnitude` (IMP's: magnitude over the weights the current mask keeps) score the **dense**
pretrained network, whatever mask the model currently holds, and leave the model
exactly as they found it (weights, norm statistics, mask, `requires_grad` flags, `.grad`, train/eval modes): the
wrapped model is called with `torch.func.functional_call` on detached copies of its parameters (and, in train mode,
on clones of its buffers), so nothing of the model is written, and module modes are restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from ..sparsity.semi_structured import nm_keep_schedule, nm_mask_, nm_sparsity, parse_nm
from ..sparsity.unstructured import Floor, num_pruned, select_with_floors_

logger = logging.getLogger(__name__)

THRESHOLDS = ("global", "layerwise")


# --------------------------------------------------------------------------------------------------- helpers
def _layers(model):
    if getattr(model, "sparsity", None) is None:
        raise ValueError("this model has no unstructured sparsity (config.sparsity_type='unstructured' is needed).")
    return model.sparsity.layers


def _pruned_weights(model) -> list[torch.Tensor]:
    params = dict(model.model.named_parameters())
    return [params[layer.param_name] for layer in _layers(model)]


def _device(model) -> torch.device:
    return _pruned_weights(model)[0].device


def _check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}.")
    return sparsity


def _check_threshold(threshold: str) -> str:
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold={threshold!r}: use one of {list(THRESHOLDS)}.")
    return threshold


@contextlib.contextmanager
def _modes(model, train: bool):
    """Put every module of `model` in train (or eval) mode, and give each its own flag back afterwards."""
    saved = [(module, module.training) for module in model.modules()]
    try:
        model.train(train)
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["pixel_values"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "each batch must be a dict with 'pixel_values' and 'labels' (or a (pixel_values, labels) pair), "
        f"got {type(batch).__name__}."
    )


def _materialise(batches, criterion: str) -> list:
    if batches is None:
        raise ValueError(
            f"{criterion} is data-driven: pass batches (an iterable of {{'pixel_values', 'labels'}} dicts)."
        )
    batches = list(batches)
    if not batches:
        raise ValueError(f"{criterion} got no batches: pass at least one {{'pixel_values', 'labels'}} dict.")
    return batches


def _functional_state(model, train_mode: bool, dtype=None, linearise: bool = False):
    """Detached stand-ins for the wrapped model's parameters (and buffers where they could be written or must be
    changed), plus the leaves for the pruned weights. Nothing here aliases a tensor that a forward pass writes."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.model.named_parameters():
        t = param.detach()
        if linearise:
            t = t.abs()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t
    if train_mode or dtype is not None or linearise:
        norm_stats = set()
        if linearise:
            for mod_name, module in model.model.named_modules():
                if isinstance(module, _BatchNorm):
                    prefix = f"{mod_name}." if mod_name else ""
                    norm_stats.update({f"{prefix}running_mean", f"{prefix}running_var"})
        for name, buf in model.model.named_buffers():
            t = buf.detach().clone()  # train-mode norm layers update their statistics in place: on this clone
            if t.is_floating_point():
                if name in norm_stats:
                    t = t.abs()
                if dtype is not None:
                    t = t.to(dtype)
            state[name] = t
    leaves = []
    for layer in _layers(model):
        leaf = state[layer.param_name].clone().requires_grad_(True)
        state[layer.param_name] = leaf
        leaves.append(leaf)
    return state, leaves


def _mapped_logits(model, logits: torch.Tensor) -> torch.Tensor:
    index = model._label_index(logits.device)
    return logits if index is None else logits.index_select(-1, index)


def _loss(model, state, batch, use_prompt: bool, temperature: float = 1.0) -> torch.Tensor:
    pixel_values, labels = _unpack(batch)
    model._check_pixels(pixel_values)
    with torch.no_grad():  # gradients are wanted w.r.t. the weights only
        x = model.prompt(pixel_values, use_prompt=use_prompt)
    out = functional_call(model.model, state, (x,), dict(model._forward_kwargs), strict=False)
    logits = _mapped_logits(model, out.logits)
    if temperature != 1.0:
        logits = logits / temperature
    return F.cross_entropy(logits, labels.to(logits.device))


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# --------------------------------------------------------------------------------------------------- criteria
@torch.no_grad()
def magnitude_importance(model) -> torch.Tensor:
    """|θ| of every pruned weight (OMP / IMP use it with a global threshold)."""
    weights = _pruned_weights(model)
    device = weights[0].device
    return _flat(w.detach().abs().to(device) for w in weights)


@torch.no_grad()
def kept_magnitude_importance(model) -> torch.Tensor:
    """|θ| of the weights the current mask keeps and -1 (below every magnitude) for the ones it prunes, so that a
    selection that prunes at least as many weights as now prunes every pruned one again (IMP: pruned weights never
    come back; the layer floors keep the largest kept weights, which the current mask already keeps)."""
    importance = magnitude_importance(model)
    return importance.masked_fill_(model.sparsity.mask().to(importance.device) == 0, -1.0)


@torch.no_grad()
def random_importance(model, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random importances (use a layerwise threshold for a uniform per-layer random mask). Drawn on the
    generator's device (else the model's, from the global RNG), returned on the model's device."""
    _layers(model)
    n = model.sparsity.numel
    device = _device(model)
    if generator is not None:
        return torch.rand(n, generator=generator, device=generator.device).to(device)
    return torch.rand(n, device=device)


def snip_importance(model, batches, *, use_prompt: bool = False, train_mode: bool = False) -> torch.Tensor:
    """SNIP connection sensitivity |θ ⊙ g|, g = gradient of the summed per-batch (mean cross-entropy) losses of
    the dense network w.r.t. the pruned weights. `train_mode=False` scores with eval-mode norm layers (running
    statistics) and no dropout; `train_mode=True` with batch statistics (the model's stored statistics are
    still left untouched)."""
    batches = _materialise(batches, "snip")
    with _modes(model, train_mode):
        state, leaves = _functional_state(model, train_mode)
        grads = [torch.zeros_like(leaf) for leaf in leaves]
        for batch in batches:
            loss = _loss(model, state, batch, use_prompt)
            for acc, g in zip(grads, torch.autograd.grad(loss, leaves)):
                acc.add_(g)
    with torch.no_grad():
        return _flat(leaf.detach() * g for leaf, g in zip(leaves, grads)).abs_()


def grasp_hessian_gradient(
    model, batches, *, use_prompt: bool = False, temperature: float = 200.0, train_mode: bool = False
) -> torch.Tensor:
    """Flat Hg (GraSP): g = Σ_b ∇L_b, Hg = Σ_b ∇(∇L_b · stop_grad(g)), over the pruned weights of the dense
    network, with logits divided by `temperature` in the losses (GraSP's T = 200)."""
    batches = _materialise(batches, "grasp")
    # Fused attention kernels (flash / memory-efficient) have no double backward; the math kernel does.
    with _modes(model, train_mode), sdpa_kernel(SDPBackend.MATH):
        state, leaves = _functional_state(model, train_mode)
        g = [torch.zeros_like(leaf) for leaf in leaves]
        for batch in batches:
            loss = _loss(model, state, batch, use_prompt, temperature)
            for acc, gb in zip(g, torch.autograd.grad(loss, leaves)):
                acc.add_(gb)
        hg = [torch.zeros_like(leaf) for leaf in leaves]
        for batch in batches:
            loss = _loss(model, state, batch, use_prompt, temperature)
            grad = torch.autograd.grad(loss, leaves, create_graph=True)
            z = sum((gi * fi).sum() for gi, fi in zip(g, grad))
            for acc, h in zip(hg, torch.autograd.grad(z, leaves)):
                acc.add_(h)
    return _flat(h.detach() for h in hg)


def grasp_importance(
    model, batches, *, use_prompt: bool = False, temperature: float = 200.0, train_mode: bool = False
) -> torch.Tensor:
    """GraSP: S = -θ ⊙ Hg and GraSP prunes the *largest* S (removing them least reduces the gradient flow), so
    the importance is -S = θ ⊙ Hg (prune the smallest). Batches are iterated twice (a one-shot iterator is
    materialised into a list)."""
    hg = grasp_hessian_gradient(model, batches, use_prompt=use_prompt, temperature=temperature, train_mode=train_mode)
    with torch.no_grad():
        theta = _flat(w.detach().to(hg.device) for w in _pruned_weights(model))
        return theta * hg


@contextlib.contextmanager
def _without_ceilings(model):
    """Clipping activations (nn.ReLU6, nn.Hardtanh) lose their upper bound for the duration: SynFlow's linearised
    network must be positively homogeneous. On an all-ones input with |θ| the activations grow far past 6, a
    ReLU6 saturates, its gradient is zero, and every layer before it scores 0 and is pruned whole (EfficientNet-
    Lite0 and MobileNetV2 lost 47 of 50 layers at 70% before this)."""
    # An instance attribute, not a hook: ReLU6(inplace=True) clips its input before any forward hook sees it.
    patched = []
    for module in model.modules():
        if isinstance(module, torch.nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            patched.append((module, vars(module).get("forward")))
            module.forward = lambda x, floor=module.min_val: torch.clamp(x, min=floor)
    try:
        yield
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = previous


def _synflow_scores(model, state, leaves, mask, x) -> torch.Tensor:
    for layer, leaf in zip(model.sparsity.layers, leaves):
        state[layer.param_name] = leaf * mask[layer.offset : layer.offset + layer.numel].view(layer.shape)
    out = functional_call(model.model, state, (x,), dict(model._forward_kwargs), strict=False)
    r = _mapped_logits(model, out.logits).sum()
    grads = torch.autograd.grad(r, leaves)
    with torch.no_grad():
        return _flat(g * leaf for g, leaf in zip(grads, leaves)).abs_()


def synflow_importance(
    model,
    sparsity: float,
    *,
    iterations: int = 100,
    input_size: int | tuple[int, int] | None = None,
    threshold: str = "global",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """SynFlow (Tanaka et al. 2020), data-free and iterative. The network is linearised (|θ| for every parameter and
    |running statistics| of batch norms, eval mode, clipping activations such as ReLU6 without their ceiling),
    fed one all-ones input of `input_size` (default: the canvas `config.output_size` the base model sees), and R = Σ logits (label-mapped when a mapping is set);
    score = |∂R/∂θ ⊙ θ| with the current mask applied. Iteration i = 1..n keeps the top (1-s)^(i/n) of the
    weights (exactly `num_pruned(sparsity, N)` pruned at the end), already-pruned weights staying pruned.

    Returns the last iteration's scores with the weights pruned before it set to -1 (below every score), so that
    `mask_from_importance(model, result, sparsity, threshold)` reproduces SynFlow's final mask exactly. Computed in
    `dtype` (float64 by default: products of |θ| over many layers overflow or underflow in float32) and returned in
    that dtype (casting could merge distinct scores)."""
    sparsity = _check_sparsity(sparsity)
    threshold = _check_threshold(threshold)
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    iterations = int(iterations)
    layers = _layers(model)
    if input_size is None:
        input_size = model.config.output_size
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    device = _device(model)
    x = torch.ones(1, model.config.num_channels, h, w, device=device, dtype=dtype)
    with _modes(model, False), _without_ceilings(model.model):
        state, leaves = _functional_state(model, train_mode=False, dtype=dtype, linearise=True)
        mask = torch.ones(model.sparsity.numel, device=device, dtype=dtype)
        importance = None
        nm = _nm(model, sparsity)
        for i in range(1, iterations + 1):
            s_i = sparsity if i == iterations else 1.0 - (1.0 - sparsity) ** (i / iterations)
            scores = _synflow_scores(model, state, leaves, mask, x)
            if not torch.isfinite(scores).all():
                raise FloatingPointError(
                    f"SynFlow scores overflowed in {dtype} at iteration {i}; use dtype=torch.float64 (the default) "
                    "or a smaller input_size."
                )
            importance = scores.masked_fill_(mask == 0, -1.0)
            # N:M: the same schedule per group (4 -> 3 -> 2 kept of 4 for 2:4), exactly N at the end.
            nm_i = None if nm is None else (nm_keep_schedule(nm[0], nm[1], i, iterations), nm[1])
            mask = _select(importance, layers, s_i, threshold, model.sparsity.floors(), nm=nm_i).to(dtype)
    return importance


# --------------------------------------------------------------------------------------------------- masks
def _prune_smallest_(values: torch.Tensor, out: torch.Tensor, k: int) -> None:
    """out[j] = 0 for the k smallest values (ties at the threshold: the first positions are pruned), else 1."""
    n = values.numel()
    if k <= 0:
        out.fill_(1)
        return
    if k >= n:
        out.zero_()
        return
    tau = torch.kthvalue(values, k).values
    below = values < tau
    out.copy_(~below)
    need = k - int(below.sum())  # >= 1: how many of the values equal to tau to prune
    tied = torch.nonzero(values == tau).flatten()
    out[tied[:need]] = 0


def _nm(model, sparsity: float) -> tuple[int, int] | None:
    """The model's N:M pattern as (N, M), or None; refuses a `sparsity` the pattern does not give."""
    pattern = getattr(model.config, "nm_pattern", None)
    if pattern is None:
        return None
    if abs(sparsity - nm_sparsity(pattern)) > 1e-9:
        raise ValueError(f"sparsity={sparsity} conflicts with the model's nm_pattern={pattern!r}, which prunes "
                         f"exactly {nm_sparsity(pattern):g} of every eligible layer; pass sparsity="
                         f"{nm_sparsity(pattern):g}.")
    return parse_nm(pattern)


@torch.no_grad()
def _select(importance: torch.Tensor, layers, sparsity: float, threshold: str, floors=(),
            nm: tuple[int, int] | None = None) -> torch.Tensor:
    values = importance.detach().reshape(-1)
    mask = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    if nm is not None:  # N:M: the N largest importances of every group; threshold and floors do not apply
        nm_mask_(values, mask, layers, *nm)
    elif threshold == "global":
        select_with_floors_(values, mask, num_pruned(sparsity, values.numel()), _prune_smallest_, list(floors))
    else:
        for layer in layers:
            sl = slice(layer.offset, layer.offset + layer.numel)
            inside = [Floor(f.start - layer.offset, f.length, f.min_keep) for f in floors
                      if layer.offset <= f.start < layer.offset + layer.numel]
            select_with_floors_(values[sl], mask[sl], num_pruned(sparsity, layer.numel), _prune_smallest_, inside)
    return mask


def mask_from_importance(model, importance: torch.Tensor, sparsity: float, threshold: str = "global") -> torch.Tensor:
    """Flat 0/1 float mask pruning exactly `num_pruned(sparsity, N)` weights of smallest importance over all pruned
    layers (`threshold="global"`), or `num_pruned(sparsity, layer.numel)` in every layer (`"layerwise"`). Works on
    the raw (possibly negative) importances; ties at the threshold are broken by position (earlier ones pruned).
    A model with `config.nm_pattern` ("N:M") keeps instead the N largest importances of every M consecutive weights
    along the input dimension (its ineligible layers dense); `sparsity` must then be 1 - N/M."""
    sparsity = _check_sparsity(sparsity)
    threshold = _check_threshold(threshold)
    layers = _layers(model)
    if importance.numel() != model.sparsity.numel:
        raise ValueError(
            f"importance has {importance.numel()} entries but the pruned layers hold {model.sparsity.numel} weights."
        )
    if torch.isnan(importance).any():
        raise ValueError("importance contains NaN; cannot rank the weights.")
    return _select(importance, layers, sparsity, threshold, model.sparsity.floors(), nm=_nm(model, sparsity))


# --------------------------------------------------------------------------------------------------- one shot
PRUNERS = {
    "magnitude": magnitude_importance,
    "kept_magnitude": kept_magnitude_importance,
    "random": random_importance,
    "snip": snip_importance,
    "grasp": grasp_importance,
    "synflow": synflow_importance,
}
DATA_DRIVEN = ("snip", "grasp")
DEFAULT_THRESHOLD = {
    "magnitude": "global",
    "kept_magnitude": "global",
    "random": "layerwise",  # uniform per-layer sparsity (VPNS.md §7)
    "snip": "global",
    "grasp": "global",
    "synflow": "global",
}


def criterion_importance(model, criterion: str, sparsity: float, *, batches=None, threshold: str = "global",
                         generator: torch.Generator | None = None, synflow_iterations: int = 100,
                         use_prompt: bool = False) -> torch.Tensor:
    """The flat importances (larger = keep) of one of `PRUNERS` (see `prune_once` for the arguments)."""
    if criterion not in PRUNERS:
        raise ValueError(f"unknown pruning criterion {criterion!r}; known: {sorted(PRUNERS)}.")
    if criterion in DATA_DRIVEN:
        batches = _materialise(batches, criterion)
    if criterion == "magnitude":
        return magnitude_importance(model)
    if criterion == "kept_magnitude":
        return kept_magnitude_importance(model)
    if criterion == "random":
        return random_importance(model, generator=generator)
    if criterion == "snip":
        return snip_importance(model, batches, use_prompt=use_prompt)
    if criterion == "grasp":
        return grasp_importance(model, batches, use_prompt=use_prompt)
    return synflow_importance(model, sparsity, iterations=synflow_iterations, threshold=threshold)


def init_scores_from_criterion(model, criterion: str, *, batches=None, generator: torch.Generator | None = None,
                               synflow_iterations: int = 100, use_prompt: bool = False) -> dict:
    """Initialise a score search (trainable `model.sparsity.scores`) at a one-shot criterion's mask.

    The scores are the criterion's importances (shifted to be >= 0 when it has negative ones), times one global
    factor that puts the threshold where HYDRA's scaled init puts it (so learning rates tuned for that scale keep
    their meaning), with the sign of the weight (as the scaled init). Exactness: the hard mask of the new scores is
    the criterion's own mask (`mask_from_importance`, the model's threshold kind and layer floors), ties at the
    threshold included: kept entries that rounding left at or below the largest pruned score are nudged just above
    it. Returns {"criterion", "threshold", "scale"}."""
    from ..sparsity.unstructured import scaled_scores

    sp = model.sparsity
    if sp is None or sp.frozen:
        raise ValueError(f"score_init={criterion!r} needs trainable mask scores (a score search: vpns, hydra, bip); "
                         "this model holds a fixed mask.")
    sparsity, threshold = sp.sparsity, sp.threshold
    importance = criterion_importance(model, criterion, sparsity, batches=batches, threshold=threshold,
                                      generator=generator, synflow_iterations=synflow_iterations,
                                      use_prompt=use_prompt)
    with torch.no_grad():
        return _install_criterion_scores(model, criterion, importance)


def _install_criterion_scores(model, criterion: str, importance: torch.Tensor) -> dict:
    from ..sparsity.unstructured import scaled_scores

    sp = model.sparsity
    sparsity, threshold = sp.sparsity, sp.threshold
    mask = mask_from_importance(model, importance, sparsity, threshold).to(sp.scores.device)
    weights = torch.cat([w.detach().reshape(-1) for w in _pruned_weights(model)]).to(sp.scores.device)
    scaled = torch.cat([scaled_scores(w.detach()).reshape(-1) for w in _pruned_weights(model)]).to(weights.device)
    k = num_pruned(sparsity, sp.numel)
    values = importance.detach().to(weights.device, torch.float64)
    if values.min() < 0:  # GraSP, SynFlow's pruned entries: a monotone shift keeps the order
        values = values - values.min()
    pruned = mask == 0
    if k == 0 or not bool(pruned.any()):
        ref, tau = 1.0, 1.0
    else:
        ref = float(torch.kthvalue(scaled.abs().double(), k).values)
        tau = float(values[pruned].max())
        if tau <= 0:  # every pruned importance is 0: scale by the smallest kept one instead
            kept_values = values[~pruned]
            tau = float(kept_values[kept_values > 0].min()) if bool((kept_values > 0).any()) else 1.0
    scale = (ref / tau) if ref > 0 else 1.0
    magnitude = (values * scale).to(torch.float32)
    groups = [slice(0, sp.numel)] if threshold == "global" else [
        slice(layer.offset, layer.offset + layer.numel) for layer in sp.layers]
    if sp.nm_pattern is None:
        for sl in groups:  # the exact boundary: every kept score strictly above every pruned one
            p, m = pruned[sl], magnitude[sl]
            if bool(p.any()) and bool((~p).any()):
                top = m[p].max()
                low = (~p) & (m <= top)
                m[low] = torch.nextafter(top, torch.tensor(float("inf"), device=top.device))
    sign = torch.where(weights < 0, -1.0, 1.0).to(magnitude)
    sp.scores.copy_(sign * magnitude)
    sp.update_mask()
    if not torch.equal(sp.mask().to(mask), mask):
        logger.warning("score_init=%s: %d entries of the first mask differ from the criterion's (exact ties in an "
                       "N:M group)", criterion, int((sp.mask().to(mask) != mask).sum()))
    return {"criterion": criterion, "threshold": float(ref), "scale": float(scale)}


def score_threshold(model) -> float:
    """The scores' scale at the threshold: the k-th smallest |score| (k = the number of pruned weights); for a
    global threshold this is the threshold itself. The `auto` score learning rate is tied to it."""
    sp = model.sparsity
    k = num_pruned(sp.sparsity, sp.numel)
    if k == 0:
        return float(sp.scores.detach().abs().max())
    return float(torch.kthvalue(sp.scores.detach().abs().float().cpu(), k).values)


def prune_once(
    model,
    criterion: str,
    sparsity: float,
    *,
    batches=None,
    threshold: str | None = None,
    generator: torch.Generator | None = None,
    synflow_iterations: int = 100,
    use_prompt: bool = False,
) -> torch.Tensor:
    """Score the dense network with `criterion` (one of `PRUNERS`), prune exactly `num_pruned(sparsity, ·)` weights
    (random: per layer by default, the others: globally), install the mask with `model.set_mask` and return it
    (flat 0/1 float). `config.sparsity` is set to `sparsity`. `batches` (SNIP, GraSP): an iterable of
    `{"pixel_values", "labels"}` dicts on the model's device; `use_prompt` passes them through the prompt.
    With `config.nm_pattern` ("N:M") the mask keeps the N most important of every M weights along the input
    dimension of each eligible layer instead (`sparsity` must be 1 - N/M; `threshold` does not apply)."""
    if criterion not in PRUNERS:
        raise ValueError(f"unknown pruning criterion {criterion!r}; known: {sorted(PRUNERS)}.")
    sparsity = _check_sparsity(sparsity)
    threshold = _check_threshold(threshold or DEFAULT_THRESHOLD[criterion])
    _layers(model)
    nm = _nm(model, sparsity)  # checked before any scoring work
    if criterion == "kept_magnitude":
        before = model.sparsity.mask().clone()
    importance = criterion_importance(model, criterion, sparsity, batches=batches, threshold=threshold,
                                      generator=generator, synflow_iterations=synflow_iterations,
                                      use_prompt=use_prompt)
    mask = mask_from_importance(model, importance, sparsity, threshold)
    if criterion == "kept_magnitude" and bool(((mask > 0) & (before.to(mask.device) == 0)).any()):
        raise ValueError(f"kept_magnitude pruning to sparsity {sparsity} would restore pruned weights: the target "
                         "must prune at least as many weights as the current mask does.")
    model.set_mask(mask)
    model.config.sparsity = sparsity
    model.sparsity.sparsity = sparsity
    logger.info(
        "%s pruning (%s): %d of %d weights pruned", criterion,
        f"{threshold} threshold" if nm is None else f"{nm[0]}:{nm[1]} pattern", int(mask.numel() - mask.sum()),
        mask.numel(),
    )
    return mask


__all__ = [
    "PRUNERS",
    "criterion_importance",
    "init_scores_from_criterion",
    "score_threshold",
    "grasp_hessian_gradient",
    "grasp_importance",
    "kept_magnitude_importance",
    "magnitude_importance",
    "mask_from_importance",
    "prune_once",
    "random_importance",
    "snip_importance",
    "synflow_importance",
]
