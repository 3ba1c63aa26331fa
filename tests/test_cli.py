"""The recipes as a user of the transformers example scripts meets them: the user's data and model decide the
defaults (the embedded demo keeps its own), grouped --help, HF option names, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image as PILImage
from tiny_models import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")


def recipe(name):
    """The `main` of recipes/<name>.py, imported as the recipe runs it (recipes/ on the path)."""
    import importlib

    sys.path.insert(0, RECIPES)
    try:
        for cached in ("common", name):
            sys.modules.pop(cached, None)
        return importlib.import_module(name)
    finally:
        sys.path.remove(RECIPES)


@pytest.fixture(scope="module")
def parse():
    return recipe("common").parse


@pytest.fixture(scope="module")
def base_with_processor(tmp_path_factory):
    """A tiny ResNet whose image processor says 24 px (its config names no size)."""
    from transformers import ViTImageProcessor

    path = tmp_path_factory.mktemp("base") / "tiny-resnet-24px"
    tiny_model("resnet_basic").save_pretrained(path)
    ViTImageProcessor(size={"height": 24, "width": 24}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folder_of_60(tmp_path_factory):
    """60 images in 3 class subfolders (no split folders)."""
    root = tmp_path_factory.mktemp("sixty")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / f"class{c}")
        for i in range(20):
            pixels = (rng.random((12, 12, 3)) * 80 + 80 * c).astype(np.uint8)
            PILImage.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return str(root)


# ------------------------------------------------------------------------------------------------ 1. defaults
def test_user_runs_get_no_demo_defaults(parse):
    model, data, _, _ = parse(["--dataset_name", "digits"])
    assert (data.max_train_samples, data.max_eval_samples, model.input_size) == (None, None, None)
    model, data, _, _ = parse(["--model_name_or_path", "some/model"])
    assert (data.max_train_samples, data.max_eval_samples, model.input_size) == (None, None, None)


def test_the_embedded_demo_keeps_its_small_settings(parse, tmp_path):
    model, data, _, _ = parse([])
    assert (data.max_train_samples, data.max_eval_samples, model.input_size) == (2000, 1000, 48)
    model, data, _, _ = parse(["--input_size", "64", "--max_train_samples", "100"])  # flags still win
    assert (data.max_train_samples, data.max_eval_samples, model.input_size) == (100, 1000, 64)
    config = tmp_path / "c.yaml"
    config.write_text("dataset_name: digits\n")
    model, data, _, _ = parse([str(config)])  # a YAML file naming data is a user run too
    assert (data.max_train_samples, model.input_size) == (None, None)


def test_a_60_image_folder_uses_all_60_images_at_the_models_size(base_with_processor, folder_of_60, tmp_path,
                                                                  capsys):
    out = tmp_path / "run"
    recipe("vpns").main(["--model_name_or_path", base_with_processor, "--dataset_name", folder_of_60,
                         "--search_epochs", "1", "--finetune_epochs", "1", "--max_steps_per_epoch", "1",
                         "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--pad_size", "2",
                         "--cpu", "--torch_threads", "1", "--sparsity", "0.5", "--output_dir", str(out)])
    results = json.load(open(out / "results.json"))
    assert sum(results["samples"].values()) == 60
    assert results["input_size"] == 24
    settings = results["effective_settings"]
    assert settings["max_train_samples"] == "all" and settings["input_size"] == 24
    assert settings["samples"] == results["samples"]
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("settings: ")]
    assert len(logged) == 1 and "input 24 px from the model" in logged[0]
