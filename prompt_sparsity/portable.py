"""Folders that load without prompt_sparsity: building merged models (`merge_and_unload`) whose `save_pretrained`
output reloads anywhere, and the loader stub that saved subnetworks carry.

- A dense merge stays the plain transformers class; it only learns to save its image processor.
- A compact (channel-pruned) merge, or one that keeps the prompt, is a `MergedClassifier`
  (`modeling_merged.py`, copied into the folder with an `auto_map`): timm bases are resized with timm's own
  pruned-variant mechanism (`adapt_model_from_string` and its shape spec), transformers bases layer by layer.
- A subnetwork folder (`PromptedSparseModel.save_pretrained`) gets an `auto_map` to a small stub that imports
  prompt_sparsity when it is installed and otherwise says what to install, instead of transformers' "model type
  not recognised / upgrade transformers".
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn
from transformers import AutoModelForImageClassification

from .modeling_merged import MergedClassifier, MergedClassifierConfig, SavesImageProcessor

SUBNETWORK_LOADER_FILE = "modeling_prompted_sparse.py"
SUBNETWORK_AUTO_MAP = {
    "AutoConfig": "modeling_prompted_sparse.PromptedSparseConfig",
    "AutoModelForImageClassification": "modeling_prompted_sparse.PromptedSparseModel",
}
_SUBNETWORK_LOADER = '''"""Loader of a prompt_sparsity subnetwork (written by PromptedSparseModel.save_pretrained).

The subnetwork (visual prompt + sparse mask or channel structure + label mapping) is defined by the prompt_sparsity
library; this file only hands over to it when it is installed.
"""

try:
    from prompt_sparsity import PromptedSparseConfig, PromptedSparseModel  # noqa: F401
except ImportError as err:
    raise ImportError(
        "This folder is a prompt_sparsity subnetwork (model_type 'prompted_sparse'). Loading it needs the "
        "prompt_sparsity library: `pip install prompt-sparsity`, then `import prompt_sparsity` before "
        "AutoModelForImageClassification.from_pretrained (no trust_remote_code needed then). To run it without the "
        "library, merge it once where the library is installed: "
        "`PromptedSparseModel.from_pretrained(folder).merge_and_unload(keep_prompt=True).save_pretrained(out)`; "
        "that folder loads with plain transformers."
    ) from err
'''

_PROCESSOR_SAVING: dict[type, type] = {}


def write_subnetwork_loader(save_directory) -> None:
    """Write the loader stub that the subnetwork's `auto_map` names (atomically)."""
    path = os.path.join(save_directory, SUBNETWORK_LOADER_FILE)
    fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=".loader-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_SUBNETWORK_LOADER)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def with_image_processor(model: nn.Module, processor) -> nn.Module:
    """Let a plain transformers model's `save_pretrained` also write `processor` (in place; returns the model).
    Its class becomes a subclass of the same name that only adds that, so the saved config (`architectures`) and
    `isinstance` checks are those of the plain class, and the saved folder loads with plain transformers."""
    base = type(model)
    if not isinstance(model, SavesImageProcessor):
        cls = _PROCESSOR_SAVING.get(base)
        if cls is None:
            cls = type(base.__name__, (SavesImageProcessor, base),
                       {"__module__": base.__module__, "__qualname__": base.__qualname__,
                        "__doc__": base.__doc__, "image_processor": lambda self: self._merged_image_processor})
            _PROCESSOR_SAVING[base] = cls
        model.__class__ = cls
    model._merged_image_processor = processor
    return model


def refresh_timm_config(config, input_size: int, mean, std) -> None:
    """A timm base's config after a merge: its labels are the model's own (`label_names` would otherwise keep the
    1000 ImageNet names, which `TimmWrapperConfig.from_dict` prefers), and `pretrained_cfg` describes the input the
    merged model takes (size, normalisation, no crop), not the pretrained source's."""
    if getattr(config, "model_type", None) != "timm_wrapper":
        return
    config.label_names = [config.id2label[i] for i in range(len(config.id2label))]
    pretrained_cfg = dict(getattr(config, "pretrained_cfg", None) or {})
    pretrained_cfg.pop("num_classes", None)
    pretrained_cfg.pop("label_names", None)
    pretrained_cfg.update(input_size=[3, int(input_size), int(input_size)], mean=[float(v) for v in mean],
                          std=[float(v) for v in std], crop_pct=1.0, crop_mode="center", interpolation="bilinear")
    config.pretrained_cfg = pretrained_cfg


def _is_timm(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "timm_wrapper" and hasattr(model, "timm_model")


def timm_pruned_spec(timm_model: nn.Module) -> str:
    """timm's pruned-variant spec of a model (the format of timm's `_pruned/*.txt` files): the weight shape of every
    conv, BatchNorm and Linear, which `timm.models.adapt_model_from_string` applies to a freshly built model."""
    from timm.layers import BatchNormAct2d

    parts = []
    for name, module in timm_model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, BatchNormAct2d, nn.Linear)):
            parts.append(f"{name}.weight:[{', '.join(str(s) for s in module.weight.shape)}]")
    return "***".join(parts)


def changed_layer_shapes(model: nn.Module) -> list:
    """`[[module name, weight shape], ...]` of the layers whose weight shape differs from the architecture its
    config describes (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        reference = AutoModelForImageClassification.from_config(model.config)
    ref_modules = dict(reference.named_modules())
    changed = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        ref = ref_modules.get(name)
        if isinstance(weight, torch.Tensor) and ref is not None and tuple(ref.weight.shape) != tuple(weight.shape):
            changed.append([name, list(weight.shape)])
    return changed


@torch.no_grad()
def build_merged(plain: nn.Module, *, prompt: torch.Tensor | None, normalize: bool, input_size: int,
                 output_size: int, image_mean, image_std, forward_kwargs: dict | None) -> MergedClassifier:
    """A `MergedClassifier` around the merged plain model `plain` (its weights, per-layer widths and labels), with the
    fixed `prompt` (1, C, output_size, output_size) in front if given. Built the way `from_pretrained` rebuilds it
    (fresh base, widths from the config) and loaded strictly, so a spec that would not reload fails here."""
    timm_spec, layer_shapes = None, changed_layer_shapes(plain)
    if layer_shapes and _is_timm(plain):
        timm_spec, layer_shapes = timm_pruned_spec(plain.timm_model), None
    config = MergedClassifierConfig(
        base_config=plain.config.to_dict(), layer_shapes=layer_shapes or None, timm_pruned_spec=timm_spec,
        prompt=prompt is not None, normalize=normalize, input_size=int(input_size), output_size=int(output_size),
        num_channels=int(prompt.shape[1]) if prompt is not None else len(image_mean),
        image_mean=[float(v) for v in image_mean], image_std=[float(v) for v in image_std],
        base_forward_kwargs=dict(forward_kwargs or {}) or None,
        id2label=dict(plain.config.id2label), label2id=dict(plain.config.label2id),
    )
    merged = MergedClassifier(config).to(device=plain.device, dtype=plain.dtype)
    state = {f"model.{k}": v for k, v in plain.state_dict().items()}
    if prompt is not None:
        state["prompt"] = prompt.detach().to(merged.prompt)
    try:
        merged.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"merge_and_unload: the merged {type(plain).__name__} cannot be rebuilt from its saved widths ({err}). "
            "Please report this with the model's architecture.") from err
    return merged.train(plain.training)
