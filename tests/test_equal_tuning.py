"""Measuring the mask, not the tuning recipe: tuning recipes through the registry, score init at any one-shot
criterion's mask, the `auto` score lr tied to the threshold, mask overlap/flip statistics, and the FLM network."""

import importlib.util
import json
import os

import pytest
import torch
from tiny_models import tiny_model

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.methods import SCORE_INITS, get_method, with_tuning
from prompt_sparsity.methods.pruners import (
    criterion_importance,
    init_scores_from_criterion,
    mask_from_importance,
    score_threshold,
)
from prompt_sparsity.optim import SCORE_LR_RULE, SCORE_STEP_FRACTION, auto_score_lr
from prompt_sparsity.sparsity.unstructured import num_pruned, scaled_scores
from prompt_sparsity.training import PruningRun, run_pruning

S = 32


def _model(sparsity=0.9, **kwargs):
    return PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity=sparsity, input_size=S, pad_size=2,
                                         **kwargs)


def _batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.rand(8, 3, S, S, generator=g), "labels": torch.randint(0, 10, (8,), generator=g)}
            for _ in range(n)]


def _scaled_threshold(model):
    params = dict(model.model.named_parameters())
    flat = torch.cat([scaled_scores(params[layer.param_name].detach()).flatten() for layer in model.sparsity.layers])
    return float(torch.kthvalue(flat.abs(), num_pruned(model.sparsity.sparsity, flat.numel())).values)


# ------------------------------------------------------------------------------------------------ score init
@pytest.mark.parametrize("criterion", [c for c in SCORE_INITS if c != "scaled"])
@pytest.mark.parametrize("threshold", ["global", "layerwise"])
def test_init_mask_is_exactly_the_criterion_mask(criterion, threshold):
    model = _model(threshold=threshold)
    batches = _batches() if criterion in ("snip", "grasp") else None
    expected = mask_from_importance(
        model, criterion_importance(model, criterion, 0.9, batches=batches, threshold=threshold,
                                    generator=torch.Generator().manual_seed(3), synflow_iterations=5),
        0.9, threshold)
    before = model.sparsity.mask().clone()
    info = init_scores_from_criterion(model, criterion, batches=batches, generator=torch.Generator().manual_seed(3),
                                      synflow_iterations=5)
    assert torch.equal(model.sparsity.mask(), expected)
    if (criterion, threshold) != ("magnitude", "layerwise"):  # (the scaled init is per-layer magnitude order)
        assert not torch.equal(before, expected)  # the scaled init's mask is another one: the test can fail
    assert not model.sparsity.frozen  # still trainable scores
    if threshold == "global":  # the threshold sits where the scaled init puts it
        assert score_threshold(model) == pytest.approx(_scaled_threshold(model), rel=1e-5)
        assert info["threshold"] == pytest.approx(_scaled_threshold(model), rel=1e-6)


def test_init_is_exact_with_ties_at_the_threshold():
    model = _model()
    with torch.no_grad():  # coarse weights: thousands of exact ties, broken by position in the criterion's mask
        for layer in model.sparsity.layers:
            w = dict(model.model.named_parameters())[layer.param_name]
            w.copy_((w * 20).round() / 20)
    expected = mask_from_importance(model, criterion_importance(model, "magnitude", 0.9), 0.9)
    init_scores_from_criterion(model, "magnitude")
    assert torch.equal(model.sparsity.mask(), expected)


def test_score_init_survives_the_layer_floor_and_keeps_weight_signs():
    model = _model(sparsity=0.97)  # the floor forces weights into starved layers
    expected = mask_from_importance(model, criterion_importance(model, "magnitude", 0.97), 0.97)
    init_scores_from_criterion(model, "magnitude")
    assert torch.equal(model.sparsity.mask(), expected)
    weights = torch.cat([dict(model.model.named_parameters())[layer.param_name].detach().flatten()
                         for layer in model.sparsity.layers])
    nonzero = weights != 0
    assert torch.equal(torch.sign(model.sparsity.scores.detach()[nonzero]), torch.sign(weights[nonzero]))


def test_score_init_needs_trainable_scores():
    model = _model()
    model.freeze_mask()
    with pytest.raises(ValueError, match="needs trainable mask scores"):
        init_scores_from_criterion(model, "magnitude")


def test_score_init_defaults_to_the_methods_own():
    """No --score_init: VPNs starts at SNIP's mask (measured best), HYDRA at the paper's scaled init; 'scaled' given
    explicitly restores the paper's VPNs; a method without a score search accepts the default."""
    assert PruningArguments().score_init is None
    assert get_method("vpns").score_init == "snip" and get_method("hydra").score_init == "scaled"
    assert with_tuning(get_method("vpns"), finetune_steps="augmented").score_init == "snip"


@pytest.mark.parametrize("method, score_init, expected", [
    ("vpns", None, "snip"), ("vpns", "scaled", None), ("hydra", None, None)])
