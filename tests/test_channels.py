"""Channel units, masking, compaction, rebuild from widths and FLOPs on tiny random models."""

import copy

import pytest
import timm
import torch
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    MobileNetV2Config,
    ResNetConfig,
    TimmWrapperConfig,
)

from prompt_sparsity.sparsity.channels import (
    ChannelMasker,
    ChannelUnit,
    compact_model,
    find_channel_units,
    masks_to_indices,
    shrink_to_widths,
)
from prompt_sparsity.sparsity.flops import FlopsModel, count_flops, count_parameters, measure_flops


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    threads wait on each other (measured ~50x slower per forward under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hf(config):
    return lambda: AutoModelForImageClassification.from_config(config)


def _timm(arch):
    return lambda: timm.create_model(arch, num_classes=5)


def _wrapped(arch):
    return _hf(TimmWrapperConfig(architecture=arch, num_labels=5))


# name: (fresh-model builder, input size, number of units, unit kinds present)
CASES = {
    "resnet_basic": (
        _hf(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                         layer_type="basic", num_labels=5)),
        32, 4, {"resnet_basic"},
    ),
    "resnet_bottleneck": (
        _hf(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
                         layer_type="bottleneck", num_labels=5)),
        32, 10, {"resnet_bottleneck"},
    ),
    "mobilenet_v2": (
        _hf(MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=5)),
        32, 17, {"stem", "inverted_residual"},
    ),
    "mobilenet_v2_stem_expand": (
        _hf(MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=5, first_layer_is_expansion=False)),
        32, 18, {"stem", "inverted_residual"},
    ),
    "convnext": (
        _hf(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=5)),
        32, 5, {"convnext_mlp"},
    ),
    # timm at 32 or 64 px (at 32 the last maps are 1x1; fine in eval mode): bare and inside TimmWrapper;
    # efficientnet_lite0 and mobilenetv2_100 share their block types (stem + DS, IR, ReLU6)
    "timm_efficientnet_lite0": (_timm("efficientnet_lite0"), 64, 16, {"stem", "inverted_residual"}),
    "timm_mobilenetv2_100": (_timm("mobilenetv2_100"), 32, 17, {"stem", "inverted_residual"}),
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), 32, 11, {"stem", "inverted_residual"}),  # SE
    "wrapper_efficientnet_lite0": (_wrapped("efficientnet_lite0"), 32, 16, {"stem", "inverted_residual"}),
    "wrapper_mobilenetv2_100": (_wrapped("mobilenetv2_100"), 64, 17, {"stem", "inverted_residual"}),
    "wrapper_test_efficientnet": (_wrapped("test_efficientnet"), 32, 5, {"stem", "edge_residual", "inverted_residual"}),
}


