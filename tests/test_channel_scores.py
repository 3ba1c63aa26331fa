"""VPNs with channel-granularity scores (`vpns_channels`, `structure_search="scores"`): scores initialised to the
L1-norm baseline's mask, trained by straight-through under the FLOPs budget that `select_global` defines at every
step, saved and reloaded exactly (searching and compacted), and the recipe end to end with an exact resume of the
search stage."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import IMAGE_SIZE, tiny_model

from prompt_sparsity import PromptedSparseConfig, PromptedSparseModel
from prompt_sparsity.methods import get_method
from prompt_sparsity.methods.channel_pruners import importance_masks, l1_importance
from prompt_sparsity.sparsity.channel_scores import ChannelScores, initial_channel_scores
from prompt_sparsity.sparsity.flops import measure_flops
from prompt_sparsity.sparsity.selection import select_global, select_uniform
from prompt_sparsity.training import run_pruning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = IMAGE_SIZE


def wrap(arch="resnet_bottleneck", flops_ratio=0.5, **kwargs):
    return PromptedSparseModel.from_base(
        tiny_model(arch), sparsity_type="structured", structure_search="scores", flops_ratio=flops_ratio,
        input_size=S, output_size=S, pad_size=4, **kwargs,
    )


def pixels(n=4, seed=1):
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def ratio(model, masks):
    fm = model.structure.flops_model(model.model)
    return float(fm(masks)) / fm.dense_flops


@pytest.mark.parametrize("arch", ["resnet_bottleneck", "timm_efficientnet", "convnext"])
def test_initial_scores_give_the_l1_baseline_mask(arch):
    model = wrap(arch)
    structure = model.structure
    assert structure.hypernetwork is None and isinstance(structure.channel_scores, ChannelScores)
    assert not any(k.startswith("structure.hypernetwork.") for k in model.state_dict())
    scores = structure.channel_scores.per_unit()
    for s, u in zip(scores, structure.units):  # every unit averages 1
        assert s.numel() == u.num_channels and float(s.detach().mean()) == pytest.approx(1.0, rel=1e-5)
    reference = importance_masks(l1_importance(model.model, structure.units), structure.flops_model(model.model), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.channel_masks(), reference))


@pytest.mark.parametrize("arch", ["resnet_bottleneck", "timm_efficientnet"])
def test_scores_learn_and_every_step_meets_the_flops_target(arch):
    torch.manual_seed(0)
    model = wrap(arch, flops_ratio=0.5, min_channels=2)
    model.start_mask_search()  # the VPNs search entry point trains the channel scores here
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"structure.channel_scores.scores"} | {n for n, _ in model.prompt.named_parameters(prefix="prompt")}
    scores = model.structure.channel_scores.scores
    before = model.channel_masks()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.2)
    x, y = pixels(8), torch.arange(8) % 10
    fm = model.structure.flops_model(model.model)
    for _ in range(6):
        loss = model(x, labels=y).loss
        loss.backward()
        assert scores.grad is not None and float(scores.grad.abs().sum()) > 0
        assert all(p.grad is None for p in model.model.parameters())  # the backbone is frozen
        opt.step()
        opt.zero_grad()
        masks = model.channel_masks()
        per_unit = [s.detach() for s in model.structure.channel_scores.per_unit()]
        expected = select_global(per_unit, fm, 0.5, min_channels=2)
        assert all(torch.equal(a, b) for a, b in zip(masks, expected))
        assert abs(ratio(model, masks) - 0.5) <= 0.02 and min(int(m.sum()) for m in masks) >= 2
    after = model.channel_masks()
    changed = sum(int((a != b).sum()) for a, b in zip(before, after))
    assert changed > 0, "the search never changed the mask"


def test_forward_uses_the_straight_through_hard_mask():
    """The training forward computes the hard-masked network (= the compacted one), gradients go to the scores."""
    model = wrap("timm_efficientnet")
    model.start_mask_search()
    masks = model.structure.channel_masks(model.model, model.prompt.full_prompt())[0]
    hard = model.channel_masks()
    assert all(torch.allclose(m, h) and m.requires_grad for m, h in zip(masks, hard))
    model.eval()
    with torch.no_grad():
        masked = model(pixels()).logits
    model.compact(hard)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels()).logits, masked, atol=1e-4, rtol=1e-4)
    assert measure_flops(model.model, S) <= 0.52 * model.config.dense_flops


@pytest.mark.parametrize("arch", ["resnet_basic", "resnet_bottleneck", "convnext", "mobilenet_v2", "timm_efficientnet"])
@pytest.mark.parametrize("training", [False, True])
def test_masking_the_last_point_only_is_exact(arch, training):
    """The search masks each unit at its last mask point only (gate_units): the same function as masking every
    point (= the compact model), in eval and in train mode (batch statistics)."""
    from prompt_sparsity.sparsity.channel_scores import gate_units
    from prompt_sparsity.sparsity.channels import ChannelMasker

    model = wrap(arch)
    units = model.structure.units
    gated = gate_units(units)
    assert any(len(u.mask_points) > 1 for u in units) == (arch in ("mobilenet_v2", "timm_efficientnet"))
    assert all(len(g.mask_points) == 1 and g.mask_points[0] == u.mask_points[-1] for g, u in zip(gated, units))
    g = torch.Generator().manual_seed(5)
    masks = [(torch.rand(u.num_channels, generator=g) < 0.5).float() for u in units]
    for m in masks:
        m[0] = 1.0
    x = pixels(4)
    base = model.model.train(training)
    outs = []
    for which in (units, gated):
        masker = ChannelMasker(base, which)
        masker.set_masks(masks)
        torch.manual_seed(0)  # the same dropout draws in train mode (MobileNetV2's classifier)
        with torch.no_grad(), masker:
            outs.append(base(x).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert model.structure.masker(base).units == gated  # what the search uses


def test_uniform_selection_with_scores():
    model = wrap("resnet_bottleneck", channel_selection="uniform")
    scores = [s.detach() for s in model.structure.channel_scores.per_unit()]
    expected = select_uniform(scores, model.structure.flops_model(model.model), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.channel_masks(), expected))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="structure_search='bogus'"):
        PromptedSparseConfig(structure_search="bogus")
    with pytest.raises(ValueError, match="flops_penalty=0"):
        PromptedSparseConfig(sparsity_type="structured", structure_search="scores", flops_penalty=2.0)
    with pytest.raises(RuntimeError, match="stale units"):
        model = wrap()
        initial_channel_scores(model.model, [u.__class__(**{**u.to_dict(), "num_channels": 3})
                                             for u in model.structure.units])
    with pytest.raises(ValueError, match="unit_sizes"):
        ChannelScores([])


@pytest.mark.parametrize("compact", [False, True])
def test_roundtrip_through_safetensors(tmp_path, compact):
    """A searching model (scores) and a compacted one (scores + kept indices + compact weights) reload exactly."""
    model = wrap("timm_efficientnet")
    with torch.no_grad():  # scores far from their init, so a re-initialisation on load would show
        model.structure.channel_scores.scores.copy_(torch.randn(model.structure.channel_scores.scores.shape,
                                                                generator=torch.Generator().manual_seed(3)))
    if compact:
        model.compact()
    model.eval()
    with torch.no_grad():
        logits = model(pixels()).logits
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["structure_search"] == "scores"
    loaded, info = PromptedSparseModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.structure_search == "scores" and loaded.structure.hypernetwork is None
    state = model.state_dict()
    assert state.keys() == loaded.state_dict().keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels()).logits, logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ recipe
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-effnet"
    tiny_model("timm_efficientnet", num_labels=20).save_pretrained(path)
    return str(path)


def recipe_flags(base_dir, output_dir, *extra):
    return ["--method", "vpns_channels", "--model_name_or_path", base_dir, "--dataset_name", "digits",
            "--input_size", "32", "--pad_size", "4", "--max_train_samples", "64", "--max_eval_samples", "32",
            "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--flops_ratio", "0.5",
            "--search_epochs", "2", "--finetune_epochs", "1", "--max_steps_per_epoch", "2", "--cpu",
            "--torch_threads", "1", "--latency_batch_sizes", "1", "--output_dir", str(output_dir), *extra]


def test_method_registration():
    method = get_method("vpns_channels")
    assert method.structured and method.prompt_method == "pad" and method.steps == "two"
    assert method.display_name == "VPNs (channels)"
    assert [getattr(s, "kind", getattr(s, "criterion", None)) for s in method.plan] == ["search", "channel_scores",
                                                                                           "finetune"]


def run_recipe(argv):
    """`recipes/pass.py` in this process (the same code path as `accelerate launch recipes/pass.py ...`)."""
    import importlib.util

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    try:
        spec = importlib.util.spec_from_file_location("pass_recipe", os.path.join(ROOT, "recipes", "pass.py"))
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        recipe.main(argv)
    finally:
        sys.path.remove(os.path.join(ROOT, "recipes"))


def test_recipe_end_to_end_and_exact_resume_of_the_search(base_dir, tmp_path, capsys):
    full = tmp_path / "full"
    run_recipe(recipe_flags(base_dir, full))
    results = json.load(open(full / "results.json"))
    assert results["method"] == "vpns_channels" and results["flops_target"] == 0.5
    assert abs(results["flops_ratio"] - 0.5) <= 0.02 and results["params"] < results["dense_params"]
    assert [h["kind"] for h in results["history"]] == ["search", "search", "finetune"]
    assert "test_accuracy_prompt" in results["accuracy"]["test"]
    assert results["learning_rates"]["search/score_lr"] == pytest.approx(3e-2)  # the 'auto' rule at 8 steps
    ckpt = full / "checkpoints" / "stage0-epoch0"  # a search checkpoint holds the scores (what a resume restores)
    assert "structure.channel_scores.scores" in load_file(ckpt / "model.safetensors")

    saved = PromptedSparseModel.from_pretrained(full)
    assert saved.config.structure_search == "scores" and saved.config.channel_widths == results["channel_widths"]
    assert measure_flops(saved.model, 32) == pytest.approx(results["flops"])
    assert results["flops"] / results["dense_flops"] == pytest.approx(results["flops_ratio"])
    weights = load_file(full / "model.safetensors")
    start = PromptedSparseModel.from_base(base_dir, sparsity_type="structured", structure_search="scores",
                                          input_size=32, output_size=32, pad_size=4)
    assert not torch.equal(weights["structure.channel_scores.scores"], start.structure.channel_scores.scores.detach())
    for k, v in saved.state_dict().items():  # what was saved is what loads, the compact weights included
        assert torch.equal(v, weights[k]), k
    again = PromptedSparseModel.from_pretrained(full)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(saved(x).logits, again(x).logits, rtol=0, atol=0)

    # resume inside the search stage (after its first epoch): the same final model, bit for bit
    resumed = tmp_path / "resumed"
    capsys.readouterr()
    run_recipe(recipe_flags(base_dir, resumed, "--resume_from_checkpoint", str(ckpt)))
    assert f"resumed search at epoch 1 from {ckpt}" in capsys.readouterr().out
    a, b = weights, load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and "structure.channel_scores.scores" in a
    for key in a:  # the final scores too: 8 search steps in both runs, the first 4 restored from the checkpoint
        assert torch.equal(a[key], b[key]), key
    assert json.load(open(resumed / "results.json"))["history"] == results["history"]


def test_transfer_of_a_channel_scores_subnetwork_has_no_hypernetwork_to_adapt():
    from prompt_sparsity.transfer import TransferArguments, transfer_plan

    config = PromptedSparseConfig(sparsity_type="structured", structure_search="scores", channel_widths={"a": 1})
    assert [getattr(s, "criterion", None) for s in transfer_plan(config, TransferArguments(subnetwork="x")).plan][0] \
        == "transferred_structure"
    with pytest.raises(ValueError, match="no hypernetwork to adapt"):
        transfer_plan(config, TransferArguments(subnetwork="x", adapt_hypernetwork=True))
