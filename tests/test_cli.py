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


def test_the_logged_input_size_names_where_it_came_from(parse, tmp_path):
    from prompt_sparsity.settings import format_settings, input_size_source

    model, *_ = parse([])
    assert input_size_source(model) == "the embedded demo's defaults"  # 48, not "from --input_size"
    model, *_ = parse(["--input_size", "64"])
    assert input_size_source(model) == "--input_size"
    model, *_ = parse(["--input_size=64", "--dataset_name", "digits"])
    assert input_size_source(model) == "--input_size"
    config = tmp_path / "c.yaml"
    config.write_text("dataset_name: digits\ninput_size: 40\n")
    model, *_ = parse([str(config)])
    assert input_size_source(model) == str(config)
    model, *_ = parse([str(config), "--input_size", "56"])  # the flag wins over the file
    assert input_size_source(model) == "--input_size"
    model, *_ = parse(["--dataset_name", "digits"])
    assert input_size_source(model).startswith("the model")
    assert input_size_source(model, transferred=True) == "the subnetwork (--subnetwork)"
    line = format_settings({"method": "vpns", "model": "m", "dataset": "d", "input_size": 48,
                            "input_size_from": input_size_source(parse([])[0]), "output_size": 48,
                            "max_train_samples": 2000, "max_eval_samples": 1000,
                            "samples": {"train": 1, "validation": 1, "test": 1}, "per_device_train_batch_size": 8,
                            "num_processes": 1, "gradient_accumulation_steps": 1, "total_train_batch_size": 8,
                            "epochs": {}, "seed": 0, "device": "cpu"})
    assert "input 48 px from the embedded demo's defaults," in line


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


