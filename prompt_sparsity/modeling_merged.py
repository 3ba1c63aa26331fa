"""A merged subnetwork that loads without prompt_sparsity: `MergedClassifierConfig` + `MergedClassifier`.

`PromptedSparseModel.merge_and_unload()` returns a `MergedClassifier` when the plain base class cannot hold the
result: a channel-pruned (compact) base, whose per-layer widths the base config does not describe, and/or the
fixed visual prompt and normalisation kept in front (`keep_prompt=True`). Its `save_pretrained` writes this file
into the folder and an `auto_map` into config.json (the transformers convention for architectures it does not
know), so `AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)` rebuilds it anywhere;
after `import prompt_sparsity` (which registers these classes) no flag is needed.

SELF-CONTAINED ON PURPOSE: this file is copied into model folders and imported there, so it imports only torch and
transformers (timm lazily, for timm bases) and never prompt_sparsity.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_TYPE = "prompt_sparsity_merged"
# Keywords of save_pretrained(push_to_hub=True) that belong to the push (see SavesImageProcessor).
_PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr",
                "tags")


class MergedClassifierConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MergedClassifier`]: a plain image classifier (its config nested as `base_config`), resized
    layer by layer to a channel-pruned architecture, optionally behind a fixed input transform.

        base_config: the dense architecture's config (any `AutoModelForImageClassification` config).
        layer_shapes (`list`, optional): `[[module name, weight shape], ...]` of the layers whose width differs from
            `base_config` (transformers bases); applied to the freshly built base before its weights load.
        timm_pruned_spec (`str`, optional): for timm bases (`TimmWrapperForImageClassification`), timm's own
            pruned-variant spec (`"layer.weight:[shape]***..."`), applied with `timm.models.adapt_model_from_string`.
        prompt (`bool`): add the stored prompt (`prompt` tensor, on an `output_size` canvas) to the zero-padded image
            and clamp to [0, 1] before normalising.
        normalize (`bool`): normalise the input with `image_mean`/`image_std` inside the model (True whenever the
            prompt is kept: it acts on un-normalised images). False: the model takes normalised images.
        input_size / output_size: the image size the model takes; the prompt canvas (>= input_size).
        base_forward_kwargs: keyword arguments every call of the base gets (e.g. ViT's `interpolate_pos_encoding`).
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    base_config: dict | PreTrainedConfig | None = None
    layer_shapes: list | None = None
    timm_pruned_spec: str | None = None
    prompt: bool = False
    normalize: bool = False
    input_size: int = 224
    output_size: int = 224
    num_channels: int = 3
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    base_forward_kwargs: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.base_config, dict) and "model_type" in self.base_config:
            # Through the config class's own from_dict: TimmWrapperConfig rebuilds its labels there.
            base = dict(self.base_config)
            self.base_config = CONFIG_MAPPING[base.pop("model_type")].from_dict(base)
        super().__post_init__(**kwargs)
        if self.image_mean is None:
            self.image_mean = [0.485, 0.456, 0.406]
        if self.image_std is None:
            self.image_std = [0.229, 0.224, 0.225]
        if self.prompt and not self.normalize:
            raise ValueError("MergedClassifierConfig: prompt=True needs normalize=True (the prompt is added to "
                             "un-normalised images, which the model then normalises).")


@torch.no_grad()
def resize_layers_(model: nn.Module, layer_shapes) -> nn.Module:
    """Give the layers named in `layer_shapes` (`[[module name, weight shape], ...]`) their recorded widths, in
    place, keeping each module's class (new tensors are uninitialised: the checkpoint fills them). Conv2d (plain or
    depthwise), Linear, BatchNorm and per-channel GroupNorm."""
    for name, shape in layer_shapes:
        shape = [int(s) for s in shape]
        module = model.get_submodule(name)
        ref = module.weight
        empty = lambda *size: nn.Parameter(torch.empty(*size, device=ref.device, dtype=ref.dtype),  # noqa: E731
                                           requires_grad=ref.requires_grad)
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            if depthwise:  # one filter per channel: in = out = groups (a unit cut to one channel has groups=1)
                module.in_channels = module.out_channels = module.groups = shape[0]
            elif module.groups == 1:
                module.out_channels, module.in_channels = shape[0], shape[1]
            else:
                raise ValueError(f"{name}: a grouped conv ({module.groups} groups) cannot be resized")
            module.weight = empty(*shape)
            if module.bias is not None:
                module.bias = empty(shape[0])
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = shape
            module.weight = empty(*shape)
            if module.bias is not None:
                module.bias = empty(shape[0])
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            n = shape[0]
            if isinstance(module, nn.GroupNorm):
                if module.num_groups != module.num_channels:
                    raise ValueError(f"{name}: only a per-channel GroupNorm can be resized")
                module.num_groups = module.num_channels = n
            else:
                module.num_features = n
                for buffer in ("running_mean", "running_var"):
                    old = getattr(module, buffer)
                    if old is not None:
                        setattr(module, buffer, torch.empty(n, device=old.device, dtype=old.dtype))
            module.weight = empty(n)
            if module.bias is not None:
                module.bias = empty(n)
        else:
            raise ValueError(f"{name}: cannot resize a {type(module).__name__}")
    return model


class SavesImageProcessor:
    """`save_pretrained` also writes the image processor (`self.image_processor()`), so that
    `pipeline("image-classification", model=folder)` works on the saved folder."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        push = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
        if "token" in push:
            kwargs["token"] = push["token"]
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.image_processor().save_pretrained(save_directory)
            if push_to_hub:  # push_to_hub saves again (with the processor) into a staging folder, then uploads it
                repo_id = push.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
                return self.push_to_hub(repo_id, **push)
        return result


