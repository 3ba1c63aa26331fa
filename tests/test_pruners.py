"""One-shot pruning baselines (VPNS.md §7): magnitude, random, SNIP, GraSP, SynFlow as flat importances; exact
sparsities; hand/autograd/finite-difference checks of the scores; the model is left exactly as it was found."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHITECTURES, IMAGE_SIZE, tiny_model
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.methods.pruners import (
    PRUNERS,
    grasp_hessian_gradient,
    grasp_importance,
    magnitude_importance,
    mask_from_importance,
    prune_once,
    random_importance,
    snip_importance,
    synflow_importance,
)
from prompt_sparsity.sparsity.unstructured import num_pruned

S = IMAGE_SIZE
GLOBAL = ["magnitude", "snip", "grasp", "synflow"]


def wrap(arch="resnet_basic", sparsity=0.9, **kwargs):
    kwargs.setdefault("input_size", S)
    kwargs.setdefault("output_size", S)
    kwargs.setdefault("pad_size", 4)
    return PromptedSparseModel.from_base(tiny_model(arch), sparsity=sparsity, **kwargs)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(n, 3, S, S, generator=g), "labels": torch.randint(0, 10, (n,), generator=g)}


def layer_slice(layer):
    return slice(layer.offset, layer.offset + layer.numel)


def flat_weights(model):
    params = dict(model.model.named_parameters())
    return torch.cat([params[layer.param_name].detach().flatten() for layer in model.sparsity.layers])


def importance(model, criterion, batches, **kwargs):
    if criterion == "magnitude":
        return magnitude_importance(model)
    if criterion == "random":
        return random_importance(model, generator=torch.Generator().manual_seed(0))
    if criterion == "snip":
        return snip_importance(model, batches, **kwargs)
    if criterion == "grasp":
        return grasp_importance(model, batches, **kwargs)
    return synflow_importance(model, 0.9, iterations=3)


# ------------------------------------------------------------------------------------------- exact sparsity
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_criterion_reaches_the_exact_sparsity(arch):
    model = wrap(arch)
    n = model.sparsity.numel
    for criterion in PRUNERS:
        mask = prune_once(model, criterion, 0.8, batches=[batch(2)], synflow_iterations=2,
                          generator=torch.Generator().manual_seed(3))
        assert mask.shape == (n,) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert model.sparsity.frozen and torch.equal(model.sparsity.mask(), mask)
        if criterion == "random":  # layerwise by default
            for layer in model.sparsity.layers:
                assert layer.numel - int(mask[layer_slice(layer)].sum()) == num_pruned(0.8, layer.numel)
        else:
            assert model.sparsity_report()["pruned"] == num_pruned(0.8, n), criterion
    assert model.config.sparsity == 0.8 and model.config.mask_format == "packed"


def test_magnitude_keeps_exactly_the_largest_weights_globally():
    model = wrap()
    mask = prune_once(model, "magnitude", 0.9)
    w = flat_weights(model).abs()
    assert torch.equal(magnitude_importance(model), w)
    kept, pruned = w[mask.bool()], w[~mask.bool()]
    assert pruned.numel() == num_pruned(0.9, w.numel())
    assert kept.min() >= pruned.max()
    expected = torch.zeros_like(w)
    expected[torch.topk(w, w.numel() - pruned.numel()).indices] = 1
    assert torch.equal(mask, expected)  # no ties among random float weights: the selection is unique


def test_random_is_uniform_per_layer_and_reproducible():
    model = wrap()
    a = prune_once(model, "random", 0.7, generator=torch.Generator().manual_seed(5))
    b = prune_once(model, "random", 0.7, generator=torch.Generator().manual_seed(5))
    c = prune_once(model, "random", 0.7, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for layer in model.sparsity.layers:
        assert layer.numel - int(a[layer_slice(layer)].sum()) == num_pruned(0.7, layer.numel)
    g = prune_once(model, "random", 0.7, threshold="global", generator=torch.Generator().manual_seed(5))
    assert g.numel() - int(g.sum()) == num_pruned(0.7, g.numel())


def test_mask_from_importance_handles_negative_values_and_ties():
    model = wrap(min_layer_density=0.0)  # the raw selection (the collapse floor is tested on its own)
    n = model.sparsity.numel
    imp = torch.linspace(-1.0, 1.0, n).flip(0)  # negative values; larger = keep
    imp[100:300] = 0.0  # a block of ties around the middle
    for sparsity in (0.0, 0.3, 0.5, 0.9, 1.0):
        mask = mask_from_importance(model, imp, sparsity)
        k = num_pruned(sparsity, n)
        assert n - int(mask.sum()) == k
        if 0 < k < n:
            assert imp[mask.bool()].min() >= imp[~mask.bool()].max()
    ties = torch.zeros(n)
    mask = mask_from_importance(model, ties, 0.5)
    assert torch.equal(mask[: n // 2], torch.zeros(n // 2))  # equal importances: earlier positions pruned first
    layerwise = mask_from_importance(model, imp, 0.6, threshold="layerwise")
    for layer in model.sparsity.layers:
        assert layer.numel - int(layerwise[layer_slice(layer)].sum()) == num_pruned(0.6, layer.numel)


# ------------------------------------------------------------------------------------------- SNIP
def test_snip_matches_hand_computed_and_ignores_the_current_mask():
    model = wrap()
    b1, b2 = batch(4, seed=1), batch(3, seed=2)
    imp = snip_importance(model, [b1, b2])
    # The dense network, whatever mask is installed.
    prune_once(model, "magnitude", 0.9)
    assert torch.allclose(snip_importance(model, iter([b1, b2])), imp)

    ref = copy.deepcopy(model)
    ref.eval()
    ref.set_mask(torch.ones(ref.sparsity.numel))
    for b in (b1, b2):  # gradients accumulate in .grad: the gradient of the summed losses
        ref(b["pixel_values"], labels=b["labels"], use_prompt=False).loss.backward()
    params = dict(ref.model.named_parameters())
    for layer in (ref.sparsity.layers[0], ref.sparsity.layers[3], ref.sparsity.layers[-1]):
        p = params[layer.param_name]
        expected = (p.detach() * p.grad).abs().flatten()
        torch.testing.assert_close(imp[layer_slice(layer)], expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- GraSP
def _grasp_reference_loss(model, b, temperature):
    """Mean cross-entropy of the dense eval-mode network as a function of the flat pruned weights."""
    layers = model.sparsity.layers
    x = model.prompt.normalize(b["pixel_values"])

    def f(flat):
        params = {layer.param_name: flat[layer_slice(layer)].view(layer.shape) for layer in layers}
        logits = functional_call(model.model, params, (x,), strict=False).logits
        return F.cross_entropy(logits / temperature, b["labels"])

    return f


def test_grasp_hessian_gradient_matches_hvp_and_finite_differences():
    model = wrap().double().eval()
    b = batch(4)
    b["pixel_values"] = b["pixel_values"].double()
    T = 200.0
    hg = grasp_hessian_gradient(model, [b], temperature=T)
    f = _grasp_reference_loss(model, b, T)
    w = flat_weights(model).clone()
    wl = w.clone().requires_grad_(True)
    g = torch.autograd.grad(f(wl), wl)[0]
    _, hvp = torch.autograd.functional.hvp(f, w, g)
    torch.testing.assert_close(hg, hvp, rtol=1e-6, atol=1e-6 * hvp.abs().max().item())

    def grad_at(v):
        v = v.clone().requires_grad_(True)
        return torch.autograd.grad(f(v), v)[0]

    eps = 1e-6 / g.norm().item()  # small: ReLU/max-pool kinks must not be crossed
    fd = (grad_at(w + eps * g) - grad_at(w - eps * g)) / (2 * eps)
    assert (fd - hg).norm() / hg.norm() < 1e-6, float((fd - hg).norm() / hg.norm())

    # importance = -S = θ ⊙ Hg; pruning removes the smallest importance, i.e. GraSP's largest S.
    imp = grasp_importance(model, [b], temperature=T)
    torch.testing.assert_close(imp, w * hg)
    mask = prune_once(model, "grasp", 0.9, batches=[b])
    s = -grasp_importance(model, [b])
    assert s[~mask.bool()].min() >= s[mask.bool()].max()


def test_grasp_and_snip_work_on_attention_models():
    model = wrap("vit")  # fused attention kernels have no double backward: GraSP must avoid them
    imp = grasp_importance(model, [batch(2)])
    assert imp.shape == (model.sparsity.numel,) and torch.isfinite(imp).all() and imp.abs().sum() > 0


# ------------------------------------------------------------------------------------------- SynFlow
def test_synflow_single_iteration_matches_hand_computed_linearised_flow():
    model = wrap()
    imp = synflow_importance(model, 0.5, iterations=1)
    assert imp.dtype == torch.float64
    # One iteration: nothing is pruned before it, so the importance is the dense score itself.
    torch.testing.assert_close(imp, _linearised_reference_scores(model), rtol=1e-10, atol=0.0)


def _linearised_reference_scores(model, relu6_ceiling: bool = False) -> torch.Tensor:
    """|∂R/∂θ ⊙ θ| of a hand-linearised copy (|θ|, |running stats|, float64, all-ones input); ReLU6 swapped for
    ReLU unless `relu6_ceiling`."""
    ref = copy.deepcopy(model.model).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
        for m in ref.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.abs_()
                m.running_var.abs_()
    if not relu6_ceiling:
        for name, m in list(ref.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, torch.nn.ReLU6):
                    setattr(m, child_name, torch.nn.ReLU())
    ref.zero_grad()
    ref(torch.ones(1, 3, S, S, dtype=torch.float64)).logits.sum().backward()
    params = dict(ref.named_parameters())
    return torch.cat(
        [(params[layer.param_name].grad * params[layer.param_name]).abs().flatten() for layer in model.sparsity.layers]
    )


def test_synflow_lifts_the_relu6_ceiling_so_no_layer_collapses():
    # MobileNetV2 uses ReLU6; with |θ| on an all-ones input the activations pass 6, a saturated ReLU6 passes no
    # gradient, and every earlier layer scored 0 (pruned whole). Weights are scaled up so saturation is certain.
    model = wrap("mobilenet_v2")
    with torch.no_grad():
        for layer in model.sparsity.layers:
            dict(model.model.named_parameters())[layer.param_name].mul_(10.0)
    saturated = _linearised_reference_scores(model, relu6_ceiling=True)
    dead = [layer for layer in model.sparsity.layers if saturated[layer_slice(layer)].max() == 0]
    assert len(dead) > len(model.sparsity.layers) // 2  # the failure this guards against is really provoked
    imp = synflow_importance(model, 0.5, iterations=1)
    torch.testing.assert_close(imp, _linearised_reference_scores(model, relu6_ceiling=False), rtol=1e-10, atol=0.0)
    mask = prune_once(model, "synflow", 0.7, synflow_iterations=5)
    assert all(mask[layer_slice(layer)].sum() > 0 for layer in model.sparsity.layers)
    # the activations got their own forward back
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Hardtanh))
    x = torch.full((1, 3, S, S), 50.0)
    relu6 = next(m for m in model.modules() if isinstance(m, torch.nn.ReLU6))
    assert relu6(x).max() == 6.0


def test_synflow_is_iterative_exact_and_consistent_with_its_importance():
    model = wrap(min_layer_density=0.0)  # the raw selection (the collapse floor is tested on its own)
    n = model.sparsity.numel
    imp = synflow_importance(model, 0.9, iterations=8)
    mask = prune_once(model, "synflow", 0.9, synflow_iterations=8)
    assert n - int(mask.sum()) == num_pruned(0.9, n)
    assert torch.equal(mask_from_importance(model, imp, 0.9), mask)
    assert imp[mask.bool()].min() >= imp[~mask.bool()].max()
    one_shot = mask_from_importance(model, synflow_importance(model, 0.9, iterations=1), 0.9)
    assert not torch.equal(mask, one_shot)  # iterating changes the result
    assert not torch.equal(mask, mask_from_importance(model, magnitude_importance(model), 0.9))
    assert not torch.equal(mask, mask_from_importance(model, imp, 0.5))  # at a lower sparsity more is kept...
    assert torch.all(mask_from_importance(model, imp, 0.5) >= mask)  # ...a superset


# ------------------------------------------------------------------------------------------- state
def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(n, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        model.sparsity.mask().clone(),
    )


def _assert_same(a, b):
    state_a, modes_a, params_a, mask_a = a
    state_b, modes_b, params_b, mask_b = b
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert modes_a == modes_b
    assert [(n, r) for n, r, _ in params_a] == [(n, r) for n, r, _ in params_b]
    assert all(ga is None and gb is None for (_, _, ga), (_, _, gb) in zip(params_a, params_b))
    assert torch.equal(mask_a, mask_b)


@pytest.mark.parametrize("mask_format", ["scores", "packed"])
def test_computing_importances_leaves_the_model_untouched(mask_format):
    model = wrap(mask_format=mask_format)
    if mask_format == "scores":
        model.start_mask_search()  # weights frozen, scores trainable, train mode
    else:
        prune_once(model, "random", 0.9)
        model.start_finetuning(train_prompt=False)
    model.model.classifier.eval()  # mixed modes must come back as they were
    before = _snapshot(model)
    b = [batch(4)]
    for criterion in PRUNERS:
        importance(model, criterion, b)
        _assert_same(before, _snapshot(model))
    for criterion in ("snip", "grasp"):  # batch statistics: the stored running statistics still stay put
        importance(model, criterion, b, train_mode=True, use_prompt=True)
        _assert_same(before, _snapshot(model))


# ------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    model = wrap()
    with pytest.raises(ValueError, match=r"unknown pruning criterion 'obd'.*grasp.*magnitude.*random.*snip.*synflow"):
        prune_once(model, "obd", 0.9)
    for criterion in ("snip", "grasp"):
        with pytest.raises(ValueError, match="data-driven"):
            prune_once(model, criterion, 0.9)
        with pytest.raises(ValueError, match="no batches"):
            prune_once(model, criterion, 0.9, batches=iter([]))
    with pytest.raises(ValueError, match="pixel_values"):
        snip_importance(model, [torch.zeros(2)])
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_once(model, "magnitude", 1.5)
    with pytest.raises(ValueError, match="threshold"):
        prune_once(model, "magnitude", 0.5, threshold="per-channel")
    with pytest.raises(ValueError, match="entries"):
        mask_from_importance(model, torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        mask_from_importance(model, torch.full((model.sparsity.numel,), float("nan")), 0.5)
    with pytest.raises(ValueError, match="iterations"):
        synflow_importance(model, 0.5, iterations=0)
    dense = PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity_type="none", input_size=S, output_size=S,
                                           pad_size=4)
    with pytest.raises(ValueError, match="no unstructured sparsity"):
        magnitude_importance(dense)
