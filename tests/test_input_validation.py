"""Input that used to be accepted silently (16-bit images turned white, one-class data sets, a subnetwork wrapped
again, a head of the wrong size, out-of-range settings) or refused with a misleading message: each case is either
handled correctly or refused with an error that names the problem and the fix."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from tiny_models import IMAGE_SIZE, tiny_model

from prompt_sparsity.data import build_transform, load_image_dataset, make_dataloader, to_rgb

S = IMAGE_SIZE


def _save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------ data


def test_16bit_pngs_are_scaled_not_clipped(tmp_path):
    """PIL's RGB conversion clips 16-bit values at 255: both classes would become the same white image."""
    root = tmp_path / "gray16"
    values = {"dark": 10000, "light": 50000}
    for split in ("train", "test"):
        for name, v in values.items():
            for i in range(3):
                _save(PILImage.fromarray(np.full((6, 5), v + 100 * i, np.uint16)), str(root / split / name / f"{i}.png"))
    assert PILImage.open(root / "train" / "dark" / "0.png").mode == "I;16"  # really a 16-bit file
    data = load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"), validation_fraction=0.34)
    batch = next(iter(make_dataloader(data.test, input_size=4, train_transform=False, batch_size=8, shuffle=False)))
    for pixels, label in zip(batch["pixel_values"], batch["labels"]):
        v = values[data.id2label[int(label)]]
        # every channel equals the 16-bit value scaled to 8 bits (within the 100*i offsets and rounding)
        assert pixels.min() >= round(v / 257) / 255 - 1e-6 and pixels.max() <= round((v + 200) / 257) / 255 + 1e-6
    means = {data.id2label[int(l)]: float(p.mean()) for p, l in zip(batch["pixel_values"], batch["labels"])}
    assert means["dark"] < 0.2 < 0.7 < means["light"] < 0.8


def test_to_rgb_scales_every_high_bit_depth_mode():
    big = np.array([[0, 257, 65535]], dtype=np.uint16)
    for img in (PILImage.fromarray(big), PILImage.fromarray(big.astype(np.int32), mode="I")):
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 1, 255]
    unit = PILImage.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(unit))[0, :, 1].tolist() == [0, 128, 255]
    eight_bit = PILImage.fromarray(np.array([[3, 200]], dtype=np.uint8), mode="L")
    assert np.asarray(to_rgb(eight_bit))[0, :, 2].tolist() == [3, 200]  # 8-bit images are untouched
    out = build_transform(4, train=False)(PILImage.fromarray(np.full((3, 3), 65535, np.uint16)))
    assert torch.allclose(out, torch.ones(3, 4, 4))


def test_one_class_image_folder_is_refused(tmp_path):
    root = tmp_path / "one"
    for split in ("train", "test"):
        for i in range(3):
            _save(PILImage.new("RGB", (4, 4), (i, 0, 0)), str(root / split / "cat" / f"{i}.png"))
    with pytest.raises(ValueError, match=r"only one class subfolder \(.cat.\).*at least 2"):
        load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"))


def _saved(tmp_path, train_labels, test_labels, train_names, test_names=None):
    def split(labels, names):
        images = [PILImage.fromarray(np.full((4, 4), 20 * i, np.uint8)) for i in range(len(labels))]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    path = str(tmp_path / "saved")
    datasets.DatasetDict(train=split(train_labels, train_names),
                         test=split(test_labels, test_names or train_names)).save_to_disk(path)
    return path


def test_one_class_label_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"only one class \('only'\).*at least 2 classes"):
        load_image_dataset(_saved(tmp_path, [0] * 6, [0] * 3, ["only"]))


def test_train_split_with_a_single_present_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train split .* only class id\(s\) \[0\] of its 2 classes"):
        load_image_dataset(_saved(tmp_path, [0] * 6, [0, 1, 1], ["a", "b"]))


def test_splits_with_different_class_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Split 'test' .* 3 classes .* split 'train' has 2 classes.*same ClassLabel"):
        load_image_dataset(_saved(tmp_path, [0, 1] * 3, [0, 1, 2], ["a", "b"], ["a", "b", "c"]))


