"""The VPNs recipe and every unstructured baseline on a tiny model and the built-in `digits` set: exact sparsity,
a loadable subnetwork and results.json, exact resume, identical masks on 2 CPU processes."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import launch_two_cpu_processes, recipe_args, tiny_model

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.methods import METHODS
from prompt_sparsity.sparsity.unstructured import num_pruned
from prompt_sparsity.training import run_pruning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-resnet"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(path)
    return str(path)


def args(base_dir, output_dir, **overrides):
    return recipe_args(base_dir, output_dir, **overrides)


@pytest.mark.parametrize("method", sorted(m for m, spec in METHODS.items() if not spec.structured))
def test_every_method_reaches_exact_sparsity(method, base_dir, tmp_path):
    results = run_pruning(*args(base_dir, tmp_path, method=method))
    saved = PromptedSparseModel.from_pretrained(tmp_path)
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["method"] == method and on_disk["sparsity"] == results["sparsity"]
    assert set(on_disk["accuracy"]["test"]) >= {"test_accuracy_no_prompt", "test_top5_accuracy_no_prompt"}
    report = saved.sparsity_report()
    if method == "random":  # uniform per layer: exact in every layer
        expected = sum(num_pruned(0.8, layer.numel) for layer in saved.sparsity.layers)
    else:
        expected = num_pruned(0.8, report["total"]) if method != "dense" else 0
    assert report["pruned"] == expected == results["pruned_weights"]
    assert saved.config.mask_format == "packed"
    assert saved.config.label_mapping == results["label_mapping"] and len(results["label_mapping"]) == 10
    if method == "vpns":
        assert "test_accuracy_prompt" in on_disk["accuracy"]["test"]
        assert saved.config.prompt_method == "pad" and saved.config.prompt_at_inference
        assert on_disk["dense_pretrained_flm"]["accuracy"] >= 0


def test_prompt_can_be_added_to_any_pruner(base_dir, tmp_path):
    results = run_pruning(*args(base_dir, tmp_path, method="snip", prompt_method="pad", steps="two"))
    assert results["prompt_method"] == "pad" and "test_accuracy_prompt" in results["accuracy"]["test"]
    saved = PromptedSparseModel.from_pretrained(tmp_path)
    assert any(p.abs().sum() > 0 for p in saved.prompt.parameters())  # the prompt was trained


def test_random_is_uniform_per_layer(base_dir, tmp_path):
    results = run_pruning(*args(base_dir, tmp_path, method="random"))
    model = PromptedSparseModel.from_pretrained(tmp_path)
    for layer in model.sparsity.layers:
        assert results["layer_sparsity"][layer.name] == pytest.approx(num_pruned(0.8, layer.numel) / layer.numel)


def test_resume_equals_uninterrupted(base_dir, tmp_path):
    full = tmp_path / "full"
    run_pruning(*args(base_dir, full, search_epochs=2, finetune_epochs=2))
    checkpoints = sorted(os.listdir(full / "checkpoints"))
    assert checkpoints == ["stage0-epoch0", "stage0-epoch1", "stage1-epoch0", "stage1-epoch1"]
    for ckpt in ("stage0-epoch0", "stage1-epoch0"):
        resumed = tmp_path / f"resumed-{ckpt}"
        run_pruning(*args(base_dir, resumed, search_epochs=2, finetune_epochs=2,
                          resume_from_checkpoint=str(full / "checkpoints" / ckpt)))
        a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (ckpt, key)
        ra, rb = json.load(open(full / "results.json")), json.load(open(resumed / "results.json"))
        assert ra["accuracy"] == rb["accuracy"] and ra["history"] == rb["history"]


def test_resume_latest_and_bad_checkpoint(base_dir, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        run_pruning(*args(base_dir, tmp_path / "empty", resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match="not a checkpoint"):
        run_pruning(*args(base_dir, tmp_path / "x", resume_from_checkpoint=str(tmp_path)))


def test_unknown_method_is_refused(base_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nosuchmethod'; choose one of"):
        run_pruning(*args(base_dir, tmp_path, method="nosuchmethod"))


def test_recipe_cli_two_processes_same_mask(base_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): every rank ends with the same mask."""
    proc, results = launch_two_cpu_processes("vpns.py", base_dir, tmp_path / "ddp", "--input_size", "16",
                                             "--pad_size", "2", "--sparsity", "0.8")
    assert results["world_size"] == 2 and results["masks_identical_across_ranks"] is True
    assert "VPNs with prompt" in proc.stdout
