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
