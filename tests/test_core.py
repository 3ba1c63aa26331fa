"""PromptedSparseModel on every supported architecture: 90% masks, exact save/load (in a new process),
merge_and_unload, pipeline, and the clear errors."""

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
from tiny_models import ARCHITECTURES, IMAGE_SIZE, calibrate_norm_statistics, tiny_model
from transformers import AutoModelForImageClassification, pipeline

from prompt_sparsity import PromptedSparseConfig, PromptedSparseModel
from prompt_sparsity.sparsity.unstructured import num_pruned

S = IMAGE_SIZE


def wrap(arch, sparsity=0.9, **kwargs):
    kwargs.setdefault("input_size", S)
    kwargs.setdefault("output_size", S)
    kwargs.setdefault("pad_size", 4)
    return PromptedSparseModel.from_base(tiny_model(arch), sparsity=sparsity, **kwargs)


def pixels(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, S, S, generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every architecture: wrap at 90%, train the scores one step, map labels (FLM-style), freeze half of them,
    save. Returns {arch: (dir, reference logits, reference flat mask)}."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for i, arch in enumerate(ARCHITECTURES):
        torch.manual_seed(i)
        # At 90% with the global threshold, HYDRA's fan-in-scaled scores prune MobileNetV2's 1280-input classifier
        # entirely: bias-only logits, the same for every input, would make the logit checks below vacuous.
        model = wrap(arch, threshold="layerwise" if arch == "mobilenet_v2" else "global")
        model.start_mask_search()
        opt = torch.optim.Adam([model.sparsity.scores, *model.prompt.parameters()], lr=1e-2)
        loss = model(pixels(), labels=torch.tensor([0, 1, 2, 3])).loss
        loss.backward()
        opt.step()
        model.set_label_mapping([7, 2, 5], {0: "cat", 1: "dog", 2: "bird"})
        if i % 2:
            model.start_finetuning()  # frozen 1-bit mask
        calibrate_norm_statistics(model, pixels(16, seed=5))  # BN statistics of the masked net, as training gives
        with torch.no_grad():
            logits = model(pixels()).logits
        assert (logits[0] - logits[1]).abs().max() > 1e-2, f"{arch}: logits do not depend on the input"
        path = root / arch
        model.save_pretrained(path)
        out[arch] = (path, logits, model.sparsity.mask().clone(), model)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exact_global_sparsity(arch):
    model = wrap(arch)
    report = model.sparsity_report()
    assert report["pruned"] == num_pruned(0.9, report["total"]) == int(0.9 * report["total"])
    # The prompt does not change the wrapped model's own state-dict keys.
    base_keys = set(model.model.state_dict())
    wrapped = {k[len("model."):] for k in model.state_dict() if k.startswith("model.")}
    assert wrapped == base_keys


def test_layerwise_threshold_is_exact_per_layer():
    model = wrap("resnet_basic", threshold="layerwise", sparsity=0.7)
    flat = model.sparsity.mask()
    for layer in model.sparsity.layers:
        pruned = layer.numel - int(flat[layer.offset : layer.offset + layer.numel].sum())
        assert pruned == num_pruned(0.7, layer.numel)


def test_default_targets_include_first_conv_and_classifier():
    model = wrap("resnet_basic")
    names = [layer.name for layer in model.sparsity.layers]
    assert names[0] == "resnet.embedder.embedder.convolution"
    assert names[-1] == "classifier.1"
    assert any("shortcut" in n for n in names)
    excluded = wrap("resnet_basic", exclude_modules=[r"^classifier"])
    assert "classifier.1" not in [layer.name for layer in excluded.sparsity.layers]


def test_roundtrip_in_new_process(saved, tmp_path):
    """Every architecture: load in a fresh interpreter -> bit-identical state (weights, masks, prompt), the same
    logits and label mapping, with no missing or unexpected keys."""
    script = textwrap.dedent(
        """
        import json, sys, torch
        from safetensors.torch import save_file
        import prompt_sparsity  # registers the Auto classes
        from transformers import AutoModelForImageClassification
        dirs, out = json.loads(sys.argv[1]), sys.argv[2]
        g = torch.Generator().manual_seed(1)
        x = torch.rand(4, 3, %d, %d, generator=g)
        tensors, info = {}, {}
        for arch, d in dirs.items():
            model, loading = AutoModelForImageClassification.from_pretrained(d, output_loading_info=True)
            info[arch] = {k: sorted(map(str, v)) for k, v in loading.items()}
            info[arch]["class"] = type(model).__name__
            info[arch]["label_mapping"] = model.config.label_mapping
            with torch.no_grad():
                tensors[arch + ".logits"] = model(x).logits
            tensors[arch + ".mask"] = model.sparsity.mask()
            for k, v in model.state_dict().items():
                tensors[arch + ".state." + k] = v.clone()  # clone: save_file refuses tensors that share memory
        save_file(tensors, out + ".safetensors")
        json.dump(info, open(out + ".json", "w"))
        """
        % (S, S)
    )
    out = str(tmp_path / "loaded")
    dirs = {arch: str(v[0]) for arch, v in saved.items()}
    subprocess.run([sys.executable, "-c", script, json.dumps(dirs), out], check=True, timeout=300)
    tensors = load_file(out + ".safetensors")
    info = json.load(open(out + ".json"))
    for arch, (_, logits, mask, model) in saved.items():
        assert info[arch]["class"] == "PromptedSparseModel"
        assert info[arch]["missing_keys"] == [] and info[arch]["unexpected_keys"] == [], info[arch]
        assert info[arch]["mismatched_keys"] == []
        assert info[arch]["label_mapping"] == [7, 2, 5]
        assert torch.equal(tensors[arch + ".mask"], mask), arch
        state = model.state_dict()
        assert any(k.startswith("prompt.") for k in state)
        if model.sparsity.frozen:  # a frozen subnetwork saves its pruned weights as zeros: W * m
            state.update({f"model.{k}": v for k, v in model.masked_parameters(differentiable=False).items()})
        for k, v in state.items():
            assert torch.equal(tensors[arch + ".state." + k], v), (arch, k)
        # Logits to float tolerance only: with bit-identical weights, CPU conv kernels can still differ in the last
        # bit with the memory alignment of the weight (a reloaded tensor is a view into the safetensors buffer).
        torch.testing.assert_close(tensors[arch + ".logits"], logits, rtol=1e-5, atol=1e-6, msg=arch)


def test_roundtrip_keeps_scores_exactly(saved):
    path, _, _, model = saved["resnet_basic"]  # index 0: still searching, float scores saved
    loaded = PromptedSparseModel.from_pretrained(path)
    assert loaded.config.mask_format == "scores"
    assert torch.equal(loaded.sparsity.scores, model.sparsity.scores)


def test_frozen_mask_is_bit_packed(saved):
    path, _, mask, model = saved["resnet_bottleneck"]  # index 1: frozen
    stored = load_file(os.path.join(path, "model.safetensors"))
    assert "sparsity.scores" not in stored
    packed = stored["sparsity.mask_packed"]
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    # Pruned weights are stored as zeros (the file compresses like a sparse model), kept ones unchanged.
    params = dict(model.model.named_parameters())
    for layer in model.sparsity.layers:
        m = mask[layer.offset : layer.offset + layer.numel].view(layer.shape)
        saved_w = stored[f"model.{layer.param_name}"]
        assert torch.equal(saved_w[m == 0], torch.zeros_like(saved_w[m == 0]))
        assert torch.equal(saved_w[m == 1], params[layer.param_name].detach()[m == 1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_and_unload(saved, arch, tmp_path):
    _, _, mask, model = saved[arch]
    x = pixels()
    with torch.no_grad():
        expected = model(x, use_prompt=False).logits
    plain = model.merge_and_unload()
    assert type(plain).__name__ == type(model.model).__name__
    assert plain.config.num_labels == 3 and plain.config.id2label[1] == "dog"
    normalised = model.prompt.normalize(x)
    with torch.no_grad():
        torch.testing.assert_close(plain(normalised).logits, expected, rtol=1e-5, atol=1e-5)
    # The zeros of the plain model are exactly the mask's (the classifier keeps only the mapped rows).
    params = dict(plain.named_parameters())
    mapping = torch.tensor(model.config.label_mapping)
    for layer in model.sparsity.layers:
        layer_mask = mask[layer.offset : layer.offset + layer.numel].view(layer.shape)
        weight = params[layer.param_name]
        if weight.shape != layer_mask.shape:  # the classifier, sliced to the mapped classes
            layer_mask = layer_mask[mapping]
        assert torch.equal(weight == 0, layer_mask == 0), layer.name
    # Plain transformers saves and reloads it bit for bit; the logits agree to float tolerance (CPU conv kernels can
    # differ in the last bit with the memory alignment of a reloaded weight, see test_roundtrip_in_new_process).
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    reloaded_state = reloaded.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(reloaded_state[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(reloaded(normalised).logits, plain(normalised).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet_basic", "vit", "timm_efficientnet"])
def test_pipeline_agrees_with_model(saved, arch):
    path, _, _, model = saved[arch]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (45, 37, 3), dtype=np.uint8))
    classifier = pipeline("image-classification", model=str(path))
    results = classifier(image, top_k=3)
    processor = model.image_processor()
    inputs = processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, S, S)
    with torch.no_grad():
        probs = model(inputs["pixel_values"]).logits.softmax(-1)[0]
    best = int(probs.argmax())
    assert results[0]["label"] == model.config.id2label[best]
    assert results[0]["score"] == pytest.approx(float(probs[best]), abs=1e-5)


def test_new_head_and_flm(tmp_path):
    from prompt_sparsity import frequency_label_mapping

    base = tiny_model("resnet_basic", num_labels=10)
    base.save_pretrained(tmp_path / "base")
    model = PromptedSparseModel.from_base(
        str(tmp_path / "base"), head="new", id2label={0: "a", 1: "b"}, sparsity=0.5, input_size=S, output_size=S,
        pad_size=4,
    )
    assert model(pixels()).logits.shape == (4, 2)
    assert model.config.base_model_name_or_path == str(tmp_path / "base")
    with pytest.raises(ValueError, match="head='new'"):
        model.set_label_mapping([0, 1])
    flm = wrap("resnet_basic", sparsity=0.5)
    loader = [{"pixel_values": pixels(8, seed=s), "labels": torch.randint(0, 3, (8,))} for s in range(3)]
    mapping = frequency_label_mapping(flm, loader, num_labels=3)
    assert len(set(mapping)) == 3 and all(0 <= m < 10 for m in mapping)
    flm.set_label_mapping(mapping)
    assert flm(pixels()).logits.shape == (4, 3)


def test_flm_greedy_assignment():
    from prompt_sparsity.label_mapping import greedy_assignment

    counts = torch.tensor([[5, 0, 1], [9, 8, 0], [0, 7, 2], [0, 0, 1]])
    # 9 -> (src 1, tgt 0); then 7 -> (src 2, tgt 1); then the best left for tgt 2 is src 0 (1) vs src 3 (1): first.
    assert greedy_assignment(counts) == [1, 2, 0]


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, "outside \\[0, 1\\)"),
        ({"sparsity": -0.1}, "outside \\[0, 1\\)"),
        ({"prompt_method": "bogus"}, "prompt_method='bogus' is not supported"),
        ({"input_size": 64, "output_size": 32}, "input_size=64 is larger than output_size=32"),
        ({"prompt_method": "expand", "input_size": 32, "output_size": 32}, "needs input_size < output_size"),
        ({"threshold": "local"}, "threshold='local'"),
        ({"image_mean": [0.5, 0.5]}, "image_mean has 2 values"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptedSparseConfig(**kwargs)


def test_wrong_channel_count_is_refused():
    model = wrap("resnet_basic")
    with pytest.raises(ValueError, match="convert grayscale/RGBA images to RGB"):
        model(torch.rand(2, 1, S, S))
    with pytest.raises(ValueError, match="expects 32x32 images"):
        model(torch.rand(2, 3, 40, 40))


def test_checkpoint_for_another_base_is_refused(saved, tmp_path):
    path, *_ = saved["resnet_basic"]
    config = json.load(open(os.path.join(path, "config.json")))
    config["base_config"]["hidden_sizes"] = [16, 48]  # a different base model
    os.makedirs(tmp_path / "bad")
    json.dump(config, open(tmp_path / "bad" / "config.json", "w"))
    os.link(os.path.join(path, "model.safetensors"), tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit the base model.*has shape"):
        PromptedSparseModel.from_pretrained(tmp_path / "bad")


def test_truncated_mask_is_refused(saved, tmp_path):
    from safetensors.torch import save_file

    path, *_ = saved["resnet_bottleneck"]  # frozen: sparsity.mask_packed
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["sparsity.mask_packed"] = tensors["sparsity.mask_packed"][:-3]
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    os.link(os.path.join(path, "config.json"), tmp_path / "bad" / "config.json")
    with pytest.raises(ValueError, match="sparsity.mask_packed"):
        PromptedSparseModel.from_pretrained(tmp_path / "bad")