def test_a_run_starts_at_the_resolved_score_init(tmp_path, base, method, score_init, expected):
    run = PruningRun(*_args(tmp_path, base, PruningArguments(method=method, sparsity=0.9, score_init=score_init,
                                                             pruner_batches=1)))
    run.build()
    run.init_scores()
    assert (run.state.get("score_init") or {}).get("criterion") == expected
    if expected == "snip":  # the first mask is SNIP's
        batches = run._first_batches(1)
        importance = criterion_importance(run.model, "snip", 0.9, batches=batches,
                                          threshold=run.model.sparsity.threshold)
        want = mask_from_importance(run.model, importance, 0.9, run.model.sparsity.threshold)
        assert torch.equal(run.model.sparsity.mask().to(want), want)


# ------------------------------------------------------------------------------------------------ lr rule
def test_auto_score_lr_is_capped_at_a_fraction_of_the_threshold():
    assert auto_score_lr(40, 0.03) == pytest.approx(SCORE_STEP_FRACTION * 0.03)  # the cap binds
    assert auto_score_lr(40, 10.0) == pytest.approx(SCORE_LR_RULE(40))  # a large threshold: the step rule
    assert auto_score_lr(40, None) == pytest.approx(SCORE_LR_RULE(40))  # unknown: the step rule
    assert auto_score_lr(11_760, 0.03) == pytest.approx(min(1e-4, 3e-3))


def _args(tmp_path, base, prune, model=None, **run):
    return (ModelArguments(model_name_or_path=str(base), input_size=16, pad_size=2, **(model or {})),
            DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                          per_device_train_batch_size=16, dataloader_num_workers=0),
            prune,
            RunArguments(output_dir=str(tmp_path / "run"), seed=7, cpu=True, max_steps_per_epoch=2, torch_threads=1,
                         **{"checkpointing": False, "dense_reference": False, "eval_test": False, **run}))


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(path)
    return path


def test_a_run_records_init_lr_overlap_flips_and_flm_network(tmp_path, base):
    results = run_pruning(*_args(tmp_path, base, PruningArguments(
        method="vpns", sparsity=0.9, score_init="snip", pruner_batches=1, search_epochs=2, finetune_epochs=1,
        flm_network="dense")))
    saved = json.load(open(tmp_path / "run" / "results.json"))
    # score init: recorded with the threshold the search starts from
    assert saved["score_init"]["criterion"] == "snip"
    threshold = saved["score_threshold_at_start"]["search"]
    assert threshold == pytest.approx(saved["score_init"]["threshold"], rel=1e-5)
    # the auto lr: the step rule capped at a tenth of that threshold (2 epochs x 2 iterations x 2 steps)
    assert saved["learning_rates"]["search/score_lr"] == pytest.approx(auto_score_lr(8, threshold))
    # mask dynamics per search epoch, in the history and summarised
    dyn = saved["mask_dynamics"]["stage0_search"]
    assert len(dyn["flip_fraction_per_epoch"]) == 2 and all(0 <= f <= 1 for f in dyn["flip_fraction_per_epoch"])
    assert 0 < dyn["overlap_with_start"] <= 1
    search = [h for h in saved["history"] if h["kind"] == "search"]
    assert search[-1]["mask_overlap_with_start"] == dyn["overlap_with_start"]
    assert all("mask_flip_fraction" not in h for h in saved["history"] if h["kind"] == "finetune")
    # the FLM network asked for is the one used, and recorded
    assert saved["label_mapping_source"]["network"] == "dense"
    assert saved["label_mapping_source"]["flm_network"] == "dense"


def test_flm_network_masked_never_falls_back(tmp_path, base):
    results = run_pruning(*_args(tmp_path, base, PruningArguments(
        method="hydra", sparsity=0.999, min_layer_density=0.0, search_epochs=1, finetune_epochs=0,
        flm_network="masked")))
    source = results["label_mapping_source"]  # collapsed (auto would use the dense network), kept as asked
    assert source == {"network": "masked", "distinct_predictions": source["distinct_predictions"],
                      "flm_network": "masked"}
    assert source["distinct_predictions"] < 10


@pytest.mark.parametrize("prune, model, match", [
    (dict(method="snip", score_init="magnitude"), {}, "--score_init magnitude .* --method snip has none"),
    (dict(method="pass", score_init="snip"), {}, "--method pass has none"),
    (dict(method="vpns", flm_network="dense"), {"head": "new"}, "--head new trains a new head"),
    (dict(method="dense", flm_network="masked"), {}, "prunes nothing"),
])
def test_nonsense_combinations_are_refused(tmp_path, base, prune, model, match):
    with pytest.raises(ValueError, match=match):
        PruningRun(*_args(tmp_path, base, PruningArguments(**prune), model=model))


