"""The product promise end to end on the local Hub: a VPNs and a PASS subnetwork searched by the recipes are pushed,
pulled by repo id into an empty cache with identical logits, and transferred to another dataset from the repo id
(the VPNs transfer reads only the mask and prompt bytes, never the fine-tuned weights)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_model

from prompt_sparsity import PromptedSparseModel
from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.training import run_pruning

try:
    from tests.hub_server import LocalHub, hub_env, run_client_json
except ImportError:
    from hub_server import LocalHub, hub_env, run_client_json

ROOT = Path(__file__).resolve().parents[1]
S = 32


def search(base_dir, out, method, **prune):
    model = ModelArguments(model_name_or_path=str(base_dir), input_size=S, pad_size=4)
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                         per_device_train_batch_size=16, dataloader_num_workers=0)
    prune = PruningArguments(method=method, search_epochs=1, finetune_epochs=1, latency_batch_sizes=[1], **prune)
    run = RunArguments(output_dir=str(out), cpu=True, max_steps_per_epoch=2, torch_threads=1, checkpointing=False)
    return run_pruning(model, data, prune, run)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("searched")
    tiny_model("resnet_basic", num_labels=20).save_pretrained(root / "base-resnet")
    tiny_model("timm_efficientnet", num_labels=20).save_pretrained(root / "base-effnet")
    search(root / "base-resnet", root / "vpns", "vpns", sparsity=0.8)
    search(root / "base-effnet", root / "pass", "pass", flops_ratio=0.5)
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    reference = {"x": x}
    for name in ("vpns", "pass"):
        with torch.no_grad():
            reference[name] = PromptedSparseModel.from_pretrained(root / name)(x).logits
    save_file(reference, root / "reference.safetensors")
    return root


def test_push_pull_and_transfer_by_repo_id(searched, tmp_path):
    code = f"""
    import torch
    from safetensors.torch import load_file
    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.hub import push_subnetwork
    from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
    from prompt_sparsity.training import run_transfer
    from prompt_sparsity.transfer import TransferArguments
    root = {str(searched)!r}
    ref = load_file(root + "/reference.safetensors")
    push_subnetwork(root + "/vpns", "org/vpns-tiny-digits-s80")
    push_subnetwork(root + "/pass", "org/pass-tiny-digits-f50")
    same = {{}}
    for name, repo in (("vpns", "org/vpns-tiny-digits-s80"), ("pass", "org/pass-tiny-digits-f50")):
        model = PromptedSparseModel.from_pretrained(repo)
        with torch.no_grad():
            same[name] = bool(torch.equal(model(ref["x"]).logits, ref[name]))
    results = {{}}
    for name, repo in (("vpns", "org/vpns-tiny-digits-s80"), ("pass", "org/pass-tiny-digits-f50")):
        r = run_transfer(
            ModelArguments(), DataArguments(dataset_name="mnist", max_train_samples=64, max_eval_samples=32,
                                            per_device_train_batch_size=16, dataloader_num_workers=0),
            PruningArguments(finetune_epochs=1, latency_batch_sizes=[1]),
            RunArguments(output_dir={str(tmp_path)!r} + "/transfer-" + name, cpu=True, max_steps_per_epoch=2,
                         torch_threads=1, checkpointing=False),
            TransferArguments(subnetwork=repo),
        )
        results[name] = {{"sparsity": r["sparsity"], "widths": r.get("channel_widths"),
                          "from": r["transferred_from"]["subnetwork"], "dataset": r["dataset"]}}
    out({{"same": same, "results": results}})
    """
    with LocalHub() as hub:
        hf_home = tmp_path / "hf_home"
        result = run_client_json(code, hub_env(hub, hf_home), timeout=400)
        log = list(hub.range_log)
    assert result["same"] == {"vpns": True, "pass": True}
    vpns, pas = result["results"]["vpns"], result["results"]["pass"]
    assert vpns["from"] == "org/vpns-tiny-digits-s80" and vpns["dataset"] == "mnist"
    assert vpns["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert pas["widths"] == json.load(open(searched / "pass" / "results.json"))["channel_widths"]
    # Whole weight files were downloaded only by the two from_pretrained calls: the transfers read byte ranges.
    weights = [(m, r) for m, p, r in log if m == "GET" and p.endswith("/model.safetensors")]
    assert sum(r is None for _, r in weights) == 2, weights
    assert sum(r is not None for _, r in weights) >= 3  # header length, header, tensors of the VPNs transfer
    assert os.path.isfile(tmp_path / "transfer-vpns" / "model.safetensors")