# ------------------------------------------------------------------ arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def parse():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    try:
        from common import parse
    finally:
        sys.path.remove(os.path.join(ROOT, "recipes"))
    return parse


@pytest.mark.parametrize("flag,value", [
    ("search_epochs", "-1"), ("finetune_epochs", "-2"), ("dense_epochs", "-1"),
    ("score_lr", "0"), ("finetune_lr", "-0.01"), ("search_prompt_lr", "0"), ("hypernet_lr", "-1e-3"),
    ("sparsity", "1.0"), ("sparsity", "-0.1"), ("flops_ratio", "0"), ("flops_ratio", "1.5"),
    ("per_device_train_batch_size", "0"), ("per_device_eval_batch_size", "-8"),
])
def test_out_of_range_flags_are_refused_when_parsed(parse, capsys, flag, value):
    with pytest.raises(SystemExit):
        parse([f"--{flag}={value}"])
    err = capsys.readouterr().err
    assert f"--{flag}=" in err and "it must be" in err


def test_boundary_values_are_accepted(parse):
    model, data, prune, run = parse(["--sparsity", "0", "--flops_ratio", "1", "--search_epochs", "0",
                                     "--per_device_train_batch_size", "1"])
    assert (prune.sparsity, prune.flops_ratio, prune.search_epochs, data.per_device_train_batch_size) == (0, 1, 0, 1)


def test_bad_module_regex_is_refused_when_parsed(parse, capsys):
    with pytest.raises(SystemExit):
        parse(["--exclude_modules", "classifier", "conv[0-"])
    err = capsys.readouterr().err
    assert "--exclude_modules: 'conv[0-' is not a valid regular expression" in err


# ------------------------------------------------------------------ models

from prompt_sparsity import PromptedSparseModel  # noqa: E402


def wrap(arch="resnet_basic", **kwargs):
    return PromptedSparseModel.from_base(tiny_model(arch), input_size=S, output_size=S, pad_size=4, **kwargs)


@pytest.fixture(scope="module")
def subnetwork(tmp_path_factory):
    path = tmp_path_factory.mktemp("sub") / "vpns-tiny"
    model = wrap(sparsity=0.5)
    model.set_label_mapping([3, 1, 4, 0, 9, 2, 6, 5, 8, 7], {i: f"c{i}" for i in range(10)})
    model.save_pretrained(path)
    return path


def test_missing_model_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for load in (PromptedSparseModel.from_base, PromptedSparseModel.from_pretrained):
        with pytest.raises(OSError, match=r"no local folder '.*no-such-model'.*check the path"):
            load(missing)
    # a string that could be a Hub id: not found offline, and it says both
    with pytest.raises(OSError, match=r"no local folder 'nobody/nothing-here'.*not in the local Hugging Face cache"):
        PromptedSparseModel.from_base("nobody/nothing-here")


def test_saved_subnetwork_is_refused_as_a_base(subnetwork):
    with pytest.raises(ValueError, match=r"saved prompt_sparsity subnetwork.*prompt twice.*"
                                         r"PromptedSparseModel.from_pretrained.*recipes/transfer.py --subnetwork"):
        PromptedSparseModel.from_base(str(subnetwork))
    loaded = PromptedSparseModel.from_pretrained(subnetwork)
    with pytest.raises(ValueError, match="prompt twice"):
        PromptedSparseModel.from_base(loaded)


def test_saved_subnetwork_is_refused_by_the_recipe(subnetwork, tmp_path):
    from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
    from prompt_sparsity.training import run_pruning

    with pytest.raises(ValueError, match="prompt twice"):
        run_pruning(ModelArguments(model_name_or_path=str(subnetwork), input_size=16, pad_size=2),
                    DataArguments(dataset_name="digits", max_train_samples=20, max_eval_samples=10),
                    PruningArguments(), RunArguments(output_dir=str(tmp_path / "out"), cpu=True))


