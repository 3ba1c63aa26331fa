"""IMP (iterative magnitude pruning with rewinding) and BiP (bi-level weight/score steps with the implicit gradient):
IMP's round schedule and exact counts, pruned weights never coming back, rewinding, resume mid-IMP; BiP's
implicit-gradient term against a direct autograd computation, one full iteration checked step by step, a mask that
moves during the search; end-to-end tiny runs of both (and with the prompt) that save and reload the same mask."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import IMAGE_SIZE, recipe_args, tiny_model
from torch.func import functional_call

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.arguments import PruningArguments
from prompt_sparsity.methods import Prune, Stage, expand_plan, get_method, imp_schedule, split_evenly
from prompt_sparsity.methods.bilevel import bilevel_iteration, implicit_gradient
from prompt_sparsity.methods.pruners import kept_magnitude_importance, prune_once
from prompt_sparsity.sparsity.unstructured import num_pruned
from prompt_sparsity.training import mask_digest, run_pruning

S = IMAGE_SIZE


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-resnet"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(path)
    return str(path)


def wrap(sparsity=0.9, **kwargs):
    return PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity=sparsity, input_size=S, output_size=S,
                                         pad_size=4, **kwargs)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(n, 3, S, S, generator=g), "labels": torch.randint(0, 10, (n,), generator=g)}


def flat_mask(model):
    return model.sparsity.mask().clone()


# --------------------------------------------------------------------------------------------------- IMP schedule
def test_imp_schedule_rounds_and_levels():
    levels = imp_schedule(0.9, 0.2)
    assert len(levels) == 11 and levels[-1] == 0.9  # 1 - 0.8^10 = 89.3% < 90%: an eleventh round lands on 90%
    assert levels[:10] == [round(1 - 0.8 ** r, 12) for r in range(1, 11)]
    assert levels[0] == 0.2 and levels[1] == 0.36  # 20% of the rest each round
    assert len(imp_schedule(0.8, 0.2)) == 8 and len(imp_schedule(0.2, 0.2)) == 1 and imp_schedule(0.0, 0.2) == []
    assert imp_schedule(0.36, 0.2) == [0.2, 0.36]  # a target on the schedule needs no extra round
    with pytest.raises(ValueError, match="imp_prune_rate"):
        imp_schedule(0.9, 1.0)
    assert split_evenly(4, 11) == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 1] and sum(split_evenly(37, 5)) == 37
    with pytest.raises(ValueError, match="imp_prune_rate"):
        PruningArguments(method="imp", imp_prune_rate=0.0)


def test_expand_plan_unrolls_every_round():
    args = PruningArguments(method="imp", sparsity=0.5, imp_epochs=3, finetune_epochs=1)
    plan = expand_plan(get_method("imp").plan, args, 0.5, iters_per_epoch=4)
    prunes = [s for s in plan if isinstance(s, Prune)]
    stages = [s for s in plan if isinstance(s, Stage)]
    assert [p.sparsity for p in prunes] == [0.2, 0.36, 0.488, 0.5] and all(p.rewind for p in prunes)
    assert [s.kind for s in stages] == ["dense", "finetune", "finetune", "finetune", "finetune"]
    assert [s.iterations for s in stages[:-1]] == [3, 3, 3, 3]  # 3 epochs x 4 iterations over 4 phases
    assert stages[-1].iterations is None and stages[-1].epochs_field == "finetune_epochs"
    assert len({s.shuffle_offset for s in stages[:-1]}) == 4  # each phase has shuffles of its own


# --------------------------------------------------------------------------------------------------- IMP pruning
def test_kept_magnitude_rounds_hit_exact_counts_and_never_restore_weights():
    model = wrap(min_layer_density=0.01)
    model.set_mask(torch.ones(model.sparsity.numel))
    n = model.sparsity.numel
    params = dict(model.model.named_parameters())
    previous = flat_mask(model)
    for r, level in enumerate(imp_schedule(0.9, 0.2), start=1):
        if r > 1:  # training moves weights: make every pruned weight the largest one, it must still stay pruned
            with torch.no_grad():
                for layer in model.sparsity.layers:
                    w = params[layer.param_name]
                    m = previous[layer.offset:layer.offset + layer.numel].view(layer.shape)
                    w.copy_(torch.where(m == 0, torch.full_like(w, 100.0), w))
        mask = prune_once(model, "kept_magnitude", level)
        assert int(n - mask.sum()) == num_pruned(level, n)
        # 20% of the rest: each round but the last prunes 0.2 of the weights kept before it, up to rounding
        kept_before, kept_after = int(previous.sum()), int(mask.sum())
        if r < 11:
            assert abs((kept_before - kept_after) - 0.2 * kept_before) < 1.0
        else:
            assert kept_before - kept_after < 0.2 * kept_before  # the last round lands on 90% exactly
        assert not bool(((mask > 0) & (previous == 0)).any()), f"round {r} restored pruned weights"
        assert bool((kept_magnitude_importance(model)[mask == 0] == -1).all())  # scored below every weight
        previous = mask.clone()
    assert int(n - previous.sum()) == num_pruned(0.9, n)
    for layer in model.sparsity.layers:  # the layer floor held in every round
        assert previous[layer.offset:layer.offset + layer.numel].sum() >= 0.01 * layer.numel
    with pytest.raises(ValueError, match="would restore pruned weights"):
        prune_once(model, "kept_magnitude", 0.5)


def test_kept_magnitude_prunes_smallest_kept_weights():
    model = wrap()
    model.set_mask(torch.ones(model.sparsity.numel))
    first = prune_once(model, "kept_magnitude", 0.2)
    weights = torch.cat([dict(model.model.named_parameters())[layer.param_name].detach().abs().flatten()
                         for layer in model.sparsity.layers])
    second = prune_once(model, "kept_magnitude", 0.36)
    newly = (first > 0) & (second == 0)
    survivors = second > 0
    # no floor was binding at these levels: the newly pruned are exactly the smallest of the weights kept before
    assert int(newly.sum()) == num_pruned(0.36, first.numel()) - num_pruned(0.2, first.numel())
    assert weights[newly].max() <= weights[survivors].min()


# --------------------------------------------------------------------------------------------------- IMP runs
def test_imp_run_rewinds_and_reaches_exact_sparsity(base_dir, tmp_path):
    # No training after the last prune: the saved weights are the pretrained ones (rewound), though the rounds
    # before it trained them.
    results = run_pruning(*recipe_args(base_dir, tmp_path, method="imp", sparsity=0.5, imp_epochs=2,
                                       finetune_epochs=0))
    n = results["prunable_weights"]
    assert [r["pruned_weights"] for r in results["imp_rounds"]] == [num_pruned(s, n) for s in (0.2, 0.36, 0.488, 0.5)]
    assert results["pruned_weights"] == num_pruned(0.5, n)
    # 2 epochs x 2 iterations over the 4 phases before the last prune: one iteration each (dense round 0 too)
    assert [(h["stage"], h["kind"]) for h in results["history"]] == [(0, "dense"), (2, "finetune"), (4, "finetune"),
                                                                      (6, "finetune")]
    saved = PromptedSparseModel.from_pretrained(tmp_path)
    assert mask_digest(saved) == results["mask_sha256"]
    assert saved.sparsity_report()["pruned"] == num_pruned(0.5, n)
    pretrained = tiny_model("resnet_basic", num_labels=20).state_dict()
    masks = saved.sparsity.layer_masks()  # the saved file zeroes the pruned weights
    for name, value in saved.model.state_dict().items():
        expected = pretrained[name] * masks[name] if name in masks else pretrained[name]
        assert torch.equal(value, expected), name  # every surviving weight (and bias, norm) rewound


def test_imp_resume_mid_rounds_equals_uninterrupted(base_dir, tmp_path):
    kwargs = dict(method="imp", sparsity=0.5, imp_epochs=2, finetune_epochs=1)
    full = tmp_path / "full"
    run_pruning(*recipe_args(base_dir, full, **kwargs))
    checkpoints = sorted(os.listdir(full / "checkpoints"))
    # plan: dense, then (prune, rewind, train) x 4, the last training being the fine-tune
    assert checkpoints == ["stage0-epoch0", "stage2-epoch0", "stage4-epoch0", "stage6-epoch0", "stage8-epoch0"]
    resumed = tmp_path / "resumed"
    run_pruning(*recipe_args(base_dir, resumed, resume_from_checkpoint=str(full / "checkpoints" / "stage4-epoch0"),
                             **kwargs))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = json.load(open(full / "results.json")), json.load(open(resumed / "results.json"))
    assert ra["imp_rounds"] == rb["imp_rounds"] and len(rb["imp_rounds"]) == 4  # no round redone or skipped
    assert ra["history"] == rb["history"] and ra["accuracy"] == rb["accuracy"]


# --------------------------------------------------------------------------------------------------- BiP
def _direct_grads(model, b, use_prompt):
    """dL/ds (through the model, straight-through), and dL/dz, dL/dtheta of the pruned weights by separate autograd
    computations: z = m * theta as leaves of a functional call of the base model."""
    out = model(pixel_values=b["pixel_values"], labels=b["labels"], use_prompt=use_prompt)
    params = dict(model.model.named_parameters())
    pruned = [params[layer.param_name] for layer in model.sparsity.layers]
    g_s, *g_theta = torch.autograd.grad(out.loss, [model.sparsity.scores, *pruned])
    mask = model.sparsity.layer_masks()
    z = {name: (params[name] * mask[name]).detach().requires_grad_(True) for name in mask}
    x = model.prompt(b["pixel_values"], use_prompt=use_prompt)
    logits = functional_call(model.model, z, (x,), dict(model._forward_kwargs), strict=False).logits
    index = model._label_index(logits.device)
    logits = logits if index is None else logits.index_select(-1, index)
    g_z = torch.autograd.grad(F.cross_entropy(logits, b["labels"]), list(z.values()))
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    return g_s, flat(g_z), flat(g_theta)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_implicit_gradient_matches_direct_autograd(form):
    model = wrap(sparsity=0.8)
    model.start_mask_search()
    model.requires_grad_(True)
    g_s, g_z, g_theta = _direct_grads(model, batch(), use_prompt=False)
    s = model.sparsity.scores.detach()
    m = model.sparsity.mask()
    assert torch.allclose(g_theta, m * g_z, atol=1e-7)  # chain rule through z = m * theta
    c = 0.5
    ig = implicit_gradient(form, s, g_s.clone(), g_theta.clone(), c)
    if form == "code":  # the BiP code: -lr2 * (dL/ds)^2
        expected = -c * g_s * g_s
    else:  # the paper's Hessian-free form -(1/gamma) dL/dz (.) dL/dtheta, to the scores through sign(s)
        expected = -c * torch.sign(s) * g_z * g_theta
        assert bool((ig[m == 0] == 0).all())  # the paper's term acts on kept weights only
    assert torch.allclose(ig, expected, rtol=1e-5, atol=1e-12)
    assert ig.abs().max() > 0


@pytest.mark.parametrize("form", ["code", "paper"])
def test_bilevel_iteration_is_a_weight_step_then_a_corrected_score_step(form):
    """One iteration with plain SGD (no momentum): the weights move by -lr * (dL/dtheta + gamma * theta) on the lower
    batch with the mask fixed, the scores by -lr * (dL/ds + IG) on the upper batch at the updated weights, and
    nothing else moves."""
    torch.manual_seed(0)
    model = wrap(sparsity=0.8)
    model.start_mask_search()
    model.requires_grad_(True)
    model.prompt.requires_grad_(False)
    lr_w, lr_s, gamma, c = 0.05, 0.1, 1e-2, 3.0
    scores = model.sparsity.scores
    weights = [p for n, p in model.named_parameters() if p.requires_grad and p is not scores]
    optimizer = torch.optim.SGD([{"params": weights, "lr": lr_w, "weight_decay": gamma},
                                 {"params": [scores], "lr": lr_s, "weight_decay": 0.0}], momentum=0.0)
    lower_b, upper_b = batch(seed=1), batch(seed=2)
    ref = copy.deepcopy(model)
    # reference lower step
    out = ref(pixel_values=lower_b["pixel_values"], labels=lower_b["labels"], use_prompt=False)
    ref_weights = [p for n, p in ref.named_parameters() if p.requires_grad and n != "sparsity.scores"]
    grads = torch.autograd.grad(out.loss, ref_weights)
    with torch.no_grad():
        for p, g in zip(ref_weights, grads):
            p.sub_(lr_w * (g + gamma * p))
    g_s, g_z, g_theta = _direct_grads(ref, upper_b, use_prompt=False)
    s0 = scores.detach().clone()
    mask_before = flat_mask(model)

    class Plain:  # accelerate's backward without an Accelerator
        backward = staticmethod(lambda loss: loss.backward())

    params = dict(model.model.named_parameters())
    bilevel_iteration(model, optimizer, Plain, upper_b, lower_b, scores=scores, weights=weights,
                      pruned_weights=[params[layer.param_name] for layer in model.sparsity.layers],
                      upper_only=[scores], form=form, scale=c, use_prompt=False)
    for (name, p), p_ref in zip([(n, p) for n, p in model.named_parameters() if p is not scores], ref_weights):
        assert torch.allclose(p, p_ref, atol=1e-6), name
    ig = (-c * g_s * g_s) if form == "code" else (-c * torch.sign(s0) * g_z * g_theta)
    assert ig.abs().max() * lr_s > 1e-6  # the correction is visible at this scale
    assert torch.allclose(scores.detach(), s0 - lr_s * (g_s + ig), atol=1e-6)
    assert not torch.allclose(scores.detach(), s0 - lr_s * g_s, atol=1e-7)  # ... and it was applied
    # the mask follows the scores at the next forward: exact count
    new_mask = flat_mask(model)
    assert int(new_mask.numel() - new_mask.sum()) == int(mask_before.numel() - mask_before.sum())


def test_bip_arguments_are_validated():
    with pytest.raises(ValueError, match="bip_implicit_gradient"):
        PruningArguments(method="bip", bip_implicit_gradient="exact")
    with pytest.raises(ValueError, match="bip_ig_scale"):
        PruningArguments(method="bip", bip_ig_scale=-1.0)
    with pytest.raises(ValueError, match="bip_gamma"):
        PruningArguments(method="bip", bip_gamma=float("nan"))


def test_bip_mask_moves_during_the_search(base_dir, tmp_path):
    still = run_pruning(*recipe_args(base_dir, tmp_path / "no-search", method="bip", search_epochs=0))
    moved = run_pruning(*recipe_args(base_dir, tmp_path / "search", method="bip", search_epochs=1))
    assert still["mask_sha256"] != moved["mask_sha256"]
    assert still["pruned_weights"] == moved["pruned_weights"] == num_pruned(0.8, moved["prunable_weights"])
    assert moved["learning_rates"]["bilevel/score_lr"] > 0 and "bilevel/finetune_lr" in moved["learning_rates"]
    a = PromptedSparseModel.from_pretrained(tmp_path / "no-search").sparsity.mask()
    b = PromptedSparseModel.from_pretrained(tmp_path / "search").sparsity.mask()
    assert int((a != b).sum()) > 0


@pytest.mark.parametrize("method", ["imp", "bip"])
@pytest.mark.parametrize("prompt", ["none", "pad"])
def test_end_to_end_save_and_reload_identical_mask(method, prompt, base_dir, tmp_path):
    extra = {"prompt_method": prompt, "steps": "two"} if prompt != "none" else {}
    results = run_pruning(*recipe_args(base_dir, tmp_path, method=method, **extra))
    assert results["method"] == method and results["prompt_method"] == prompt
    assert results["pruned_weights"] == num_pruned(0.8, results["prunable_weights"])
    saved = PromptedSparseModel.from_pretrained(tmp_path)
    assert saved.config.mask_format == "packed" and mask_digest(saved) == results["mask_sha256"]
    assert saved.sparsity_report()["pruned"] == results["pruned_weights"]
    if prompt != "none":  # "VPNs w. IMP / BiP": the prompt was trained and is applied at inference
        assert "test_accuracy_prompt" in results["accuracy"]["test"]
        assert saved.config.prompt_at_inference and any(p.abs().sum() > 0 for p in saved.prompt.parameters())
    again = PromptedSparseModel.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(saved(pixel_values=x).logits, again(pixel_values=x).logits)


def test_bip_resume_mid_search_equals_uninterrupted(base_dir, tmp_path):
    kwargs = dict(method="bip", search_epochs=2, finetune_epochs=1)
    full = tmp_path / "full"
    run_pruning(*recipe_args(base_dir, full, **kwargs))
    assert sorted(os.listdir(full / "checkpoints")) == ["stage0-epoch0", "stage0-epoch1", "stage1-epoch0"]
    resumed = tmp_path / "resumed"
    run_pruning(*recipe_args(base_dir, resumed, resume_from_checkpoint=str(full / "checkpoints" / "stage0-epoch0"),
                             **kwargs))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = json.load(open(full / "results.json")), json.load(open(resumed / "results.json"))
    assert ra["history"] == rb["history"] and ra["mask_sha256"] == rb["mask_sha256"]


def test_benchmark_budgets_give_imp_and_bip_the_same_passes():
    pytest.importorskip("matplotlib")
    import importlib.util

    # Loaded under its own name: recipes/common.py is the `common` other tests import.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "common.py")
    spec = importlib.util.spec_from_file_location("benchmarks_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    for passes in (4, 8):
        # IMP: its rounds share half the passes, the fine-tune the other half (OMP: dense half, fine-tune half)
        assert common.equal_budget_epochs("imp", passes) == {"imp_epochs": passes // 2, "finetune_epochs": passes // 2}
        # BiP: a bilevel epoch is two passes (a weight batch and a score batch per iteration), like a VPNs epoch
        assert common.equal_budget_epochs("bip", passes) == {"search_epochs": passes // 4, "finetune_epochs": passes // 2}
    # The lr grid scales every rate of the run, 'auto' ones once resolved (PruningArguments.lr_scale).
    _, _, prune, _ = common.accuracy_run_args(dataset="d", input_size=32, batch_size=64, method="bip", seed=7,
                                              passes=8, threads=1, lr_scale=3.0, train=640)
    assert prune.lr_scale == 3.0 and prune.score_lr == "auto" and prune.search_epochs == 2
