"""Channel units from Torch-Pruning's dependency graph for models without a hand-written rule (HF RegNet and
MobileNetV1, timm ResNet-18 and DenseNet): exact masking vs compaction, FLOPs model vs measured FLOPs, rebuild from
widths, the same units as the rules where both apply, the skip rules, save/load through PromptedSparseModel, and
PASS + a channel baseline end to end through the recipe code."""

import copy
import json

import pytest
import timm
import torch
from tiny_models import reinitialise
from torch import nn
from transformers import (
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from prompt_sparsity import PromptedSparseConfig, PromptedSparseModel
from prompt_sparsity.sparsity.channels import (
    ChannelMasker,
    compact_model,
    find_channel_units,
    resize_units,
    shrink_to_widths,
)
from prompt_sparsity.sparsity.depgraph_units import depgraph_report
from prompt_sparsity.sparsity.flops import FlopsModel, count_parameters, measure_flops
from prompt_sparsity.sparsity.hypernetwork import weight_statistics

S = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def regnet(num_labels=5, width=8):
    # groups_width=width: stage 0 has plain convs, stage 1 (2 x width channels) grouped 3x3 convs (groups=2), which
    # cannot shrink channel by channel: those groups are skipped, the others (incl. squeeze-excite) are units.
    return RegNetForImageClassification(RegNetConfig(embedding_size=width, hidden_sizes=[width, 2 * width],
                                                     depths=[1, 1], groups_width=width, num_labels=num_labels))


def mobilenet_v1(num_labels=5):
    return MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25, image_size=S,
                                                               num_labels=num_labels))


def timm_resnet18():
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet18", num_labels=5))


def resnet_bottleneck():
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2],
                                                     layer_type="bottleneck", num_labels=5))


def densenet():
    return timm.create_model("densenet121", num_classes=5, growth_rate=8, block_config=(1, 2))


# name: (builder, expected number of units, some expected unit names with their channels)
CASES = {
    "hf_regnet": (regnet, 5, {"regnet.encoder.stages.0.layers.0.layer.1.convolution": 8,
                              "regnet.encoder.stages.1.layers.0.layer.2.attention.0": 2}),
    "hf_mobilenet_v1": (mobilenet_v1, 13, {"mobilenet_v1.conv_stem.convolution": 8,
                                           "mobilenet_v1.layer.23.convolution": 256}),
    "timm_resnet18_wrapper": (timm_resnet18, 8, {"timm_model.layer1.0.conv1": 64, "timm_model.layer4.1.conv1": 512}),
    "timm_densenet": (densenet, 3, {"features.denseblock1.denselayer1.conv1": 32}),
}


def build(case, seed=0):
    torch.manual_seed(seed)
    model = CASES[case][0]()
    reinitialise(model)
    return model.eval()


def logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def random_masks(units, seed=1, p=0.5):
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for u in units:
        m = (torch.rand(u.num_channels, generator=gen) < p).float()
        m[torch.randint(u.num_channels, (1,), generator=gen)] = 1.0
        masks.append(m)
    return masks