# ------------------------------------------------------------------------------------------------ 5. errors
def run_recipe_process(*args, launcher=(), timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_pass_budget_error_is_one_line_in_flag_names(tmp_path):
    base = tmp_path / "base"
    tiny_model("resnet_basic").save_pretrained(base)
    proc = run_recipe_process(
        os.path.join(RECIPES, "pass.py"), "--model_name_or_path", str(base), "--dataset_name", "digits",
        "--flops_ratio", "0.05", "--min_channels", "8", "--input_size", "16", "--max_train_samples", "32",
        "--max_eval_samples", "16", "--max_steps_per_epoch", "1", "--dataloader_num_workers", "0", "--cpu",
        "--no_dense_reference", "--output_dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith("recipes/pass.py: error: ") and "--flops_ratio" in line and "--min_channels" in line
    assert "target_ratio" not in line


def test_debug_keeps_the_traceback(tmp_path):
    missing = str(tmp_path / "no-such-model")
    plain = run_recipe_process(os.path.join(RECIPES, "vpns.py"), "--model_name_or_path", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    [line] = error_lines(plain.stderr)
    assert missing in line and "Fix:" in line
    debug = run_recipe_process(os.path.join(RECIPES, "vpns.py"), "--model_name_or_path", missing, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and missing in debug.stderr


def test_one_line_error_under_accelerate_launch(tmp_path):
    """accelerate's launcher adds its own CalledProcessError trace unless `-q`: with it, the one line is all."""
    proc = run_recipe_process("-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no",
                              os.path.join(RECIPES, "vpns.py"), "--sparsity", "1.5")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert line == ("recipes/vpns.py: error: --sparsity=1.5 is invalid: it must be in [0, 1): the fraction of weights "
                    "removed, e.g. 0.9. (see --help)")


# ------------------------------------------------------------------------------------------------ 2. --help
@pytest.mark.parametrize("name", ["vpns", "pass", "transfer"])
def test_help_is_grouped_with_every_default(name):
    from prompt_sparsity.cli import GROUP_TITLES, RecipeParser

    groups = recipe("common").ARGUMENT_GROUPS
    if name == "transfer":
        from prompt_sparsity.transfer import TransferArguments

        groups += (TransferArguments,)
    parser = RecipeParser(groups, name)
    text = parser.format_help()
    for group in groups:
        assert f"\n{GROUP_TITLES[group.__name__]}:\n" in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._get_help_string(action).lower(), action.dest
    options = {s for a in parser._actions for s in a.option_strings}
    used = {"vpns": ("--sparsity", "--nm_pattern"), "pass": ("--flops_ratio", "--min_channels", "--score_lr"),
            "transfer": ("--subnetwork", "--finetune_lr")}[name]
    ignored = {"vpns": ("--flops_ratio", "--hypernet_lr"), "pass": ("--sparsity", "--nm_pattern", "--bip_gamma"),
               "transfer": ("--sparsity", "--input_size", "--method", "--score_lr")}[name]
    assert set(used) <= options and not set(ignored) & options


def test_options_a_recipe_ignores_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe("transfer").main(["--subnetwork", "x", "--sparsity", "0.5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipes/transfer.py: error: --sparsity is not used by recipes/transfer.py") and "\n" not in err
    with pytest.raises(SystemExit):
        recipe("vpns").main(["--flops_ratio", "0.5"])
    assert "use recipes/pass.py" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 3. HF names
def test_unknown_options_get_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe("vpns").main(["--max_train_sample", "3", "--learning_rate", "0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --max_train_sample; did you mean --max_train_samples?" in err
    assert "--learning_rate (a transformers example-script option)" in err and "--finetune_lr" in err


def test_hf_example_script_names_are_accepted(parse):
    _, data, _, _ = parse(["--image_column_name", "img", "--label_column_name", "y", "--train_val_split", "0.2"])
    assert (data.image_column, data.label_column, data.validation_fraction) == ("img", "y", 0.2)


def test_hf_run_options_parse(parse, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model, data, _, run = parse(["--with_tracking", "--checkpointing_steps", "no", "--token", "hf_secret",
                                 "--cache_dir", "/tmp/c", "--trust_remote_code", "--gradient_accumulation_steps", "4",
                                 "--max_train_steps", "10"])
    assert run.report_to == "all" and run.checkpointing is False
    assert (run.gradient_accumulation_steps, run.max_train_steps) == (4, 10)
    assert (model.cache_dir, model.trust_remote_code) == ("/tmp/c", True)
    assert os.environ["HF_TOKEN"] == "hf_secret"  # for huggingface_hub and datasets; never a setting
    assert not any("hf_secret" in str(v) for g in (model, data, run) for v in vars(g).values())
    with pytest.raises(SystemExit):
        parse(["--checkpointing_steps", "500"])  # per-step checkpoints: refused, not ignored


def test_train_dir_validation_dir_accumulation_and_max_train_steps(base_with_processor, folder_of_60, tmp_path):
    validation = tmp_path / "val"
    for c in range(3):
        os.makedirs(validation / f"class{c}")
        for i in range(4):
            PILImage.new("RGB", (12, 12), (80 * c, 40, 40)).save(validation / f"class{c}" / f"{i}.png")
    out = tmp_path / "run"
    recipe("vpns").main(["--model_name_or_path", base_with_processor, "--train_dir", folder_of_60,
                         "--validation_dir", str(validation), "--search_epochs", "1", "--finetune_epochs", "1",
                         "--max_train_steps", "3", "--gradient_accumulation_steps", "2",
                         "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0", "--pad_size", "2",
                         "--cpu", "--torch_threads", "1", "--sparsity", "0.5", "--output_dir", str(out)])
    results = json.load(open(out / "results.json"))
    assert results["samples"]["train"] + results["samples"]["validation"] + results["samples"]["test"] == 72
    assert results["effective_settings"]["total_train_batch_size"] == 16
    # 3 iterations of 2 views = 6 passes per stage, 2 per optimizer step: 3 scheduler steps, over 1 epoch of 7.
    for stage in ("stage0-epoch0", "stage1-epoch0"):
        state = json.load(open(out / "checkpoints" / stage / "trainer_state.json"))
        assert state["checkpoint"]["scheduler"]["last_epoch"] == 3, stage
    assert [h["epoch"] for h in results["history"]] == [0, 0]


# ------------------------------------------------------------------------------------------------ 4./6. trackers, plots, card
def test_tensorboard_scalars_plot_and_card(base_with_processor, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    recipe("vpns").main(["--model_name_or_path", base_with_processor, "--dataset_name", "digits",
                         "--max_train_samples", "32", "--max_eval_samples", "16", "--search_epochs", "1",
                         "--finetune_epochs", "1", "--max_steps_per_epoch", "2", "--per_device_train_batch_size", "16",
                         "--dataloader_num_workers", "0", "--pad_size", "2", "--cpu", "--torch_threads", "1",
                         "--sparsity", "0.5", "--report_to", "tensorboard", "--output_dir", str(out)])
    events = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.startswith("events.out")]
    scalars = {}
    for path in events:
        reader = EventAccumulator(path).Reload()
        for tag in reader.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(reader.Scalars(tag))
    assert {"search/step_loss", "search/lr/score_lr", "search/lr/search_prompt_lr", "finetune/step_loss",
            "finetune/lr/finetune_lr", "search/validation_accuracy_prompt", "subnetwork/sparsity",
            "final/test_accuracy_prompt"} <= set(scalars), sorted(scalars)
    assert [e.step for e in scalars["search/step_loss"]] == [1, 2, 3, 4]  # 2 iterations x 2 views
    assert [e.step for e in scalars["finetune/step_loss"]] == [5, 6, 7, 8]
    assert scalars["subnetwork/sparsity"][-1].value == pytest.approx(0.5, abs=0.01)
    # The search's mask dynamics, as results.json's history records them (one value per search epoch).
    history = json.load(open(out / "results.json"))["history"]
    search = [h for h in history if h["kind"] == "search"]
    for key in ("mask_flip_fraction", "mask_overlap_with_start"):
        logged = scalars[f"search/{key}"]
        assert [e.value for e in logged] == pytest.approx([h[key] for h in search], abs=1e-6), key
        assert [e.step for e in logged] == [4]  # at the end of the search epoch, on the step axis
    assert "finetune/mask_flip_fraction" not in scalars
    assert (out / "training_curves.png").stat().st_size > 10_000
    card = (out / "README.md").read_text()
    assert "![training curves](training_curves.png)" in card and "Framework versions: " in card
    assert "Learning rates: " in card and "transformers" in card


def test_training_curves_plot_the_mask_dynamics_per_search_epoch(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from prompt_sparsity.plots import write_training_curves

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    history = [{"stage": 0, "kind": "search", "epoch": e, "train_loss": 1.0, "validation_accuracy_prompt": 50.0,
                "mask_flip_fraction": flip, "mask_overlap_with_start": overlap}
               for e, (flip, overlap) in enumerate([(0.2, 0.8), (0.1, 0.7), (0.05, 0.68)])]
    history.append({"stage": 1, "kind": "finetune", "epoch": 0, "train_loss": 0.5, "validation_accuracy_prompt": 60.0})
    write_training_curves(str(tmp_path), {"history": history, "layer_sparsity": {"a": 0.5}})
    panels = {ax.get_title(): ax for ax in figures[-1].axes}
    lines = {line.get_label(): line for line in panels["mask dynamics per search epoch"].get_lines()}
    assert list(lines["flipped this epoch"].get_xdata()) == [1, 2, 3]  # the search epochs on the shared axis
    assert list(lines["flipped this epoch"].get_ydata()) == [0.2, 0.1, 0.05]
    assert list(lines["overlap with the start mask"].get_ydata()) == [0.8, 0.7, 0.68]
    # A run that searched no mask (dense, or a one-shot pruning) keeps the three panels.
    write_training_curves(str(tmp_path), {"history": history[3:]})
    assert "mask dynamics per search epoch" not in [ax.get_title() for ax in figures[-1].axes]
    assert len(figures[-1].axes) == 3


def test_missing_tracker_package_is_refused_before_training(parse, monkeypatch, tmp_path):
    import accelerate.tracking

    from prompt_sparsity.training import run_pruning

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    args = parse(["--dataset_name", "digits", "--report_to", "wandb", "--output_dir", str(tmp_path / "r")])
    with pytest.raises(ImportError, match="pip install wandb"):
        run_pruning(*args)
    assert not (tmp_path / "r").exists()