class MergedClassifier(SavesImageProcessor, PreTrainedModel):
    """A plain classifier (`model`, any `AutoModelForImageClassification`) with per-layer widths rebuilt from the
    config, optionally behind the fixed visual prompt and the normalisation. Nothing is masked at run time, so it
    exports (`torch.export`, ONNX) and compiles like the plain model. `forward(pixel_values, labels=None)` returns
    the base model's output (`.logits`)."""

    config_class = MergedClassifierConfig
    base_model_prefix = "merged"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: MergedClassifierConfig):
        super().__init__(config)
        self.model = AutoModelForImageClassification.from_config(config.base_config)
        if config.timm_pruned_spec:
            try:
                from timm.models import adapt_model_from_string
            except ImportError:
                adapt_model_from_string = None
            if adapt_model_from_string is None:
                raise ImportError("this model is a pruned timm model: install timm (pip install timm)")
            self.model.timm_model = adapt_model_from_string(self.model.timm_model, config.timm_pruned_spec)
        if config.layer_shapes:
            resize_layers_(self.model, config.layer_shapes)
        if config.prompt:
            size = config.output_size
            self.register_buffer("prompt", torch.zeros(1, config.num_channels, size, size))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # The base initialised itself in from_config (and a checkpoint overwrites everything): only the prompt.
        if module is self and self.config.prompt:
            hf_init.zeros_(self.prompt)

    def input_transform(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the base model sees: the prompted, normalised image (or the input as it is)."""
        config = self.config
        x = pixel_values
        if config.prompt:
            if x.shape[-2:] != (config.input_size, config.input_size):
                raise ValueError(
                    f"this model expects {config.input_size}x{config.input_size} images, got {tuple(x.shape[-2:])}; "
                    "resize them to input_size (the saved image processor does this).")
            lo = (config.output_size - config.input_size) // 2
            hi = config.output_size - config.input_size - lo
            x = torch.clamp(F.pad(x, (lo, hi, lo, hi)) + self.prompt, 0.0, 1.0)
        if config.normalize:
            mean = torch.tensor(config.image_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(config.image_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.to(self.model.dtype)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any):
        kwargs = {**(self.config.base_forward_kwargs or {}), **kwargs}
        return self.model(self.input_transform(pixel_values), labels=labels, **kwargs)

    def image_processor(self):
        """The processor that feeds this model: resize to input_size, rescale to [0, 1], and normalise unless the
        model does it itself."""
        from transformers import ViTImageProcessor

        size = self.config.input_size
        return ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, do_rescale=True,
                                 rescale_factor=1 / 255, do_normalize=not self.config.normalize,
                                 image_mean=list(self.config.image_mean), image_std=list(self.config.image_std))


# save_pretrained copies this file into the folder and writes the auto_map that points at these classes.
MergedClassifierConfig.register_for_auto_class("AutoConfig")
MergedClassifier.register_for_auto_class("AutoModelForImageClassification")