@pytest.mark.parametrize("case", list(CASES))
def test_depgraph_units_mask_compact_flops_rebuild(case):
    model = build(case)
    x = torch.randn(2, 3, S, S)
    with pytest.raises(ValueError, match="Supported architectures"):
        find_channel_units(model)  # no hand-written rule
    units = find_channel_units(model, "auto", S)
    assert [u.name for u in find_channel_units(model, "depgraph", S)] == [u.name for u in units]
    _, n_units, expected = CASES[case]
    assert len(units) == n_units, [u.name for u in units]
    found = {u.name: u.num_channels for u in units}
    assert all(found[k] == v for k, v in expected.items()), found
    assert all(u.kind == "depgraph" and u.name == u.producer for u in units)
    assert all(model.training is False for model in model.modules())  # modes restored
    assert all(p.requires_grad for p in model.parameters())

    masks = random_masks(units)
    with torch.no_grad():
        dense = logits(model, x)
    soft = [m.clone().requires_grad_(True) for m in masks]
    with ChannelMasker(model, units) as masker:
        masker.set_masks(soft)
        masked = logits(model, x)
        masked.square().sum().backward()
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in soft)
    assert sum(bool(m.grad.abs().sum() > 0) for m in soft) >= len(soft) - 1  # a tiny ReLU unit may be dead
    assert not torch.allclose(masked, dense, atol=1e-3)

    fm = FlopsModel(model, S, units)
    assert fm.dense_flops == pytest.approx(measure_flops(model, S), rel=1e-9)
    compact = copy.deepcopy(model)
    widths = compact_model(compact, units, masks)
    assert widths == {u.name: int(m.sum()) for u, m in zip(units, masks)}
    with torch.no_grad():
        torch.testing.assert_close(logits(compact, x), masked.detach(), atol=1e-4, rtol=1e-4)
    assert count_parameters(compact) < count_parameters(model)
    # the FLOPs model's prediction for the masks is what FlopCounterMode measures on the compact model
    assert measure_flops(compact, S) == pytest.approx(fm.flops(masks), rel=1e-9)
    assert fm.flops(masks) < fm.dense_flops
    compact_units = resize_units(compact, units, widths)
    assert [(u.name, u.num_channels) for u in compact_units] == list(widths.items())
    assert [s.numel() for s in weight_statistics(compact, compact_units)] == list(widths.values())

    # rebuild: re-trace a fresh dense model, shrink each unit (by name) to its width, strict load, same logits
    fresh = CASES[case][0]().eval()
    fresh = shrink_to_widths(fresh, find_channel_units(fresh, "depgraph", S), widths)
    fresh.load_state_dict(compact.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh, x), logits(compact, x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown unit names"):
        shrink_to_widths(CASES[case][0](), find_channel_units(CASES[case][0](), "depgraph", S), {"nope": 1})


def test_forced_depgraph_on_a_rule_model_matches_the_rules_and_the_flops():
    torch.manual_seed(0)
    model = resnet_bottleneck()
    reinitialise(model)
    rules = find_channel_units(model)
    graph = find_channel_units(model, "depgraph", S)
    # every rule unit, plus the stem's output channels (no residual addition: stage 0 starts with a shortcut conv),
    # which the rules leave whole
    stem = "resnet.embedder.embedder.convolution"
    key = lambda u: (u.name, u.num_channels, u.producer, u.consumer, u.norms)  # noqa: E731
    assert [key(u) for u in graph if u.name != stem] == [key(u) for u in rules]
    assert graph[0].name == stem
    assert graph[0].extra_consumers == ("resnet.encoder.stages.0.layers.0.shortcut.convolution",)
    assert graph[1].input_unit == stem and [u.input_unit for u in graph[2:]] == [u.input_unit for u in rules[1:]]
    assert {u.kind for u in graph} == {"depgraph"} and {u.kind for u in rules} == {"resnet_bottleneck"}
    x = torch.randn(2, 3, S, S)
    masks = random_masks(graph, seed=3)
    with ChannelMasker(model, graph) as masker, torch.no_grad():
        masker.set_masks(masks)
        masked = logits(model, x)
    fm = FlopsModel(model, S, graph)
    # the same FLOPs as the rule units' model for the same masks of the shared units
    assert FlopsModel(model, S, graph).flops({stem: None, **{u.name: m for u, m in zip(graph[1:], masks[1:])}}) == (
        FlopsModel(model, S, rules).flops(masks[1:]))
    compact = copy.deepcopy(model)
    compact_model(compact, graph, masks)
    with torch.no_grad():
        torch.testing.assert_close(logits(compact, x), masked, atol=1e-4, rtol=1e-4)
    assert measure_flops(compact, S) == pytest.approx(fm.flops(masks), rel=1e-9)


def test_compaction_equals_torch_pruning_group_pruning():
    """Our member lists are TP's whole group: removing the same channels with `Group.prune` gives the same
    compact model, tensor for tensor."""
    import torch_pruning as tp

    model = build("hf_regnet")
    units = find_channel_units(model, "depgraph", S)
    masks = random_masks(units, seed=5)
    ours = copy.deepcopy(model)
    compact_model(ours, units, masks)
    theirs = copy.deepcopy(model)
    for p in theirs.parameters():
        p.requires_grad_(True)
    dg = tp.DependencyGraph().build_dependency(theirs, torch.zeros(1, 3, S, S), output_transform=lambda o: o.logits,
                                               verbose=False)
    for u, m in zip(units, masks):
        removed = torch.nonzero(m == 0).flatten().tolist()
        if removed:
            dg.get_pruning_group(theirs.get_submodule(u.producer), tp.prune_conv_out_channels, removed).prune()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_skip_rules_are_reported():
    reasons = {r.root: r.skipped for r in depgraph_report(build("timm_resnet18_wrapper"), S)}
    assert "residual" in reasons["timm_model.conv1"] and "residual" in reasons["timm_model.layer2.0.conv2"]
    assert "output" in reasons["timm_model.fc"]
    assert reasons["timm_model.layer1.0.conv1"] is None
    reasons = {r.root: r.skipped for r in depgraph_report(build("hf_regnet"), S)}
    assert "grouped conv" in reasons["regnet.encoder.stages.1.layers.0.layer.0.convolution"]
    reasons = {r.root: r.skipped for r in depgraph_report(build("timm_densenet"), S)}
    assert "CONCAT" in reasons["features.conv0"] or "other indices" in reasons["features.conv0"]
    assert "other indices" in reasons["features.denseblock1.denselayer1.conv2"]
    reasons = {r.root: r.skipped for r in depgraph_report(build("hf_mobilenet_v1"), S)}
    assert "classifier head" in reasons["mobilenet_v1.layer.25.convolution"]


def test_no_safe_unit_and_bad_settings_raise():
    # the conv's channels only feed the classifier head: no unit
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"(?s)Sequential.*dependency graph.*classifier head 4.*Supported"):
        find_channel_units(plain, "auto", S)
    # one conv more: the first conv's channels are a unit
    two = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 4))
    assert [(u.name, u.consumer, u.num_channels) for u in find_channel_units(two, "auto", S)] == [("0", "2", 8)]
    # ConvNeXt V2 (GRN mixes the hidden channels; LayerNorms elsewhere) and ViT (attention reshapes, LayerNorms):
    # no exact group either, and the message says why
    from transformers import AutoModelForImageClassification, ConvNextV2Config
    from tiny_models import tiny_model

    v2 = AutoModelForImageClassification.from_config(
        ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5))
    for model, name in ((v2, "ConvNextV2ForImageClassification"), (tiny_model("vit"), "ViTForImageClassification")):
        with pytest.raises(ValueError, match=rf"(?s){name}: no hand-written rule.*reasons: .*not known to treat"):
            find_channel_units(model, "auto", S)
    with pytest.raises(ValueError, match="discovery='nope'"):
        find_channel_units(plain, "nope")
    with pytest.raises(ValueError, match="channel_discovery='graph'"):
        PromptedSparseConfig(channel_discovery="graph")


