"""Budget-aware search (issue 11): the 'auto' learning-rate rule, per-group optimisers and schedules, the
layer-collapse floor (and its warning), and FLM falling back to the dense network when the masked one collapses."""

import copy
import json
import math
import warnings

import pytest
import torch
from tiny_models import tiny_model

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.label_mapping import greedy_assignment, is_degenerate
from prompt_sparsity.methods.pruners import prune_once
from prompt_sparsity.optim import (
    PAPER_SEARCH_STEPS,
    SCORE_LR_RULE,
    GroupwiseOptimizer,
    LrRule,
    build_optimizer,
    resolve_lr,
    schedule_fn,
)
from prompt_sparsity.sparsity.unstructured import collapsed_layers, num_pruned
from prompt_sparsity.training import run_pruning

S = 32


# ------------------------------------------------------------------------------------------------ lr rule
def test_auto_rule_keeps_the_papers_step_length_between_its_bounds():
    rule = LrRule(reference_lr=1e-4, reference_steps=10_000, max_lr=1e-2)
    assert rule(10_000) == pytest.approx(1e-4)  # the paper's own budget: the paper's lr
    assert rule(1_000) == pytest.approx(1e-3)  # 10x fewer steps: 10x the lr (same lr x steps)
    assert rule(50) == pytest.approx(1e-2)  # capped
    assert rule(100_000) == pytest.approx(1e-4)  # never below the paper's lr
    assert rule(0) == pytest.approx(1e-2)  # degenerate step counts do not divide by zero
    # The shipped rule: the paper's step count is 2 steps x 196 iterations x 30 epochs.
    assert PAPER_SEARCH_STEPS == 2 * 196 * 30
    assert SCORE_LR_RULE(PAPER_SEARCH_STEPS) == pytest.approx(1e-4)
    assert SCORE_LR_RULE(40) == pytest.approx(min(SCORE_LR_RULE.max_lr, 1e-4 * PAPER_SEARCH_STEPS / 40))
    assert SCORE_LR_RULE(40) > 100 * 1e-4  # a 40-step search moves the scores (1e-4 would not)


def test_resolve_lr_numbers_strings_auto_and_errors():
    rule = LrRule(1e-4, 1000, 1e-2)
    assert resolve_lr("auto", rule, 100, "score_lr") == pytest.approx(1e-3)
    assert resolve_lr("AUTO ", rule, 100, "score_lr") == pytest.approx(1e-3)
    assert resolve_lr("3e-3", rule, 100, "score_lr") == 3e-3
    assert resolve_lr(0.5, rule, 100, "score_lr") == 0.5
    with pytest.raises(ValueError, match="--score_lr='fast'.*positive number.*auto"):
        resolve_lr("fast", rule, 100, "score_lr")
    with pytest.raises(ValueError, match="--score_lr=-1.0"):
        resolve_lr(-1.0, rule, 100, "score_lr")
    with pytest.raises(ValueError, match="--finetune_lr=auto: this learning rate has no budget rule"):
        resolve_lr("auto", None, 100, "finetune_lr")


# ------------------------------------------------------------------------------------------------ optimisers
def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, generator=g)) for _ in range(2)]


def _grads(params, step):
    for i, p in enumerate(params):
        p.grad = torch.sin(torch.arange(5.0) * (step + 1) + i)


def test_groupwise_optimiser_equals_separate_torch_optimisers():
    a, b = _params(0), _params(0)
    mixed = build_optimizer([{"params": [a[0]], "lr": 0.1, "weight_decay": 1e-2, "optimizer": "adam"},
                             {"params": [a[1]], "lr": 0.05, "weight_decay": 0.0, "optimizer": "sgd"}], momentum=0.9)
    assert isinstance(mixed, GroupwiseOptimizer) and mixed.kinds == ["adam", "sgd"]
    adam = torch.optim.Adam([{"params": [b[0]], "lr": 0.1, "weight_decay": 1e-2}])
    sgd = torch.optim.SGD([{"params": [b[1]], "lr": 0.05}], momentum=0.9)
    fns = [schedule_fn("cosine", 6), schedule_fn("multistep", 6)]
    sched = torch.optim.lr_scheduler.LambdaLR(mixed, fns)
    ref = [torch.optim.lr_scheduler.LambdaLR(adam, fns[0]), torch.optim.lr_scheduler.LambdaLR(sgd, fns[1])]
    for step in range(6):
        _grads(a, step)
        _grads(b, step)
        mixed.step()
        adam.step()
        sgd.step()
        sched.step()
        for r in ref:
            r.step()
        mixed.zero_grad()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert mixed.param_groups[1]["lr"] == pytest.approx(sgd.param_groups[0]["lr"])
    # state_dict round trip into a fresh one continues identically
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    again = build_optimizer([{"params": [c[0]], "lr": 0.1, "weight_decay": 1e-2, "optimizer": "adam"},
                             {"params": [c[1]], "lr": 0.05, "weight_decay": 0.0, "optimizer": "sgd"}], momentum=0.9)
    again.load_state_dict(copy.deepcopy(mixed.state_dict()))  # torch shares loaded tensors: copy
    _grads(a, 9)
    _grads(c, 9)
    mixed.step()
    again.step()
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_one_kind_of_optimiser_is_the_plain_torch_one():
    p = _params(1)
    opt = build_optimizer([{"params": [p[0]], "lr": 0.1, "optimizer": "sgd"},
                           {"params": [p[1]], "lr": 0.2, "optimizer": "sgd"}])
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="--optimizer='lion'"):
        build_optimizer([{"params": [p[0]], "lr": 0.1, "optimizer": "lion"}])
    with pytest.raises(ValueError, match="--schedule='linear'"):
        schedule_fn("linear", 10)


