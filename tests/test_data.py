"""Tests for prompt_sparsity.data: built-in offline sets, folders, splits, transforms, loaders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import time  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from prompt_sparsity import data as D  # noqa: E402
from prompt_sparsity.data import (  # noqa: E402
    FASHION_MNIST_LABELS,
    ImageClassificationData,
    build_transform,
    collate_fn,
    load_image_dataset,
    make_dataloader,
)

FASHION_DIR = os.environ.get("FASHION_MNIST_DIR", D.DEFAULT_FASHION_MNIST_DIR)
needs_fashion = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST IDX files not installed (Debian package dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _no_cache_leak(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def _labels(ds):
    return np.asarray(ds.with_format("arrow")["label"].to_numpy())


def _assert_standard(ds, names):
    assert ds.column_names == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(names)


def _save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _make_folder(root, splits=("train", "test"), classes=("cat", "dog"), per_class=4, size=(12, 10)):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            for i in range(per_class):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                _save(PILImage.fromarray(arr), root / split / c / f"{i}.png")
    return root


# ------------------------------------------------------------------ built-in sets


@needs_fashion
def test_fashion_mnist_full_sizes_and_classes():
    data = load_image_dataset("fashion_mnist")
    assert isinstance(data, ImageClassificationData)
    assert (len(data.train), len(data.validation), len(data.test)) == (54000, 6000, 10000)
    assert data.num_labels == 10
    assert data.id2label[0] == "T-shirt/top" and data.id2label[9] == "Ankle boot"
    assert data.label2id["Sneaker"] == 7
    assert data.label_names == list(FASHION_MNIST_LABELS)
    for split in ("train", "validation", "test"):
        _assert_standard(data[split], FASHION_MNIST_LABELS)
    img = data.test[0]["image"]
    assert img.mode == "RGB" and img.size == (28, 28)
    # official test labels are balanced: 1000 per class
    assert np.bincount(_labels(data.test)).tolist() == [1000] * 10
    # stratified validation hold-out: 600 per class
    assert np.bincount(_labels(data.validation)).tolist() == [600] * 10


@needs_fashion
def test_fashion_mnist_subset_is_fast_and_balanced():
    D._fashion_mnist_arrays()  # decoding the IDX files once per process is part of the first load
    start = time.perf_counter()
    data = load_image_dataset("fashion_mnist", max_train_samples=200, max_eval_samples=50)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, elapsed
    assert (len(data.train), len(data.validation), len(data.test)) == (200, 50, 50)
    assert np.bincount(_labels(data.train), minlength=10).tolist() == [20] * 10
    assert set(np.bincount(_labels(data.test), minlength=10).tolist()) == {5}
    # gray pixels come back as RGB with three equal channels
    arr = np.asarray(data.train[0]["image"])
    assert arr.shape == (28, 28, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 2])


@pytest.mark.parametrize(
    "name, sizes, size",
    [("mnist", (3600, 400, 1000), (28, 28)), ("digits", (1294, 144, 359), (8, 8))],
)
def test_small_builtin_sets(name, sizes, size):
    data = load_image_dataset(name)
    assert (len(data.train), len(data.validation), len(data.test)) == sizes
    assert data.num_labels == 10 and data.label_names == [str(i) for i in range(10)]
    assert data.name == name
    for split in ("train", "validation", "test"):
        _assert_standard(data[split], data.label_names)
    img = data.train[0]["image"]
    assert img.mode == "RGB" and img.size == size
    assert np.asarray(img).max() > 0
    # every class is present in every split
    for split in ("train", "validation", "test"):
        assert len(np.unique(_labels(data[split]))) == 10
    # the test split does not depend on the seed
    other = load_image_dataset(name, seed=5)
    assert np.array_equal(other.source_indices["test"][1], data.source_indices["test"][1])


def test_validation_split_deterministic_and_disjoint():
    a = load_image_dataset("digits", seed=3)
    b = load_image_dataset("digits", seed=3)
    c = load_image_dataset("digits", seed=4)
    src_t, train_idx = a.source_indices["train"]
    src_v, val_idx = a.source_indices["validation"]
    assert src_t == src_v == "train"
    assert np.array_equal(val_idx, b.source_indices["validation"][1])
    assert np.array_equal(train_idx, b.source_indices["train"][1])
    assert not np.array_equal(val_idx, c.source_indices["validation"][1])
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(train_idx) + len(val_idx) == 1438  # together: the whole source train split
    # same seed -> same rows, by content too
    assert np.array_equal(np.asarray(a.validation[0]["image"]), np.asarray(b.validation[0]["image"]))
    assert _labels(a.validation).tolist() == _labels(b.validation).tolist()
    # the hold-out does not move when the train subset size changes
    d = load_image_dataset("digits", seed=3, max_train_samples=100, max_eval_samples=20)
    assert np.isin(d.source_indices["validation"][1], val_idx).all()
    assert np.isin(d.source_indices["train"][1], train_idx).all()
    assert (len(d.train), len(d.validation), len(d.test)) == (100, 20, 20)
    # larger than the split: keep all
    e = load_image_dataset("digits", max_train_samples=10**6, max_eval_samples=10**6)
    assert (len(e.train), len(e.validation), len(e.test)) == (1294, 144, 359)


def test_validation_fraction():
    data = load_image_dataset("digits", validation_fraction=0.25)
    assert len(data.validation) == round(0.25 * 1438)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_image_dataset("digits", validation_fraction=0.0)


# ------------------------------------------------------------------ local folders


def test_local_image_folder_train_test(tmp_path):
    root = _make_folder(tmp_path / "pets", per_class=5)
    data = load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"), validation_fraction=0.2)
    assert data.name == "pets"
    assert data.num_labels == 2 and data.id2label == {0: "cat", 1: "dog"}
    assert (len(data.train), len(data.validation), len(data.test)) == (8, 2, 10)
    assert sorted(_labels(data.validation).tolist()) == [0, 1]  # stratified
    for split in ("train", "validation", "test"):
        _assert_standard(data[split], ["cat", "dog"])
    assert data.train[0]["image"].size == (12, 10)


def test_local_folder_class_subfolders_only(tmp_path):
    root = tmp_path / "flat"
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        for i in range(10):
            _save(PILImage.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)), root / c / f"{i}.png")
    data = load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"), test_fraction=0.3, validation_fraction=0.1)
    assert data.label_names == ["a", "b", "c"]
    assert len(data.test) == 9 and len(data.validation) == 2 and len(data.train) == 19
    train_idx = data.source_indices["train"][1]
    for other in ("validation", "test"):
        assert data.source_indices[other][0] == "train"
        assert len(np.intersect1d(train_idx, data.source_indices[other][1])) == 0
    assert len(np.intersect1d(data.source_indices["validation"][1], data.source_indices["test"][1])) == 0


def test_local_folder_with_validation_split(tmp_path):
    root = _make_folder(tmp_path / "tvt", splits=("train", "validation", "test"), per_class=2)
    data = load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert (len(data.train), len(data.validation), len(data.test)) == (4, 4, 4)
    assert data.source_indices["validation"][0] == "validation"


def test_rgb_conversion_of_gray_rgba_palette(tmp_path):
    root = tmp_path / "modes"
    gray = PILImage.fromarray(np.full((5, 7), 77, dtype=np.uint8), mode="L")
    rgba = PILImage.fromarray(np.dstack([np.full((5, 7), v, np.uint8) for v in (10, 20, 30, 128)]), mode="RGBA")
    pal = PILImage.new("P", (7, 5), 0)
    pal.putpalette([200, 100, 50] + [0] * 765)
    la = gray.convert("LA")
    for i, (name, img) in enumerate([("gray", gray), ("rgba", rgba), ("pal", pal), ("la", la)]):
        _save(img, root / "train" / ("x" if i % 2 else "y") / f"{name}.png")
        _save(img, root / "test" / ("x" if i % 2 else "y") / f"{name}.png")
    data = load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"), validation_fraction=0.25)
    seen = {}
    for split in ("train", "validation", "test"):
        for ex in data[split]:
            assert ex["image"].mode == "RGB"
            seen[np.asarray(ex["image"])[0, 0].tolist().__repr__()] = True
    assert "[77, 77, 77]" in seen and "[10, 20, 30]" in seen and "[200, 100, 50]" in seen
    # the transform converts as well, for images that did not come through the loader
    for img in (gray, rgba, pal, la):
        out = build_transform(8, train=False)(img)
        assert out.shape == (3, 8, 8)


def test_save_to_disk_folder(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "img": [PILImage.fromarray(np.full((4, 4), i * 20, np.uint8)) for i in range(12)],
            "target": [i % 3 for i in range(12)],
        },
        features=datasets.Features({"img": datasets.Image(), "target": datasets.Value("int64")}),
    )
    datasets.DatasetDict(train=ds, test=ds.select(range(6))).save_to_disk(str(tmp_path / "saved"))
    data = load_image_dataset(str(tmp_path / "saved"), validation_fraction=0.25)
    assert data.num_labels == 3 and data.label_names == ["0", "1", "2"]
    assert (len(data.train), len(data.validation), len(data.test)) == (9, 3, 6)
    # stored undecoded; the library decodes on access (one path for every source)
    assert data.train.features["image"] == datasets.Image(decode=False)
    assert data.train[0]["image"].mode == "RGB"


# ------------------------------------------------------------------ Hub ids (load_dataset mocked)


def _fake_hub(monkeypatch, dd):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def _images(n, mode="RGB"):
    return [PILImage.new(mode, (4, 4)) for _ in range(n)]


def test_hub_dataset_column_detection(monkeypatch, tmp_path):
    feats = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=["p", "q", "r"]),
            "coarse_label": datasets.ClassLabel(names=["u", "v"]),
        }
    )
    mk = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"img": _images(n, "L"), "fine_label": [i % 3 for i in range(n)], "coarse_label": [i % 2 for i in range(n)]},
        features=feats,
    )
    calls = _fake_hub(monkeypatch, datasets.DatasetDict(train=mk(30), test=mk(9)))
    data = load_image_dataset("some-org/cifar-like", cache_dir=str(tmp_path))
    assert calls[0][0] == "some-org/cifar-like" and calls[0][2]["cache_dir"] == str(tmp_path)
    assert data.label_names == ["p", "q", "r"] and data.name == "some-org/cifar-like"
    assert (len(data.train), len(data.validation), len(data.test)) == (27, 3, 9)
    assert data.train[0]["image"].mode == "RGB"
    # explicit columns win
    data = load_image_dataset("some-org/cifar-like", label_column="coarse_label")
    assert data.label_names == ["u", "v"]


def test_hub_dataset_string_labels_and_validation_as_test(monkeypatch):
    mk = lambda labels: datasets.Dataset.from_dict({"image": _images(len(labels)), "labels": labels})  # noqa: E731
    _fake_hub(monkeypatch, datasets.DatasetDict(train=mk(["dog", "cat"] * 10), validation=mk(["cat", "dog", "emu"])))
    data = load_image_dataset("x/y")
    assert data.label2id == {"cat": 0, "dog": 1, "emu": 2}
    assert data.source_indices["test"][0] == "validation" and len(data.test) == 3
    assert data.source_indices["validation"][0] == "train" and len(data.validation) == 2
    assert sorted(_labels(data.test).tolist()) == [0, 1, 2]


def test_hub_unlabelled_test_split_is_ignored(monkeypatch):
    mk = lambda labels: datasets.Dataset.from_dict({"image": _images(len(labels)), "label": labels})  # noqa: E731
    _fake_hub(monkeypatch, datasets.DatasetDict(train=mk([0, 1] * 10), test=mk([-1] * 4)))
    data = load_image_dataset("x/unlabelled-test", validation_fraction=0.1, test_fraction=0.2)
    assert data.source_indices["test"][0] == "train" and len(data.test) == 4


# ------------------------------------------------------------------ errors


def test_error_unknown_name_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="could not be found offline") as info:
        load_image_dataset("no-such-org/no-such-dataset-xyz")
    msg = str(info.value)
    assert "local image folder" in msg and "load_dataset" in msg


def test_error_missing_local_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset(str(tmp_path / "nope"))
    f = tmp_path / "file.png"
    PILImage.new("RGB", (2, 2)).save(f)
    with pytest.raises(ValueError, match="is a file"):
        load_image_dataset(str(f))


def test_error_no_label_column(tmp_path):
    root = tmp_path / "unlabelled"
    for i in range(4):
        _save(PILImage.new("RGB", (3, 3)), root / f"{i}.png")
    with pytest.raises(ValueError, match="No label column") as info:
        load_image_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert "label_column" in str(info.value) and "subfolder" in str(info.value)


def test_error_labels_out_of_range_and_negative(monkeypatch):
    bad = datasets.Dataset.from_dict({"image": _images(4), "label": [0, 1, 5, 1]})
    bad = bad.cast_column("label", datasets.ClassLabel(names=["a", "b"]))
    _fake_hub(monkeypatch, datasets.DatasetDict(train=bad, test=bad))
    with pytest.raises(ValueError, match=r"out of range.*2 classes"):
        load_image_dataset("x/out-of-range")
    neg = datasets.Dataset.from_dict({"image": _images(4), "label": [0, -3, 1, 1]})
    _fake_hub(monkeypatch, datasets.DatasetDict(train=neg, test=neg))
    with pytest.raises(ValueError, match="negative labels"):
        load_image_dataset("x/negative")


def test_error_empty_split(monkeypatch):
    ok = datasets.Dataset.from_dict({"image": _images(4), "label": [0, 1, 0, 1]})
    _fake_hub(monkeypatch, datasets.DatasetDict(train=ok, test=ok.select([])))
    with pytest.raises(ValueError, match="'test'.*is empty"):
        load_image_dataset("x/empty")


def test_error_not_images_and_bad_arguments(monkeypatch):
    ds = datasets.Dataset.from_dict({"image": [1.0, 2.0], "label": [0, 1]})
    _fake_hub(monkeypatch, datasets.DatasetDict(train=ds, test=ds))
    with pytest.raises(ValueError, match="not images"):
        load_image_dataset("x/not-images")
    with pytest.raises(ValueError, match="max_train_samples"):
        load_image_dataset("digits", max_train_samples=0)
    with pytest.raises(ValueError, match="image_column"):
        load_image_dataset("digits", image_column="img")


# ------------------------------------------------------------------ transforms and loaders


@pytest.mark.parametrize("train", [False, True])
def test_build_transform_shapes_and_range(train):
    img = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (28, 20), dtype=np.uint8), mode="L")
    out = build_transform(32, train=train)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0
    if not train:
        assert torch.equal(out, build_transform(32, train=False)(img))
    names = [type(t).__name__ for t in build_transform(32, train=train).transforms]
    if train:
        assert names[1:] == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor"]
        assert build_transform(32, train=True).transforms[1].size == (36, 36)
    else:
        assert names[1:] == ["Resize", "ToTensor"]


def test_dataloader_batches_and_seeded_shuffle():
    data = load_image_dataset("digits", max_train_samples=40, max_eval_samples=10)
    loader = make_dataloader(data.train, input_size=16, train_transform=True, batch_size=16, shuffle=True, seed=7)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [16, 16, 8]
    b = batches[0]
    assert set(b) == {"pixel_values", "labels"}
    assert b["pixel_values"].shape == (16, 3, 16, 16) and b["pixel_values"].dtype == torch.float32
    assert b["labels"].dtype == torch.long
    assert 0.0 <= b["pixel_values"].min().item() and b["pixel_values"].max().item() <= 1.0

    def order(seed):
        dl = make_dataloader(data.train, input_size=8, train_transform=False, batch_size=40, shuffle=True, seed=seed)
        return next(iter(dl))["pixel_values"]

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    # not shuffled eval view: same order as the dataset
    dl = make_dataloader(data.test, input_size=8, train_transform=False, batch_size=4, shuffle=False, drop_last=True)
    labels = torch.cat([batch["labels"] for batch in dl])
    assert labels.tolist() == _labels(data.test)[:8].tolist()
    # the underlying dataset is not changed by with_transform
    assert data.train.column_names == ["image", "label"]


def test_collate_fn_and_dataloader_errors():
    batch = collate_fn([{"pixel_values": torch.zeros(3, 2, 2), "labels": 1}, {"pixel_values": torch.ones(3, 2, 2), "labels": 0}])
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["labels"].tolist() == [1, 0]
    ds = datasets.Dataset.from_dict({"img": _images(2), "y": [0, 1]})
    with pytest.raises(ValueError, match="columns 'image' and 'label'"):
        make_dataloader(ds, input_size=8, train_transform=False, batch_size=2, shuffle=False)


# ------------------------------------------------------------------ one decoding path for every source

# mode: (the image's pixel values, tiled along each row; the RGB each must decode to). The 16-bit and 32-bit
# values are scaled to 8 bits (65535 -> 255), float images in [0, 1] are multiplied by 255, alpha is dropped.
MODE_CASES = {
    "1": ([0, 1], [(0, 0, 0), (255, 255, 255)]),
    "L": ([0, 77, 255], [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
    "LA": ([(77, 0), (200, 255)], [(77, 77, 77), (200, 200, 200)]),
    "P": ([0, 1, 2], [(200, 100, 50), (10, 20, 30), (0, 0, 255)]),
    "RGB": ([(10, 20, 30), (250, 0, 128)], [(10, 20, 30), (250, 0, 128)]),
    "RGBA": ([(10, 20, 30, 0), (250, 0, 128, 255)], [(10, 20, 30), (250, 0, 128)]),
    "CMYK": ([(0, 0, 0, 0), (0, 255, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)],
             [(255, 255, 255), (255, 0, 255), (0, 255, 255), (0, 0, 0)]),
    "I;16": ([0, 25700, 32768, 65535], [(0, 0, 0), (100, 100, 100), (128, 128, 128), (255, 255, 255)]),
    "I;16B": ([0, 25700, 16384, 65535], [(0, 0, 0), (100, 100, 100), (64, 64, 64), (255, 255, 255)]),
    "I": ([0, 25700, 65535], [(0, 0, 0), (100, 100, 100), (255, 255, 255)]),
    "F": ([0.0, 0.2, 1.0], [(0, 0, 0), (51, 51, 51), (255, 255, 255)]),
}
_RAW = {"I;16": "<u2", "I;16B": ">u2", "I": "=i4", "F": "=f4"}
# PNG cannot hold CMYK, big-endian 16-bit, 32-bit int or float images; TIFF keeps each of them in its mode.
_FILE_FORMAT = {"CMYK": "TIFF", "I;16B": "TIFF", "I": "TIFF", "F": "TIFF"}


def _mode_image(mode):
    """A square image of `mode`, one side length per mode (so a decoded image tells which mode it was)."""
    values, _ = MODE_CASES[mode]
    n = 4 + list(MODE_CASES).index(mode)
    tiled = np.array([values[c % len(values)] for c in range(n)])
    arr = np.broadcast_to(tiled, (n,) + tiled.shape)
    if mode == "1":
        return PILImage.fromarray(arr.astype(bool))
    img = PILImage.frombytes(mode, (n, n), np.ascontiguousarray(arr).astype(_RAW.get(mode, np.uint8)).tobytes())
    if mode == "P":
        img.putpalette([200, 100, 50, 10, 20, 30, 0, 0, 255] + [0] * 759)
    return img


def _expected_rgb(n):
    mode = list(MODE_CASES)[n - 4]
    _, rgb = MODE_CASES[mode]
    return mode, np.broadcast_to(np.array([rgb[c % len(rgb)] for c in range(n)], np.uint8), (n, n, 3))


def _assert_decoded(data):
    seen = set()
    for split in ("train", "validation", "test"):
        ds = data[split]
        for i in range(len(ds)):
            image = ds[i]["image"]
            mode, want = _expected_rgb(image.size[0])
            assert image.mode == "RGB", (split, mode)
            assert np.array_equal(np.asarray(image), want), (split, mode, np.asarray(image)[0].tolist())
            # the training loader decodes the same way (a same-size Resize leaves the pixels as they are)
            n = image.size[0]
            batch = next(iter(make_dataloader(ds.select([i]), input_size=n, train_transform=False, batch_size=1,
                                              shuffle=False)))
            pixels = (batch["pixel_values"][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(pixels, want), (split, mode, "loader")
            seen.add(mode)
    assert seen == set(MODE_CASES)


def _mode_files(root):
    """train/ and test/, each with classes a/ and b/ holding one file of every mode; returns the file paths."""
    paths = []
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for mode in MODE_CASES:
                fmt = _FILE_FORMAT.get(mode, "PNG")
                path = root / split / cls / f"{mode.replace(';', '_')}.{fmt.lower()}"
                _save_as(_mode_image(mode), path, fmt)
                assert PILImage.open(path).mode == mode  # the file really holds that mode
                paths.append((split, cls, path))
    return paths


def _save_as(img, path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def test_every_mode_and_bit_depth_decodes_the_same_through_every_source(tmp_path, monkeypatch):
    files = _mode_files(tmp_path / "folder")
    # an image folder (the `imagefolder` builder)
    _assert_decoded(load_image_dataset(str(tmp_path / "folder"), validation_fraction=0.25))

    # a folder written by save_to_disk, from in-memory images (datasets encodes them itself)
    def split_of(name, images):
        n = len(images)
        return datasets.Dataset.from_dict(
            {"image": images, "label": [i % 2 for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))

    images = [_mode_image(mode) for mode in MODE_CASES for _ in range(2)]
    datasets.DatasetDict(train=split_of("train", images), test=split_of("test", images)).save_to_disk(
        str(tmp_path / "saved"))
    _assert_decoded(load_image_dataset(str(tmp_path / "saved"), validation_fraction=0.25))

    # a Hub data set (parquet rows hold the file bytes; the declared feature may ask for a mode of its own)
    def hub_split(split):
        rows = [(path.read_bytes(), path.name, cls) for s, cls, path in files if s == split]
        return datasets.Dataset.from_dict(
            {"img": [{"bytes": b, "path": name} for b, name, _ in rows], "label": [c for _, _, c in rows]},
            features=datasets.Features({"img": datasets.Image(mode="RGB"), "label": datasets.Value("string")}))

    _fake_hub(monkeypatch, datasets.DatasetDict(train=hub_split("train"), test=hub_split("test")))
    _assert_decoded(load_image_dataset("some-org/all-modes", validation_fraction=0.25))


def test_builtin_sets_decode_to_their_source_values():
    data = load_image_dataset("digits")
    x, _y = D._digits_arrays()
    rest, test = D._last_fraction_per_class(_y, 0.2)
    source = {"train": x[rest], "test": x[test]}
    for split in ("train", "validation", "test"):
        src, idx = data.source_indices[split]
        for i in (0, len(idx) - 1):
            image = data[split][i]["image"]
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.repeat(source[src][idx[i]][..., None], 3, axis=2))
