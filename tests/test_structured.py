"""PASS inside PromptedSparseModel: hypernetwork masks at the FLOPs target, exact compaction, compact models that
save and reload (in a new process) into the same architecture, the pipeline, and the clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import IMAGE_SIZE, tiny_model
from transformers import pipeline

from prompt_sparsity import PromptedSparseConfig, PromptedSparseModel
from prompt_sparsity.sparsity.flops import measure_flops

S = IMAGE_SIZE
STRUCTURED = ["resnet_basic", "resnet_bottleneck", "convnext", "mobilenet_v2", "timm_efficientnet"]


def wrap(arch, flops_ratio=0.5, **kwargs):
    return PromptedSparseModel.from_base(
        tiny_model(arch), sparsity_type="structured", flops_ratio=flops_ratio, input_size=S, output_size=S,
        pad_size=4, **kwargs,
    )


def pixels(n=3, seed=1):
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    """Every architecture: one search step, compaction, saved. {arch: (dir, model, logits)}."""
    root = tmp_path_factory.mktemp("structured")
    out = {}
    for i, arch in enumerate(STRUCTURED):
        torch.manual_seed(i)
        model = wrap(arch)
        model.start_structure_search()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(pixels(4), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        opt.step()
        model.eval()
        masks = model.channel_masks()
        with torch.no_grad():
            masked_logits = model(pixels()).logits
        model.compact(masks)
        with torch.no_grad():
            logits = model(pixels()).logits
        path = root / arch
        model.save_pretrained(path)
        out[arch] = (path, model, logits, masked_logits)
    return out


@pytest.mark.parametrize("arch", STRUCTURED)
def test_search_gradients_and_flops_target(arch):
    model = wrap(arch, flops_ratio=0.5)
    model.start_structure_search()
    loss = model(pixels(4), labels=torch.tensor([0, 1, 2, 3])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.structure.hypernetwork.parameters() if p.requires_grad)
    assert model.model.get_parameter(next(n for n, _ in model.model.named_parameters())).grad is None
    masks = model.channel_masks()
    fm = model.structure.flops_model(model.model)
    ratio = float(fm(masks)) / fm.dense_flops
    assert abs(ratio - 0.5) <= 0.02, ratio


@pytest.mark.parametrize("arch", STRUCTURED)
def test_compaction_is_exact_and_meets_flops(compacted, arch):
    path, model, logits, masked_logits = compacted[arch]
    torch.testing.assert_close(logits, masked_logits, atol=1e-4, rtol=1e-4)
    flops = measure_flops(model.model, S)
    assert flops <= 0.52 * model.config.dense_flops
    assert model.config.channel_widths and sum(model.config.channel_widths.values()) == model.structure.kept_indices.numel()


def test_compact_roundtrip_in_new_process(compacted, tmp_path):
    script = textwrap.dedent(
        """
        import json, sys, torch
        from safetensors.torch import save_file
        import prompt_sparsity
        from transformers import AutoModelForImageClassification
        dirs, out = json.loads(sys.argv[1]), sys.argv[2]
        x = torch.rand(3, 3, %d, %d, generator=torch.Generator().manual_seed(1))
        tensors, info = {}, {}
        for arch, d in dirs.items():
            model, loading = AutoModelForImageClassification.from_pretrained(d, output_loading_info=True)
            info[arch] = {k: sorted(map(str, v)) for k, v in loading.items()}
            with torch.no_grad():
                tensors[arch + ".logits"] = model(x).logits
            for k, v in model.state_dict().items():
                tensors[arch + "." + k] = v.clone()  # clone: save_file refuses tensors that share memory
        save_file(tensors, out + ".safetensors")
        json.dump(info, open(out + ".json", "w"))
        """
        % (S, S)
    )
    out = str(tmp_path / "loaded")
    dirs = {arch: str(v[0]) for arch, v in compacted.items()}
    subprocess.run([sys.executable, "-c", script, json.dumps(dirs), out], check=True, timeout=300)
    tensors, info = load_file(out + ".safetensors"), json.load(open(out + ".json"))
    for arch, (_, model, logits, _) in compacted.items():
        assert info[arch]["missing_keys"] == [] and info[arch]["unexpected_keys"] == [], info[arch]
        state = model.state_dict()
        assert any(k.startswith("structure.hypernetwork.") for k in state)
        for k, v in state.items():  # compact weights, hypernetwork, prompt, kept channel indices: bit for bit
            assert torch.equal(tensors[arch + "." + k], v), (arch, k)
        # Logits to float tolerance only: with bit-identical weights, CPU conv kernels can still differ in the last
        # bit with the memory alignment of the weight (a reloaded tensor is a view into the safetensors buffer).
        torch.testing.assert_close(tensors[arch + ".logits"], logits, rtol=1e-5, atol=1e-6, msg=arch)


def test_compact_model_in_pipeline(compacted):
    path, model, _, _ = compacted["timm_efficientnet"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    results = pipeline("image-classification", model=str(path))(image, top_k=1)
    with torch.no_grad():
        probs = model(model.image_processor()(image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    assert results[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_merge_and_unload_returns_the_compact_model(compacted):
    _, model, _, _ = compacted["resnet_bottleneck"]
    plain = model.merge_and_unload()
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(plain(model.prompt.normalize(x)).logits, model(x, use_prompt=False).logits)
    assert measure_flops(plain, S) == measure_flops(model.model, S)


def test_uniform_selection():
    model = wrap("resnet_bottleneck", channel_selection="uniform")
    masks = model.channel_masks()
    ratios = [float(m.mean()) for m in masks]
    assert max(ratios) - min(ratios) < 0.15  # same keep ratio per unit (up to rounding of small units)


def test_unsupported_model_and_bad_ratio():
    with pytest.raises(ValueError, match="Supported architectures"):
        wrap("vit")
    with pytest.raises(ValueError, match="flops_ratio=1.5 is outside \\(0, 1\\]"):
        PromptedSparseConfig(sparsity_type="structured", flops_ratio=1.5)
    with pytest.raises(ValueError, match="flops_ratio=0 is outside"):
        PromptedSparseConfig(sparsity_type="structured", flops_ratio=0)
    model = wrap("resnet_basic")
    with pytest.raises(ValueError, match="compact\\(\\) the structured model before fine-tuning"):
        model.start_finetuning()


def test_structured_checkpoint_for_another_base_is_refused(compacted, tmp_path):
    path, *_ = compacted["resnet_basic"]
    config = json.load(open(os.path.join(path, "config.json")))
    config["base_config"]["hidden_sizes"] = [24, 32]
    (tmp_path / "bad").mkdir()
    json.dump(config, open(tmp_path / "bad" / "config.json", "w"))
    os.link(os.path.join(path, "model.safetensors"), tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit the base model"):
        PromptedSparseModel.from_pretrained(tmp_path / "bad")