# ------------------------------------------------------------------------------------------------ collapse
def _starved(min_layer_density, sparsity=0.9):
    """A tiny model whose classifier weights are 1000x smaller than the rest: the scaled init + global threshold
    then give the whole classifier the lowest scores."""
    base = tiny_model("mobilenet_v2")
    with torch.no_grad():
        base.classifier.weight.mul_(1e-3)
    model = PromptedSparseModel.from_base(base, sparsity=sparsity, input_size=S, output_size=S, pad_size=4,
                                          min_layer_density=min_layer_density)
    with torch.no_grad():  # make the classifier's scores the smallest of all, whatever the init did
        layer = next(lay for lay in model.sparsity.layers if lay.name == "classifier")
        model.sparsity.scores[layer.offset:layer.offset + layer.numel].mul_(1e-6)
    return model, layer


def test_without_the_floor_a_layer_collapses_and_a_warning_names_it():
    model, head = _starved(0.0)
    mask = model.sparsity.mask()
    assert int(mask[head.offset:head.offset + head.numel].sum()) == 0  # the classifier is gone
    with pytest.warns(UserWarning, match=r"above 99% sparsity: .*classifier \(100\.00%\)"):
        model.freeze_mask()


def test_the_floor_prevents_collapse_and_keeps_the_global_count_exact():
    model, head = _starved(0.01)
    mask = model.sparsity.mask()
    n = mask.numel()
    assert n - int(mask.sum()) == num_pruned(0.9, n)  # still exactly 90% over all pruned weights
    kept = int(mask[head.offset:head.offset + head.numel].sum())
    assert kept == math.ceil(0.01 * head.numel)  # the classifier keeps its floor, its largest scores
    scores = model.sparsity.scores.detach()[head.offset:head.offset + head.numel].abs()
    kept_idx = mask[head.offset:head.offset + head.numel].bool()
    assert scores[kept_idx].min() >= scores[~kept_idx].max()
    for layer in model.sparsity.layers:
        assert int(mask[layer.offset:layer.offset + layer.numel].sum()) >= math.ceil(0.01 * layer.numel)
    assert collapsed_layers(mask, model.sparsity.layers) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no collapse warning
        model.freeze_mask()


def test_label_mapped_head_rows_each_keep_weights():
    model, head = _starved(0.05)
    mapping = [3, 7, 1]
    model.set_label_mapping(mapping, {0: "a", 1: "b", 2: "c"})
    mask = model.sparsity.mask()
    rows = mask[head.offset:head.offset + head.numel].view(head.shape)
    for r in mapping:
        assert int(rows[r].sum()) >= math.ceil(0.05 * head.shape[1])
    assert mask.numel() - int(mask.sum()) == num_pruned(0.9, mask.numel())
    # the same floor holds for a one-shot pruner (SNIP-style importances through prune_once)
    mask = prune_once(model, "magnitude", 0.9)
    rows = mask[head.offset:head.offset + head.numel].view(head.shape)
    assert all(int(rows[r].sum()) >= math.ceil(0.05 * head.shape[1]) for r in mapping)
    assert mask.numel() - int(mask.sum()) == num_pruned(0.9, mask.numel())


def test_floor_too_large_for_the_sparsity_is_a_clear_error():
    with pytest.raises(ValueError, match="floor needs .* kept weights but sparsity keeps only"):
        _starved(0.5, sparsity=0.9)[0].sparsity.mask()
    with pytest.raises(ValueError, match="min_layer_density=2"):
        PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity=0.5, input_size=S, output_size=S,
                                      pad_size=4, min_layer_density=2)


# ------------------------------------------------------------------------------------------------ FLM
def test_degenerate_counts_are_detected():
    collapsed = torch.zeros(6, 3, dtype=torch.long)
    collapsed[4] = torch.tensor([5, 7, 9])  # one source class for every image
    assert is_degenerate(collapsed)
    assert greedy_assignment(collapsed) == [0, 1, 4]  # the greedy rule's answer: two targets get arbitrary rows
    healthy = torch.zeros(6, 3, dtype=torch.long)
    healthy[0, 1], healthy[2, 0], healthy[5, 2] = 4, 3, 2
    assert not is_degenerate(healthy)