def _logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def _randomise(model):
    """Variance-preserving weights, random norm statistics/affines and ConvNeXt layer scale, so that
    wrong compaction shows (HF's default init, std 0.02, makes deep tiny models output constants)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.normal_(0.0, fan_in ** -0.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
        if getattr(m, "layer_scale_parameter", None) is not None:
            m.layer_scale_parameter.uniform_(0.5, 1.5)
    return model.eval()


def _random_masks(units, gen, p=0.5):
    masks = []
    for u in units:
        m = (torch.rand(u.num_channels, generator=gen) < p).float()
        m[torch.randint(u.num_channels, (1,), generator=gen)] = 1.0  # keep at least one
        masks.append(m)
    return masks


def _forward_order(model, names, x):
    order = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda *a, n=n: order.append(n)) for n in names]
    with torch.no_grad():
        _logits(model, x)
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(order))


@pytest.mark.parametrize("case", list(CASES))
def test_units_masking_compaction_flops_rebuild(case):
    build, size, n_units, kinds = CASES[case]
    torch.manual_seed(0)
    model = _randomise(build())
    x = torch.randn(2, 3, size, size)

    # discovery: count, kinds, forward order, consistent sizes
    units = find_channel_units(model)
    assert len(units) == n_units, [u.name for u in units]
    assert {u.kind for u in units} == kinds
    assert _forward_order(model, [u.producer for u in units], x) == [u.producer for u in units]
    assert all(u.name == u.producer and u.num_channels > 0 for u in units)

    # masking: masked logits differ from dense, gradients reach every mask, keys unchanged
    gen = torch.Generator().manual_seed(1)
    masks = _random_masks(units, gen)
    keys = list(model.state_dict())
    with torch.no_grad():
        dense_logits = _logits(model, x)
    soft = [m.clone().requires_grad_(True) for m in masks]
    with ChannelMasker(model, units) as masker:
        masker.set_masks(soft)
        assert list(model.state_dict()) == keys
        masked_logits = _logits(model, x)
        masked_logits.square().sum().backward()
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in soft)
    assert sum(bool(m.grad.abs().sum() > 0) for m in soft) >= len(soft) - 1
    assert not torch.allclose(masked_logits, dense_logits, atol=1e-3)
    with torch.no_grad():  # detached hooks: the model is dense again
        torch.testing.assert_close(_logits(model, x), dense_logits)

    # analytic FLOPs: dense vs FlopCounterMode, dense + masks vs compact
    fm = FlopsModel(model, size, units)
    assert fm.dense_flops == pytest.approx(measure_flops(model, size), rel=0.01)
    masked_flops = fm.flops(masks)
    assert masked_flops < fm.dense_flops
    assert count_flops(model, size, units, masks) == masked_flops

    # compaction: same logits as the masked model, widths, FLOPs, smaller parameter count
    compact = copy.deepcopy(model)
    widths = compact_model(compact, units, masks)
    assert widths == {u.name: int(m.sum()) for u, m in zip(units, masks)}
    with torch.no_grad():
        torch.testing.assert_close(_logits(compact, x), masked_logits.detach(), atol=1e-4, rtol=1e-4)
    assert count_parameters(compact) < count_parameters(model)
    compact_units = find_channel_units(compact)
    assert [(u.name, u.num_channels) for u in compact_units] == list(widths.items())
    compact_flops = count_flops(compact, size)
    assert compact_flops == masked_flops  # exact: dense + mask == compact
    assert compact_flops == pytest.approx(measure_flops(compact, size), rel=0.01)

    # rebuild from the recorded widths on a fresh model, strict load, identical logits
    fresh = shrink_to_widths(build(), None, widths)
    fresh.load_state_dict(compact.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(fresh, x), _logits(compact, x), atol=0, rtol=0)


def _resnet():
    torch.manual_seed(0)
    return _randomise(CASES["resnet_bottleneck"][0]())


def test_unit_fields_and_input_links():
    model = _resnet()
    units = find_channel_units(model)
    first, second = units[0], units[1]
    assert first.name == "resnet.encoder.stages.0.layers.0.layer.0.convolution"
    assert first.consumer == second.producer and second.input_unit == first.name and first.input_unit is None
    assert first.norms == ("resnet.encoder.stages.0.layers.0.layer.0.normalization",)
    assert isinstance(first.to_dict()["mask_points"], tuple)
    lite = CASES["timm_mobilenetv3_small_050"][0]()
    se_units = [u for u in find_channel_units(lite) if u.se_reduce]
    assert se_units and all(len(u.se_expand) == 1 and len(u.depthwise) == 1 for u in se_units)


def test_functional_call_and_dict_masks():
    model = _resnet()
    units = find_channel_units(model)
    x = torch.randn(2, 3, 32, 32)
    masks = {u.name: torch.ones(u.num_channels).index_fill_(0, torch.tensor([0]), 0.0).requires_grad_(True)
             for u in units}
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with ChannelMasker(model, units) as masker:
        masker.set_masks(masks)
        direct = _logits(model, x)
        functional = torch.func.functional_call(model, params, (x,)).logits
        functional.sum().backward()
    torch.testing.assert_close(functional, direct)
    assert all(m.grad is not None for m in masks.values())
    assert set(model.state_dict()) == set(params)


def test_flops_model_is_differentiable_and_consistent():
    model = _resnet()
    units = find_channel_units(model)
    fm = FlopsModel(model, 32, units)
    keep = [torch.full((u.num_channels,), 0.5, requires_grad=True) for u in units]
    total = fm(keep)
    assert total.dtype == torch.float32 and 0 < total.item() < fm.dense_flops
    fm.ratio(keep).backward()
    assert all(k.grad is not None and bool((k.grad > 0).all()) for k in keep)
    assert float(fm([torch.ones(u.num_channels) for u in units])) == pytest.approx(fm.dense_flops)
    assert fm.flops(None) == fm.dense_flops == count_flops(model, 32)
    assert len(fm.layer_flops()) == len(fm.layer_names)
    # coupling: halving both sides of a bottleneck's 3x3 conv quarters its FLOPs
    half = [None] * len(units)
    half[0] = torch.tensor([1.0, 0.0])
    half[1] = torch.tensor([1.0, 0.0])
    per_layer = dict(zip(fm.layer_names, fm.layer_flops(half).tolist()))
    dense = dict(zip(fm.layer_names, fm.layer_flops().tolist()))
    assert per_layer[units[1].producer] == dense[units[1].producer] / 4


def test_depthwise_flops_scale_with_kept_channels():
    model = _randomise(CASES["mobilenet_v2"][0]())
    units = find_channel_units(model)
    fm = FlopsModel(model, 32, units)
    u = units[1]
    keep = [None] * len(units)
    keep[1] = torch.zeros(u.num_channels).index_fill_(0, torch.arange(u.num_channels // 2), 1.0)
    per_layer = dict(zip(fm.layer_names, fm.layer_flops(keep).tolist()))
    dense = dict(zip(fm.layer_names, fm.layer_flops().tolist()))
    assert per_layer[u.depthwise[0]] == dense[u.depthwise[0]] / 2
    assert per_layer[u.producer] == dense[u.producer] / 2


def test_unsupported_model_raises_clear_error():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match=r"(?s)Sequential.*Supported architectures.*ResNet.*timm"):
        find_channel_units(plain)
    # ConvNeXt v2 has GRN over the hidden channels (not channel-separable): not supported
    from transformers import ConvNextV2Config
    v2 = AutoModelForImageClassification.from_config(
        ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5))
    with pytest.raises(ValueError, match="ConvNextV2ForImageClassification"):
        find_channel_units(v2)


def test_bad_masks_and_widths_raise():
    model = _resnet()
    units = find_channel_units(model)
    ones = [torch.ones(u.num_channels) for u in units]
    zero = list(ones)
    zero[2] = torch.zeros(units[2].num_channels)
    before = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="keeps no channel"):
        compact_model(model, units, zero)
    assert {k: v.shape for k, v in model.state_dict().items()} == before  # nothing changed
    soft = list(ones)
    soft[0] = torch.full((units[0].num_channels,), 0.3)
    with pytest.raises(ValueError, match="hard 0/1"):
        compact_model(model, units, soft)
    with pytest.raises(ValueError, match="1-D tensor of 2 channels"):
        ChannelMasker(model, units).set_masks([torch.ones(3)] + ones[1:])
    with pytest.raises(ValueError, match="got 1 masks"):
        masks_to_indices(units, ones[:1])
    with pytest.raises(ValueError, match="unknown unit names"):
        shrink_to_widths(model, units, {"not.a.unit": 1})
    with pytest.raises(ValueError, match=r"must be an int in \[1, 2\]"):
        shrink_to_widths(model, units, {units[0].name: 3})
    # straight-through masks carry float noise: still accepted as hard
    st = [m - 0.3 + 0.3 for m in ones]
    assert compact_model(model, units, st) == {u.name: u.num_channels for u in units}
    # units from before a compaction are stale
    compact_model(model, units, [torch.tensor([1.0, 0.0]) if u.num_channels == 2 else None for u in units])
    with pytest.raises(RuntimeError, match="stale"):
        compact_model(model, units, ones)


def test_channel_unit_is_hashable_dataclass():
    u = ChannelUnit(name="a", num_channels=2, producer="a", consumer="b")
    assert {u: 1}[u] == 1 and u.mask_points == () and u.channel_dim == 1