def test_channel_criteria_on_depgraph_units():
    """The channel baselines' criteria score depgraph units like rule units (bn_scale needs a BatchNorm, which the
    squeeze-excite units lack, and says so)."""
    from prompt_sparsity.methods.channel_pruners import channel_importance

    model = build("hf_regnet")
    units = find_channel_units(model, "depgraph", S)
    x = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    kwargs = dict(batches=[(x, y)], forward_fn=lambda b: nn.functional.cross_entropy(model(b[0]).logits, b[1]),
                  example_inputs=torch.zeros(1, 3, S, S), generator=torch.Generator().manual_seed(0))
    for criterion in ("l1", "random", "taylor", "depgraph"):
        scores = channel_importance(criterion, model, units, **kwargs)
        assert [tuple(s.shape) for s in scores] == [(u.num_channels,) for u in units], criterion
        assert all(bool(torch.isfinite(s).all()) and bool((s >= 0).all()) for s in scores), criterion
        assert any(bool(s.std() > 0) for s in scores if s.numel() > 1), criterion
    with pytest.raises(ValueError, match="has no BatchNorm"):
        channel_importance("bn_scale", model, units)


def _wrap(base, **kwargs):
    return PromptedSparseModel.from_base(base, sparsity_type="structured", flops_ratio=0.5, input_size=S,
                                         output_size=S, pad_size=4, **kwargs)


