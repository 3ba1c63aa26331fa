"""ONNX export of a subnetwork or a merged model (`export_onnx`), checked in onnxruntime.

The graph comes from `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript); its input is
`pixel_values` with a dynamic batch dimension and its output `logits`. A subnetwork is merged first
(`merge_and_unload(keep_prompt=True)`: the prompt and the normalisation are folded into the graph, so the ONNX model
takes what the subnetwork takes: images in [0, 1] at `input_size`). Needs the `export` extra
(`pip install "prompt-sparsity[export]"`: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export_onnx", "ONNX_RTOL", "ONNX_ATOL"]

#: The check's tolerance: every logit of onnxruntime within ONNX_ATOL + ONNX_RTOL * |PyTorch logit| (float32
#: kernels differ in summation order; measured differences are ~1e-5 on the test models).
ONNX_RTOL = 1e-4
ONNX_ATOL = 1e-4
_EXTRA = 'pip install "prompt-sparsity[export]"'


class _Logits(nn.Module):
    """The classifier with a single tensor output (`logits`), which is what an ONNX graph returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"export_onnx needs {module}: {_EXTRA} (installs onnx, onnxscript and onnxruntime).") from err


def _deployable(model) -> nn.Module:
    """What goes into the graph: a merged model; a subnetwork is merged with its prompt, after checking that
    its search is over."""
    from .modeling import PromptedSparseModel

    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(str(model))
    if isinstance(model, PromptedSparseModel):
        if model.sparsity is not None and not model.sparsity.frozen:
            raise ValueError(
                "export_onnx: this model is still in its mask search (trainable float scores); the exported graph "
                "needs a fixed mask. Call model.freeze_mask() (or model.start_finetuning()) first, then export.")
        if model.structure is not None and not model.structure.compact:
            what = "hypernetwork" if model.structure.hypernetwork is not None else "channel scores"
            raise ValueError(
                f"export_onnx: this structured model is still in its channel search (the {what} picks the channels "
                "at run time); call model.compact() first (it removes the channels), then export.")
        return model.merge_and_unload(keep_prompt=True)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"export_onnx takes a PromptedSparseModel, a merged model (merge_and_unload()) or a saved "
                        f"folder, got {type(model).__name__}.")
    return model


def _input_size(model: nn.Module) -> int:
    from .modeling_merged import MergedClassifier, SavesImageProcessor

    if isinstance(model, MergedClassifier):
        return int(model.config.input_size)
    if isinstance(model, SavesImageProcessor):  # a dense merge: its processor's size
        return int(model.image_processor().size["height"])
    size = getattr(model.config, "image_size", None)
    if isinstance(size, int):
        return size
    pretrained_cfg = getattr(model.config, "pretrained_cfg", None) or {}
    if "input_size" in pretrained_cfg:
        return int(pretrained_cfg["input_size"][-1])
    raise ValueError("export_onnx: cannot tell this model's input size from its config; pass input_size=...")


@torch.no_grad()
def export_onnx(model, path: str | os.PathLike, *, input_size: int | None = None, overwrite: bool = False,
                opset_version: int | None = None, check: bool = True) -> dict[str, Any]:
    """Export `model` to an ONNX file at `path` and check it in onnxruntime.

    `model`: a `PromptedSparseModel` whose search is over (frozen mask, or compacted channels; it is merged with
    its prompt), a merged model (`merge_and_unload(...)`, with or without the prompt), or the folder of either.
    The graph takes `pixel_values` (batch, C, input_size, input_size) with any batch size and returns `logits`.

    An existing file is never replaced unless `overwrite=True`; the file is written next to `path` and renamed into
    place, so an interrupted export leaves no partial file. `check=True` runs the file in onnxruntime (CPU) on a
    random batch of another size than the traced one and raises if any logit differs from PyTorch's by more than
    `ONNX_ATOL + ONNX_RTOL * |logit|` (1e-4 + 1e-4 * |logit|).

    Returns `{"path", "input_size", "opset_version", "max_abs_diff", "atol", "rtol"}` (`max_abs_diff` None without
    the check)."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"export_onnx: {path} should end in .onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(f"export_onnx: {path} already exists; pass overwrite=True to replace it, or choose "
                              "another path.")
    _require("onnxscript")
    _require("onnx")
    deploy = _deployable(model)
    size = int(input_size or _input_size(deploy))
    was_training = deploy.training
    deploy.eval()
    try:
        wrapped = _Logits(deploy).eval()
        channels = int(getattr(deploy.config, "num_channels", None) or 3)
        example = torch.rand(2, channels, size, size, dtype=deploy.dtype, device=deploy.device)
        batch = torch.export.Dim("batch", min=1)
        kwargs = {} if opset_version is None else {"opset_version": opset_version}
        program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=["pixel_values"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".onnx.tmp")
        os.close(fd)
        try:
            program.save(tmp)
            report = {"path": str(path), "input_size": size, "opset_version": program.model.opset_imports.get("", None),
                      "max_abs_diff": None, "atol": ONNX_ATOL, "rtol": ONNX_RTOL}
            if check:
                report["max_abs_diff"] = _check(wrapped, tmp, channels, size, deploy)
            if path.exists() and not overwrite:  # appeared while exporting: still never replaced silently
                raise FileExistsError(f"export_onnx: {path} appeared during the export; pass overwrite=True.")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        deploy.train(was_training)
    return report


def _check(wrapped: nn.Module, onnx_path: str, channels: int, size: int, deploy: nn.Module) -> float:
    ort = _require("onnxruntime")
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    x = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    ref = wrapped(x.to(device=deploy.device, dtype=deploy.dtype)).float().cpu()
    (out,) = session.run(["logits"], {"pixel_values": x.to(deploy.dtype).numpy()})
    out = torch.from_numpy(out).float()
    if out.shape != ref.shape:
        raise RuntimeError(f"export_onnx: onnxruntime returned logits of shape {tuple(out.shape)}, PyTorch "
                           f"{tuple(ref.shape)}; the file was not written.")
    diff = (out - ref).abs()
    worst = float(diff.max())
    if bool((diff > ONNX_ATOL + ONNX_RTOL * ref.abs()).any()):
        raise RuntimeError(f"export_onnx: onnxruntime's logits differ from PyTorch's by up to {worst:.3g} (tolerance "
                           f"{ONNX_ATOL} + {ONNX_RTOL} * |logit|); the file was not written. Please report this "
                           "with the model's architecture.")
    return worst
