"""PASS building blocks: FLOPs-targeted channel selection, the recurrent prompt hypernetwork, and the structured
baselines' channel importances, on tiny random models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from prompt_sparsity.methods.channel_pruners import (
    CHANNEL_CRITERIA,
    bn_scale_importance,
    channel_importance,
    depgraph_importance,
    importance_masks,
    l1_importance,
    normalise_per_unit,
    random_importance,
    taylor_importance,
)
from prompt_sparsity.sparsity.channels import ChannelMasker, find_channel_units
from prompt_sparsity.sparsity.flops import FlopsModel
from prompt_sparsity.sparsity.hypernetwork import PromptHyperNetwork, soft_flops_penalty, weight_statistics
from prompt_sparsity.sparsity.selection import min_channel_counts, select_global, select_uniform, straight_through

from tiny_models import IMAGE_SIZE, tiny_model

_CACHE = {}


def _wide_bottleneck():
    """A ResNet bottleneck whose prunable units carry most FLOPs (the shared tiny one can only reach ~83%)."""
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[128, 256], depths=[1, 1], layer_type="bottleneck",
                          num_labels=10)
    return ResNetForImageClassification(config).eval()


def _setup(arch):
    """(model, units, FlopsModel), built once per arch."""
    if arch not in _CACHE:
        model = _wide_bottleneck() if arch == "resnet_bottleneck_wide" else tiny_model(arch)
        for p in model.parameters():
            p.requires_grad_(False)
        units = find_channel_units(model)
        _CACHE[arch] = (model, units, FlopsModel(model, IMAGE_SIZE, units))
    return _CACHE[arch]


def _random_scores(units, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(u.num_channels, generator=g) for u in units]


def _ratio(fm, masks):
    return fm.flops(masks) / fm.dense_flops


SELECT_ARCHS = ["resnet_bottleneck_wide", "mobilenet_v2", "timm_efficientnet"]


# --------------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("arch", SELECT_ARCHS)
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_select_global_meets_flops_target(arch, ratio):
    _, units, fm = _setup(arch)
    scores = _random_scores(units)
    masks = select_global(scores, fm, ratio)
    assert [m.shape for m in masks] == [(u.num_channels,) for u in units]
    assert all(bool(((m == 0) | (m == 1)).all()) and m.sum() >= 1 for m in masks)
    assert abs(_ratio(fm, masks) - ratio) <= 0.02
    # one global threshold: every kept channel scores at least as high as every dropped one (min_channels=1 can
    # force a unit's best channel in, so compare non-forced channels only)
    flat_s, flat_m = torch.cat(scores), torch.cat(masks).bool()
    forced = torch.cat([(s == s.max()) for s in scores])
    if (~flat_m).any():
        assert flat_s[flat_m & ~forced].min() >= flat_s[~flat_m].max()
    assert all(torch.equal(a, b) for a, b in zip(masks, select_global(scores, fm, ratio)))  # deterministic


@pytest.mark.parametrize("arch", SELECT_ARCHS)
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_select_uniform_meets_flops_target(arch, ratio):
    _, units, fm = _setup(arch)
    scores = _random_scores(units, seed=1)
    masks = select_uniform(scores, fm, ratio)
    assert abs(_ratio(fm, masks) - ratio) <= 0.02
    keep = [float(m.sum()) / m.numel() for m in masks]
    sizes = [m.numel() for m in masks]
    # the same ratio everywhere, up to one channel of rounding per unit
    rho = max(k - 1.0 / c for k, c in zip(keep, sizes))
    assert all(k >= rho - 1e-9 for k in keep), keep
    for s, m in zip(scores, masks):  # per-unit top-k
        if (m == 0).any():
            assert s[m.bool()].min() >= s[~m.bool()].max()


def test_min_channels_respected():
    _, units, fm = _setup("mobilenet_v2")
    scores = _random_scores(units, seed=2)
    for select in (select_global, select_uniform):
        masks = select(scores, fm, 0.3, min_channels=8)
        assert all(m.sum() >= min(8, m.numel()) for m in masks)
        masks = select(scores, fm, 0.5, min_channels=0.25)
        assert all(m.sum() >= math.ceil(0.25 * m.numel()) for m in masks)
        for s, m in zip(scores, masks):  # the forced channels are each unit's best
            assert bool(m[s.topk(math.ceil(0.25 * s.numel())).indices].all())
    assert min_channel_counts([10, 3], 4) == [4, 3]
    assert min_channel_counts([10, 30], 0.1) == [1, 3]


def test_target_ratio_errors():
    _, units, fm = _setup("mobilenet_v2")
    scores = _random_scores(units)
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        for select in (select_global, select_uniform):
            with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
                select(scores, fm, bad)
    with pytest.raises(TypeError):
        select_global(scores, fm, True)
    with pytest.raises(ValueError, match="min_channels"):
        select_global(scores, fm, 0.3, min_channels=0)
    # the shared tiny bottleneck cannot go below ~29% of its FLOPs (stem, shortcut and head are not units)
    _, units, fm = _setup("resnet_bottleneck")
    for select in (select_global, select_uniform):
        with pytest.raises(ValueError, match="below the smallest FLOPs ratio reachable with min_channels"):
            select(_random_scores(units), fm, 0.1)
    assert all(m.sum() == m.numel() for m in select_global(_random_scores(units), fm, 1.0))
    for select in (select_global, select_uniform):  # strict=False: the minimal masks, with a warning
        with pytest.warns(UserWarning, match="minimal masks"):
            masks = select(_random_scores(units), fm, 0.1, strict=False)
        assert all(m.sum() == 1 for m in masks)


def test_select_ties_are_deterministic():
    _, units, fm = _setup("timm_efficientnet")
    scores = [torch.full((u.num_channels,), 0.5) for u in units]
    a, b = select_global(scores, fm, 0.5), select_global(scores, fm, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for m in a + select_uniform(scores, fm, 0.5):  # ties by channel index: kept channels are a prefix
        k = int(m.sum())
        assert bool(m[:k].all()) and not bool(m[k:].any())


def test_straight_through():
    soft = [torch.tensor([0.2, 0.9], requires_grad=True), torch.tensor([0.7], requires_grad=True)]
    hard = [torch.tensor([0.0, 1.0]), torch.tensor([1.0])]
    out = straight_through(hard, soft)
    assert all(torch.equal(o.detach(), h) for o, h in zip(out, hard))
    (out[0] * torch.tensor([2.0, 3.0])).sum().add(out[1].sum()).backward()
    assert torch.equal(soft[0].grad, torch.tensor([2.0, 3.0])) and torch.equal(soft[1].grad, torch.tensor([1.0]))


# --------------------------------------------------------------------------------------------------- hypernetwork
def test_hypernetwork_shapes_init_and_reset():
    _, units, _ = _setup("mobilenet_v2")
    sizes = [u.num_channels for u in units]
    torch.manual_seed(3)
    net = PromptHyperNetwork(sizes, hidden_size=32, stat_dim=16)
    stats = [torch.randn(c) for c in sizes]
    prompt = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    probs = net(prompt, stats)
    assert [p.shape for p in probs] == [(c,) for c in sizes]
    assert all(bool((p > 0.99).all()) for p in probs)  # bias +3 / T=0.4: every channel starts on
    noisy = net(prompt, stats, noise=True, generator=torch.Generator().manual_seed(0))
    assert [p.shape for p in noisy] == [(c,) for c in sizes] and not torch.equal(noisy[0], probs[0])
    assert [p.shape for p in net(None, stats)] == [(c,) for c in sizes]  # no-prompt ablation
    assert all(torch.equal(h.bias, torch.full_like(h.bias, 3.0)) for h in net.heads)
    torch.manual_seed(3)
    twin = PromptHyperNetwork(sizes, hidden_size=32, stat_dim=16)
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in net.state_dict().items())
    torch.manual_seed(4)
    net.reset_parameters()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert not torch.equal(state["heads.0.weight"], twin.heads[0].weight)
    torch.manual_seed(4)
    twin.reset_parameters()  # deterministic given the global seed
    assert all(torch.equal(state[k], v) for k, v in twin.state_dict().items())
    assert all(torch.equal(h.bias, torch.full_like(h.bias, 3.0)) for h in twin.heads)
    with pytest.raises(ValueError, match="weight statistics"):
        net(prompt, stats[:-1])


def test_hypernetwork_gradients_through_straight_through_masks():
    model, units, fm = _setup("resnet_bottleneck")
    torch.manual_seed(0)
    net = PromptHyperNetwork([u.num_channels for u in units], hidden_size=16, stat_dim=8)
    prompt = nn.Parameter(0.1 * torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    x, y = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1, 2, 3])
    probs = net(prompt, weight_statistics(model, units), noise=True)
    hard = select_global(probs, fm, 0.9)
    assert any(bool((h == 0).any()) for h in hard)  # something is pruned
    masks = straight_through(hard, probs)
    with ChannelMasker(model, units) as masker:
        masker.set_masks(masks)
        loss = F.cross_entropy(model(x + prompt).logits, y)
    loss = loss + soft_flops_penalty(fm, probs, 0.9)
    loss.backward()
    nonzero = lambda t: t.grad is not None and bool(t.grad.abs().sum() > 0)  # noqa: E731
    assert nonzero(prompt)
    assert nonzero(net.encoder[0].weight) and nonzero(net.encoder[-1].weight)
    assert nonzero(net.lstm.weight_ih_l0) and nonzero(net.lstm.weight_hh_l0)
    assert all(nonzero(h.weight) and nonzero(h.bias) for h in net.heads)
    assert all(nonzero(p.weight) for p in net.stat_proj) and all(nonzero(p.weight) for p in net.mask_proj)
    assert all(p.grad is None for p in model.parameters())  # the backbone stays frozen


def test_weight_statistics():
    model, units, _ = _setup("resnet_bottleneck")
    stats = weight_statistics(model, units)
    assert [s.shape for s in stats] == [(u.num_channels,) for u in units]
    for s in stats:
        assert not s.requires_grad
        assert abs(float(s.mean())) < 1e-5 and abs(float(s.std(unbiased=False)) - 1) < 1e-3
    w = model.get_submodule(units[0].producer).weight
    norms = torch.stack([w[c].norm() for c in range(w.shape[0])])
    assert torch.allclose(stats[0], (norms - norms.mean()) / (norms.std(unbiased=False) + 1e-5), atol=1e-5)
    # unit 1's producer (conv2) reads unit 0's channels: its statistics follow unit 0's mask
    assert units[1].input_unit == units[0].name
    prev = [torch.ones(u.num_channels) for u in units]
    prev[0][::2] = 0
    masked = weight_statistics(model, units, prev_masks=prev)
    w1 = model.get_submodule(units[1].producer).weight[:, 1::2]
    n1 = torch.stack([w1[c].norm() for c in range(w1.shape[0])])
    assert torch.allclose(masked[1], (n1 - n1.mean()) / (n1.std(unbiased=False) + 1e-5), atol=1e-5)
    assert torch.equal(masked[0], stats[0])


def test_soft_flops_penalty():
    _, units, fm = _setup("mobilenet_v2")
    low = [torch.full((u.num_channels,), 0.1, requires_grad=True) for u in units]
    assert float(soft_flops_penalty(fm, low, 0.5).detach()) == 0.0
    high = [torch.full((u.num_channels,), 0.99, requires_grad=True) for u in units]
    pen = soft_flops_penalty(fm, high, 0.5)
    expected = 2.0 * math.log(float(fm.ratio([h.detach() for h in high])) / 0.5)
    assert pen > 0 and abs(float(pen.detach()) - expected) < 1e-4
    pen.backward()
    assert all(bool((h.grad > 0).all()) for h in high)


# --------------------------------------------------------------------------------------------------- baselines
def test_l1_bn_random_importances():
    model, units, _ = _setup("timm_efficientnet")
    l1, bn = l1_importance(model, units), bn_scale_importance(model, units)
    rnd = random_importance(units, torch.Generator().manual_seed(0))
    for scores in (l1, bn, rnd):
        assert [s.shape for s in scores] == [(u.num_channels,) for u in units]
    w = model.get_submodule(units[1].producer).weight
    assert torch.allclose(l1[1], torch.stack([w[c].abs().sum() for c in range(w.shape[0])]))
    gamma = model.get_submodule(units[1].norms[0]).weight
    assert torch.equal(bn[1], gamma.detach().abs())
    assert all(torch.equal(a, b) for a, b in zip(rnd, random_importance(units, torch.Generator().manual_seed(0))))
    for name in ("l1", "bn_scale", "random"):
        assert len(channel_importance(name, model, units, generator=torch.Generator())) == len(units)
    with pytest.raises(ValueError, match="unknown channel criterion"):
        channel_importance("l2", model, units)
    with pytest.raises(ValueError, match="needs batches"):
        channel_importance("taylor", model, units)
    convnext = tiny_model("convnext")
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_scale_importance(convnext, find_channel_units(convnext))
    assert CHANNEL_CRITERIA == {"l1", "taylor", "bn_scale", "random", "depgraph"}


def test_normalise_and_masks_from_importances():
    _, units, fm = _setup("mobilenet_v2")
    scores = [s * (i + 1) for i, s in enumerate(_random_scores(units))]
    norm = normalise_per_unit(scores)
    assert all(abs(float(s.mean()) - 1) < 1e-5 for s in norm)
    assert all(abs(float(s.max()) - 1) < 1e-6 for s in normalise_per_unit(scores, "max"))
    for mode in ("global", "uniform"):
        assert abs(_ratio(fm, importance_masks(scores, fm, 0.5, mode=mode)) - 0.5) <= 0.02
    with pytest.raises(ValueError, match="negative"):
        normalise_per_unit([torch.tensor([-1.0, 1.0])])


def test_taylor_matches_direct_gradient():
    model, units, _ = _setup("resnet_bottleneck")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.tensor([1, 5])) for _ in range(2)]
    forward_fn = lambda b: F.cross_entropy(model(b[0]).logits, b[1])  # noqa: E731
    taylor = taylor_importance(model, units, batches, forward_fn)
    assert all(p.grad is None for p in model.parameters())
    # direct: dL/dm_c = sum over the masked activation a of a_c * dL/da_c (each unit has one mask point here)
    expected = [torch.zeros(u.num_channels) for u in units]
    for x, y in batches:
        acts = {}
        hooks = [model.get_submodule(u.mask_points[0][0]).register_forward_hook(
            lambda m, a, out, i=i: acts.__setitem__(i, out)) for i, u in enumerate(units)]
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # the backbone is frozen: make the activations part of the graph
            loss = F.cross_entropy(model(x).logits, y)
            grads = torch.autograd.grad(loss, [acts[i] for i in range(len(units))])
        for h in hooks:
            h.remove()
        for i, gr in enumerate(grads):
            expected[i] += (acts[i] * gr).sum((0, 2, 3)).abs().detach() / len(batches)
    assert all(torch.allclose(t, e, rtol=1e-4, atol=1e-7) for t, e in zip(taylor, expected))


@pytest.mark.parametrize("arch", ["resnet_bottleneck", "timm_efficientnet"])
def test_depgraph_importance(arch):
    model, units, _ = _setup(arch)
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        before = model(x).logits
    model.train()
    try:
        scores = depgraph_importance(model, units, x)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert [s.shape for s in scores] == [(u.num_channels,) for u in units]
    assert all(bool(torch.isfinite(s).all() and (s >= 0).all()) for s in scores)
    assert all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    if arch == "resnet_bottleneck":  # group = producer out (L2^2), its BN (gamma^2), consumer in (L2^2); / mean
        u = units[0]
        w_out = model.get_submodule(u.producer).weight.flatten(1).pow(2).sum(1)
        gamma = model.get_submodule(u.norms[0]).weight.pow(2)
        w_in = model.get_submodule(u.consumer).weight.transpose(0, 1).flatten(1).pow(2).sum(1)
        expected = (w_out + gamma + w_in) / 3
        assert torch.allclose(scores[0], expected / expected.mean(), rtol=1e-4)


def test_hypernetwork_init_inside_a_transformers_model(tmp_path):
    """transformers initialises the children first (HF defaults: zero biases), then calls `_init_weights` on the
    hypernetwork itself, whose `reset_parameters` must win; loading a checkpoint must not re-initialise."""
    from transformers import PretrainedConfig, PreTrainedModel

    class Config(PretrainedConfig):
        model_type = "pass_test"

    class Model(PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.hyper = PromptHyperNetwork([4, 6], hidden_size=8, stat_dim=4)
            self.post_init()

        @torch.no_grad()
        def _init_weights(self, module):  # the pattern of PromptedSparsePreTrainedModel._init_weights
            if isinstance(module, PromptHyperNetwork):
                module.reset_parameters()
            else:
                super()._init_weights(module)

    torch.manual_seed(0)
    model = Model(Config())
    assert all(torch.equal(h.bias, torch.full_like(h.bias, 3.0)) for h in model.hyper.heads)
    with torch.no_grad():
        for h in model.hyper.heads:
            h.bias.add_(1.0)
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = Model.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