@pytest.mark.parametrize("case", ["hf_regnet", "hf_mobilenet_v1", "forced_resnet"])
def test_wrapper_search_compact_save_load(case, tmp_path):
    if case == "forced_resnet":
        torch.manual_seed(0)
        base = resnet_bottleneck()
        reinitialise(base)
        model = _wrap(base, channel_discovery="depgraph")
    else:
        model = _wrap(build(case))
    assert model.config.channel_discovery == "depgraph"
    assert {u.kind for u in model.structure.units} == {"depgraph"}
    assert model.config.channel_units == [[u.name, u.num_channels] for u in model.structure.units]
    model.start_structure_search()
    x = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(0))
    model(x, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    assert all(p.grad is not None for p in model.structure.hypernetwork.parameters())
    model.eval()
    masks = model.channel_masks()
    if case == "hf_mobilenet_v1":  # the extreme: one channel per unit (depthwise convs become 1-channel convs)
        masks = [torch.zeros_like(m).index_fill_(0, torch.tensor([0]), 1.0) for m in masks]
    fm = model.structure.flops_model(model.model)
    with torch.no_grad(), model.structure.disabled(), ChannelMasker(model.model, model.structure.units) as masker:
        masker.set_masks(masks)  # the prompted model with these masks, through forward hooks
        masked = model(x).logits
    model.compact(masks)
    with torch.no_grad():
        compact = model(x).logits
    torch.testing.assert_close(compact, masked, atol=1e-4, rtol=1e-4)
    assert measure_flops(model.model, S) == pytest.approx(fm.flops(masks), rel=1e-9)
    if case != "hf_mobilenet_v1":
        assert abs(fm.flops(masks) / fm.dense_flops - 0.5) <= 0.05
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["channel_discovery"] == "depgraph" and saved["channel_widths"] == model.config.channel_widths
    loaded, info = PromptedSparseModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, compact, atol=1e-6, rtol=1e-5)
    assert [(u.name, u.num_channels) for u in loaded.structure.units] == list(model.config.channel_widths.items())


@pytest.fixture(scope="module")
def regnet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-regnet"
    torch.manual_seed(0)
    model = regnet(num_labels=20, width=16)  # finer channel granularity for the 50% FLOPs target
    reinitialise(model)
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method", ["pass", "l1"])
def test_recipe_on_a_model_without_rules(method, regnet_dir, tmp_path):
    """Search (PASS) or score (l1) -> compaction at the FLOPs target -> fine-tuning -> saved -> reloaded, on a
    model the rules do not cover; PASS through recipes/pass.py's own argument parsing."""
    import os
    import runpy
    import sys

    from tiny_models import recipe_args

    from prompt_sparsity.training import run_pruning

    out = tmp_path / "run"
    if method == "pass":
        recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
        sys.path.insert(0, recipes)
        try:
            main = runpy.run_path(os.path.join(recipes, "pass.py"))["main"]
            main(["--model_name_or_path", regnet_dir, "--dataset_name", "digits", "--input_size", str(S),
                  "--pad_size", "4", "--max_train_samples", "64", "--max_eval_samples", "32",
                  "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--search_epochs", "1",
                  "--finetune_epochs", "1", "--max_steps_per_epoch", "2", "--cpu", "--torch_threads", "1",
                  "--flops_ratio", "0.5", "--latency_batch_sizes", "1", "--channel_discovery", "depgraph",
                  "--output_dir", str(out)])
        finally:
            sys.path.remove(recipes)
        results = json.load(open(out / "results.json"))
        assert "test_accuracy_prompt" in results["accuracy"]["test"]
    else:
        results = run_pruning(*recipe_args(regnet_dir, out, method=method, input_size=S, pad_size=4,
                                           flops_ratio=0.5, latency_batch_sizes=[1]))
    assert results["flops_ratio"] <= 0.52 and results["flops"] < results["dense_flops"]
    assert results["params"] < results["dense_params"]
    saved = PromptedSparseModel.from_pretrained(out)
    assert saved.config.channel_discovery == "depgraph"
    assert saved.config.channel_widths == results["channel_widths"]
    assert measure_flops(saved.model, S) == pytest.approx(results["flops"])
    again = PromptedSparseModel.from_pretrained(out)
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, saved(x).logits, atol=0, rtol=0)
    if method == "l1":  # the compact depgraph structure transfers to another dataset (same units, same widths)
        from prompt_sparsity.training import run_transfer
        from prompt_sparsity.transfer import TransferArguments

        model, data, prune, run = recipe_args(regnet_dir, tmp_path / "transfer", dataset_name="mnist", input_size=S,
                                              pad_size=4, latency_batch_sizes=[1])
        moved = run_transfer(model, data, prune, run, TransferArguments(subnetwork=str(out)))
        assert moved["channel_widths"] == results["channel_widths"]
        assert PromptedSparseModel.from_pretrained(tmp_path / "transfer").config.channel_discovery == "depgraph"


def test_restore_widths_for_resume():
    """Resuming after the compaction gives an uncompacted wrapper the compact architecture from the widths."""
    model = _wrap(build("hf_regnet"))
    units = model.structure.units
    masks = random_masks(units, seed=2)
    model.compact(masks)
    fresh = _wrap(build("hf_regnet", seed=1))
    fresh.structure.restore_widths_(fresh.model, model.config.channel_widths)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)
    assert [(u.name, u.num_channels) for u in fresh.structure.units] == list(model.config.channel_widths.items())