# ------------------------------------------------------------------------------------------------ tuning recipes
def test_every_method_has_a_two_step_and_a_prompted_variant():
    for name in ("snip", "omp", "random", "hydra", "imp", "dense", "l1"):
        method = get_method(name)
        variant = with_tuning(method, finetune_steps="two", prompt_method="pad")
        last = [s for s in variant.plan if hasattr(s, "kind") and not hasattr(s, "criterion")][-1]
        assert last.steps == "two" and variant.prompt_method == "pad"
        assert variant.display_name == f"{method.display_name} w. two-step tuning + prompt"
        # the mask-finding stages are untouched
        assert [getattr(s, "steps", None) for s in variant.plan[:-1]] == [getattr(s, "steps", None)
                                                                          for s in method.plan[:-1]]
    vpns = get_method("vpns")  # its own recipe already is two-step + prompt: the same method
    assert with_tuning(vpns, finetune_steps="two", prompt_method="pad") is vpns
    assert with_tuning(vpns, prompt_method="none").display_name == "VPNs w. no prompt"
    with pytest.raises(ValueError, match="finetune_steps='twice'"):
        with_tuning(vpns, finetune_steps="twice")


def test_a_baseline_tuned_with_the_shared_recipe(tmp_path, base):
    results = run_pruning(*_args(tmp_path, base, PruningArguments(
        method="snip", sparsity=0.5, pruner_batches=1, finetune_epochs=1, finetune_steps="two"),
        model={"prompt_method": "pad"}))
    assert results["method"] == "snip" and results["method_display"] == "SNIP w. two-step tuning + prompt"
    assert results["tuning"] == {"finetune_steps": "two", "prompt_method": "pad"}
    assert "validation_accuracy_prompt" in results["accuracy"]["validation"]  # the prompt is trained and evaluated
    assert "finetune/finetune_prompt_lr" in results["learning_rates"]


def _benchmarks_common():
    """benchmarks/common.py (not a package): the benchmarks' shared helpers."""
    pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "common.py")
    spec = importlib.util.spec_from_file_location("benchmarks_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


def test_benchmark_budgets_count_two_step_tuning_as_two_passes():
    common = _benchmarks_common()
    assert common.equal_budget_epochs("snip", 8) == {"finetune_epochs": 8}
    assert common.equal_budget_epochs("snip", 8, tuning="two_step_prompt") == {"finetune_epochs": 4}
    assert common.equal_budget_epochs("omp", 8, tuning="two_step") == {"dense_epochs": 4, "finetune_epochs": 2}
    assert common.equal_budget_epochs("dense", 8, tuning="two_step") == {"dense_epochs": 4}
    assert common.canonical_tuning("vpns", "two_step_prompt") == "paper"  # VPNs' own recipe: runs are shared
    _, _, prune, _ = common.accuracy_run_args(dataset="d", input_size=32, batch_size=64, method="vpns:snip", seed=7,
                                              passes=8, threads=1, tuning="two_step_prompt")
    assert prune.score_init == "snip" and prune.method == "vpns" and prune.finetune_steps == "two"


def test_pass_recipe_gives_the_search_a_quarter_of_the_passes():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "recipes", "pass.py"), "--help"], capture_output=True,
                         text=True, cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=120).stdout
    def default_of(flag):  # the help entry (not the usage line): "  --flag FLAG, ... (default: x)"
        entry = out[out.index(f"\n  {flag} "):]
        return entry[:entry.index("\n  --", 3)]

    assert "(default: 3)" in default_of("--finetune_epochs")
    assert "(default: 2)" in default_of("--search_epochs")  # 2 prompted passes of 2 + 3 x 2 = 8: a quarter


def test_benchmark_fixed_dataset_is_written_once_and_loads(tmp_path):
    """The benchmarks' fixed subset: saved to disk (the splits' decode-on-access transform must not reach
    save_to_disk), class-balanced sizes as asked, and reloaded by the library like any save_to_disk folder."""
    common = _benchmarks_common()
    from prompt_sparsity.data import load_image_dataset

    folder = common.fixed_dataset(tmp_path / "work", train=40, validation=20, test=30, source="digits")
    assert folder == common.fixed_dataset(tmp_path / "work", train=40, validation=20, test=30, source="digits")
    data = load_image_dataset(folder, max_train_samples=None, max_eval_samples=None)
    assert (len(data.train), len(data.validation), len(data.test)) == (40, 20, 30)
    assert data.train[0]["image"].mode == "RGB"


def test_the_dense_floor_does_not_change_the_run(tmp_path, base):
    """dense_reference (pretrained + FLM, no training) is measured beside the run, on a copy: the run's mask and
    accuracy are the same with and without it."""
    prune = lambda: PruningArguments(method="vpns", sparsity=0.9, search_epochs=1, finetune_epochs=1)  # noqa: E731
    without = run_pruning(*_args(tmp_path / "a", base, prune(), eval_test=True))
    with_floor = run_pruning(*_args(tmp_path / "b", base, prune(), dense_reference=True, eval_test=True))
    assert with_floor["dense_pretrained_flm"] is not None and without["dense_pretrained_flm"] is None
    assert with_floor["mask_sha256"] == without["mask_sha256"]
    assert with_floor["accuracy"] == without["accuracy"]
