"""The PASS recipe and the structured baselines on a tiny model and `digits`: FLOPs target met, compact model saved
and reloaded, latency reported, exact resume across the compaction, identical structure on 2 CPU processes, and
a transfer of the compact structure to another dataset."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import launch_two_cpu_processes, tiny_model

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.methods import METHODS
from prompt_sparsity.sparsity.flops import measure_flops
from prompt_sparsity.training import run_pruning, run_transfer
from prompt_sparsity.transfer import TransferArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRUCTURED = sorted(m for m, spec in METHODS.items() if spec.structured)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-effnet"
    tiny_model("timm_efficientnet", num_labels=20).save_pretrained(path)
    return str(path)


def args(base_dir, output_dir, **overrides):
    model = ModelArguments(model_name_or_path=base_dir, input_size=32, pad_size=4)
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                         per_device_train_batch_size=16, per_device_eval_batch_size=32, dataloader_num_workers=0)
    prune = PruningArguments(method="pass", flops_ratio=0.5, search_epochs=1, finetune_epochs=1, pruner_batches=2,
                             latency_batch_sizes=[1, 4])
    run = RunArguments(output_dir=str(output_dir), seed=7, cpu=True, max_steps_per_epoch=2, torch_threads=1)
    groups = (model, data, prune, run)
    for key, value in overrides.items():
        setattr(next(g for g in groups if hasattr(g, key)), key, value)
    return groups


@pytest.mark.parametrize("method", STRUCTURED)
def test_every_structured_method_meets_the_flops_target(method, base_dir, tmp_path):
    results = run_pruning(*args(base_dir, tmp_path, method=method))
    assert results["flops_ratio"] <= 0.52 and results["flops"] < results["dense_flops"]
    assert results["params"] < results["dense_params"]
    assert results["latency"]["batch_1"]["speedup"] > 0 and results["latency"]["threads"] >= 1
    saved = PromptedSparseModel.from_pretrained(tmp_path)
    assert saved.config.channel_widths == results["channel_widths"]
    assert measure_flops(saved.model, 32) == pytest.approx(results["flops"])
    assert saved.config.label_mapping == results["label_mapping"]
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["flops_target"] == 0.5
    if method == "pass":
        assert "test_accuracy_prompt" in on_disk["accuracy"]["test"]


def test_uniform_selection_in_recipe(base_dir, tmp_path):
    results = run_pruning(*args(base_dir, tmp_path, method="l1", channel_selection="uniform"))
    assert results["channel_selection"] == "uniform" and results["flops_ratio"] <= 0.52


def test_pass_resume_across_compaction(base_dir, tmp_path):
    full = tmp_path / "full"
    run_pruning(*args(base_dir, full, search_epochs=2, finetune_epochs=2))
    for ckpt in ("stage0-epoch0", "stage2-epoch0"):
        resumed = tmp_path / ckpt
        run_pruning(*args(base_dir, resumed, search_epochs=2, finetune_epochs=2,
                          resume_from_checkpoint=str(full / "checkpoints" / ckpt)))
        a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (ckpt, key)


def test_transfer_compact_structure_and_hypernetwork(base_dir, tmp_path):
    source = tmp_path / "source"
    run_pruning(*args(base_dir, source))
    widths = json.load(open(source / "results.json"))["channel_widths"]
    model, data, prune, run = args(base_dir, tmp_path / "t1", dataset_name="mnist")
    results = run_transfer(model, data, prune, run, TransferArguments(subnetwork=str(source)))
    assert results["channel_widths"] == widths and results["transferred_from"]["subnetwork"] == str(source)
    model, data, prune, run = args(base_dir, tmp_path / "t2", dataset_name="mnist")
    results = run_transfer(model, data, prune, run, TransferArguments(subnetwork=str(source), adapt_hypernetwork=True))
    assert results["flops_ratio"] <= 0.52


@pytest.mark.parametrize("method", ["pass", "vpns_channels"])
def test_pass_two_processes_same_structure(base_dir, tmp_path, method):
    _, results = launch_two_cpu_processes("pass.py", base_dir, tmp_path / "ddp", "--input_size", "32",
                                          "--latency_batch_sizes", "1", "--method", method)
    assert results["world_size"] == 2 and results["masks_identical_across_ranks"] is True


def test_recipes_refuse_the_wrong_kind_of_method():
    for recipe, method in (("vpns.py", "pass"), ("pass.py", "vpns")):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", recipe), "--method", method],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode != 0 and "use recipes/" in proc.stderr


@pytest.mark.parametrize("method", ["l1", "pass"])
def test_the_dense_label_mapping_of_a_structured_run_is_the_pretrained_networks(method, base_dir, tmp_path):
    """--flm_network dense maps labels on the uncompacted pretrained network, also for a prune-once channel baseline
    whose channels are removed before the mapping is computed (the same mapping as an unpruned run's)."""
    dense = run_pruning(*args(base_dir, tmp_path / "dense", method="dense", dense_epochs=0))
    assert dense["label_mapping_source"]["network"] == "dense"
    pruned = run_pruning(*args(base_dir, tmp_path / method, method=method, flm_network="dense", finetune_epochs=0,
                               search_epochs=0))
    assert pruned["label_mapping_source"]["network"] == "dense"
    assert pruned["label_mapping"] == dense["label_mapping"]
    assert (pruned["label_mapping_source"]["distinct_predictions"]
            == dense["label_mapping_source"]["distinct_predictions"])