def test_plain_model_is_refused_as_a_subnetwork(tmp_path):
    """It used to build a default base from scratch and load none of the weights, silently."""
    tiny_model("resnet_basic").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain 'resnet' model, not a saved prompt_sparsity subnetwork.*from_base"):
        PromptedSparseModel.from_pretrained(tmp_path / "plain")


def test_other_number_of_labels_is_refused(subnetwork):
    with pytest.raises(ValueError, match=r"saved with 10 labels; num_labels/id2label asks for 3.*transfer"):
        PromptedSparseModel.from_pretrained(subnetwork, num_labels=3)
    with pytest.raises(ValueError, match="saved with 10 labels"):
        PromptedSparseModel.from_pretrained(subnetwork, id2label={0: "a", 1: "b"})
    same = PromptedSparseModel.from_pretrained(subnetwork, num_labels=10)  # the saved count is fine
    assert same.config.num_labels == 10 and same.config.label_mapping == [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_safetensors_names_the_file(subnetwork, tmp_path, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(subnetwork, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) * 2 // 3], "garbage": os.urandom(1000), "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model.safetensors is corrupted or incomplete.*save or download"):
        PromptedSparseModel.from_pretrained(bad)


def test_bad_module_regexes_name_the_flag():
    with pytest.raises(ValueError, match=r"--target_modules: 'conv\[' is not a valid regular expression"):
        wrap(sparsity=0.5, target_modules=["conv["])
    with pytest.raises(ValueError, match=r"--exclude_modules 'clasifier' matches no Conv2d/Linear module"):
        wrap(sparsity=0.5, exclude_modules=["clasifier"])
    with pytest.raises(ValueError, match=r"--target_modules 'nothing' matches no Conv2d/Linear"):
        wrap(sparsity=0.5, target_modules=["encoder", "nothing"])
    with pytest.raises(ValueError, match=r"is left to prune.*target_modules=\['classifier'\] minus exclude"):
        wrap(sparsity=0.5, target_modules=["classifier"], exclude_modules=["classifier"])
    assert len(wrap(sparsity=0.5, exclude_modules=[r"^classifier"]).sparsity.layers) > 0


# ------------------------------------------------------------------ runs: resume and transfer


def _run_args(base, out, **over):
    from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments

    groups = (ModelArguments(model_name_or_path=str(base), input_size=16, pad_size=2, mask_size=8),
              DataArguments(dataset_name="digits", max_train_samples=32, max_eval_samples=16,
                            per_device_train_batch_size=16, per_device_eval_batch_size=16, dataloader_num_workers=0),
              PruningArguments(sparsity=0.5, search_epochs=1, finetune_epochs=1),
              RunArguments(output_dir=str(out), cpu=True, max_steps_per_epoch=1, torch_threads=1))
    for key, value in over.items():
        setattr(next(g for g in groups if hasattr(g, key)), key, value)
    return groups


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-resnet"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finished_run(base_dir, tmp_path_factory):
    from prompt_sparsity.training import run_pruning

    out = tmp_path_factory.mktemp("finished") / "run"
    run_pruning(*_run_args(base_dir, out))
    return out


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt"])
def test_resume_from_a_damaged_checkpoint_names_the_file(base_dir, finished_run, tmp_path, victim):
    import shutil

    from prompt_sparsity.training import run_pruning

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoints" / "stage1-epoch0"
    data = (ckpt / victim).read_bytes()
    (ckpt / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint .*stage1-epoch0 is corrupted or incomplete - {victim}.*"
                                         r"intact ones next to it: stage0-epoch0"):
        run_pruning(*_run_args(base_dir, out, resume_from_checkpoint="latest"))


_DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not a state": lambda data: b'{"python": [3, [1, 2], null], "numpy": [], "torch": "AAAA"}',
    "missing": None,
}


@pytest.mark.parametrize("victim", ["trainer_state.json", "rng_state_0.json"])
@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_damaged_state_or_rng_file_is_named_by_latest_and_when_asked_for(base_dir, finished_run, tmp_path, victim,
                                                                         damage):
    """The run state and the RNG state are checked like the weights before anything is resumed: `latest` does not
    skip to an older checkpoint (that silently redid finished epochs, and exited 0), and an explicit folder gets the
    same error, naming the file, why, and the intact checkpoints beside it."""
    import shutil

    from prompt_sparsity.training import run_pruning

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoints" / "stage1-epoch0"
    if _DAMAGE[damage] is None:
        (ckpt / victim).unlink()
    else:
        (ckpt / victim).write_bytes(_DAMAGE[damage]((ckpt / victim).read_bytes()))
    why = "missing" if damage == "missing" else ""
    for resume in ("latest", str(ckpt)):
        with pytest.raises(ValueError, match=rf"checkpoint .*stage1-epoch0 is corrupted or incomplete - {victim}: "
                                             rf"{why}.*intact ones next to it: stage0-epoch0"):
            run_pruning(*_run_args(base_dir, out, resume_from_checkpoint=resume))
    assert not (out / "results.json").exists() or (out / "results.json").read_bytes() == (
        finished_run / "results.json").read_bytes()  # the saved run is untouched


def _three_class_folder(root):
    for split, n in (("train", 6), ("test", 3)):
        for c, colour in enumerate(((250, 0, 0), (0, 250, 0), (0, 0, 250))):
            for i in range(n):
                _save(PILImage.new("RGB", (16, 16), colour), str(root / split / f"class{c}" / f"{i}.png"))
    return str(root)


def test_transfer_of_a_new_head_to_another_class_count_says_so(base_dir, tmp_path):
    from prompt_sparsity.training import run_pruning, run_transfer
    from prompt_sparsity.transfer import TransferArguments

    three = _three_class_folder(tmp_path / "three")
    source = tmp_path / "source"
    quick = dict(checkpointing=False, search_epochs=0, finetune_epochs=0)  # only the structure matters here
    run_pruning(*_run_args(base_dir, source, head="new", **quick))  # digits: 10 classes
    with pytest.raises(ValueError, match=r"new 10-class head .*this dataset has 3 classes.*--exclude_modules"):
        run_transfer(*_run_args(base_dir, tmp_path / "t", dataset_name=three, **quick),
                     TransferArguments(subnetwork=str(source)))
    # The fix the message gives works: a new head kept out of the mask transfers to 3 classes.
    kept_out = tmp_path / "kept-out"
    run_pruning(*_run_args(base_dir, kept_out, head="new", exclude_modules=["^classifier"], **quick))
    results = run_transfer(*_run_args(base_dir, tmp_path / "t2", dataset_name=three, **quick),
                           TransferArguments(subnetwork=str(kept_out)))
    assert results["num_labels"] == 3 and results["sparsity"] > 0.4


def test_transfer_of_a_pretrained_head_to_more_classes_says_so(tmp_path):
    from prompt_sparsity.training import run_pruning, run_transfer
    from prompt_sparsity.transfer import TransferArguments

    base = tmp_path / "base3"
    tiny_model("resnet_basic", num_labels=3).save_pretrained(base)
    source = tmp_path / "source"
    quick = dict(checkpointing=False, search_epochs=0, finetune_epochs=0)
    run_pruning(*_run_args(base, source, dataset_name=_three_class_folder(tmp_path / "three"), **quick))
    with pytest.raises(ValueError, match=r"pretrained 3-class head .*this dataset's 10 classes.*--head new"):
        run_transfer(*_run_args(base, tmp_path / "t", **quick), TransferArguments(subnetwork=str(source)))


def test_missing_subnetwork_for_transfer_names_the_path():
    from prompt_sparsity.transfer import load_subnetwork_config

    with pytest.raises(OSError, match=r"no local folder 'outputs/nothing-here'.*check the path"):
        load_subnetwork_config("outputs/nothing-here")


def test_saved_subnetwork_with_a_pattern_matching_nothing_still_loads(tmp_path):
    """The every-pattern-matches check guards new masks; a subnetwork saved before it existed must still load."""
    model = wrap(sparsity=0.5, exclude_modules=[r"^classifier"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["exclude_modules"] = [r"^classifier", "no-such-module"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = PromptedSparseModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.sparsity.mask(), model.sparsity.mask())