def test_flm_on_a_collapsed_network_uses_the_dense_one(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(base_dir)
    run = tmp_path / "run"
    # 99.9% with no floor: the classifier (and more) is emptied, the masked network outputs its bias only.
    results = run_pruning(
        ModelArguments(model_name_or_path=str(base_dir), input_size=16, pad_size=2),
        DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                      per_device_train_batch_size=16, dataloader_num_workers=0),
        PruningArguments(method="hydra", sparsity=0.999, min_layer_density=0.0, search_epochs=1, finetune_epochs=0),
        RunArguments(output_dir=str(run), seed=7, cpu=True, max_steps_per_epoch=1, torch_threads=1,
                     checkpointing=False, dense_reference=False),
    )
    source = results["label_mapping_source"]
    assert source["network"] == "dense" and source["masked_distinct_predictions"] < 10
    assert "fewer than the 10 targets" in source["reason"]
    assert source["distinct_predictions"] > source["masked_distinct_predictions"]  # (a random tiny base: few)
    assert json.load(open(run / "results.json"))["label_mapping_source"] == source
    assert len(set(results["label_mapping"])) == 10
    # The recorded learning rates: 'auto' resolved at this run's step count (1 epoch x 1 step).
    assert results["learning_rates"]["search/score_lr"] == pytest.approx(SCORE_LR_RULE(1))


def test_flm_on_a_healthy_network_stays_on_the_masked_one(tmp_path, monkeypatch):
    import prompt_sparsity.training as training

    base_dir = tmp_path / "base"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(base_dir)
    calls = []

    def healthy_flm(model, loader, num_labels, **kwargs):  # tiny random bases predict 1-2 classes: feign 10
        calls.append(model)
        counts = torch.zeros(20, num_labels, dtype=torch.long)
        counts[torch.arange(num_labels) + 5, torch.arange(num_labels)] = 3
        return greedy_assignment(counts), counts

    monkeypatch.setattr(training, "frequency_label_mapping", healthy_flm)
    results = run_pruning(
        ModelArguments(model_name_or_path=str(base_dir), input_size=16, pad_size=2),
        DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                      per_device_train_batch_size=16, dataloader_num_workers=0),
        PruningArguments(method="snip", sparsity=0.3, finetune_epochs=0, pruner_batches=1,
                         finetune_optimizer="adam", finetune_schedule="multistep"),
        RunArguments(output_dir=str(tmp_path / "run"), seed=7, cpu=True, max_steps_per_epoch=1, torch_threads=1,
                     checkpointing=False, dense_reference=False, eval_test=False),
    )
    assert results["label_mapping_source"] == {"network": "masked", "distinct_predictions": 10, "flm_network": "auto"}
    assert len(calls) == 1 and results["label_mapping"] == list(range(5, 15))  # no second (dense) FLM
    assert "test" not in results["accuracy"] and "validation" in results["accuracy"]


def test_floor_groups_forced_last_step_give_the_same_mask_as_a_fresh_selection():
    model, head = _starved(0.01)
    model.sparsity.mask()
    assert model.sparsity._forced  # the classifier was forced in
    with torch.no_grad():  # the classifier's scores become the largest: no floor is needed any more
        model.sparsity.scores[head.offset:head.offset + head.numel].mul_(1e9)
    sticky = model.sparsity.update_mask().clone()  # starts from the stale forced set
    model.sparsity._forced.clear()
    fresh = model.sparsity.update_mask()
    assert torch.equal(sticky, fresh)
    assert int(fresh[head.offset:head.offset + head.numel].sum()) > math.ceil(0.01 * head.numel)


def test_mixed_optimisers_resume_exactly(tmp_path):
    """Adam for the scores, SGD for the search prompt (a GroupwiseOptimizer), multistep scores: the checkpoint
    restores both inner optimisers and the run continues bit for bit."""
    from safetensors.torch import load_file

    base_dir = tmp_path / "base"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(base_dir)

    def groups(out, **run):
        return (ModelArguments(model_name_or_path=str(base_dir), input_size=16, pad_size=2),
                DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                              per_device_train_batch_size=16, dataloader_num_workers=0),
                PruningArguments(method="vpns", sparsity=0.8, search_epochs=2, finetune_epochs=1,
                                 search_prompt_optimizer="sgd", score_schedule="multistep",
                                 finetune_prompt_optimizer="adam"),
                RunArguments(output_dir=str(out), seed=7, cpu=True, max_steps_per_epoch=2, torch_threads=1,
                             dense_reference=False, **run))

    full = run_pruning(*groups(tmp_path / "full"))
    # 'auto': the step rule capped at a tenth of the threshold the search starts from (optim.auto_score_lr)
    assert full["learning_rates"]["search/score_lr"] == pytest.approx(
        min(SCORE_LR_RULE(2 * 2 * 2), 0.1 * full["score_threshold_at_start"]["search"]))
    resumed = run_pruning(*groups(tmp_path / "resumed",
                                  resume_from_checkpoint=str(tmp_path / "full" / "checkpoints" / "stage0-epoch0")))
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["history"] == resumed["history"]
