"""`PromptedSparseModel`: a visual prompt and a sparsity pattern around any image classifier."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration import IMAGENET_MEAN, IMAGENET_STD, PromptedSparseConfig
from .label_mapping import find_classifier, fold_label_mapping, set_labels
from .modeling_merged import MODEL_TYPE as MERGED_MODEL_TYPE
from .modeling_merged import MergedClassifier, MergedClassifierConfig
from .prompts import VisualPrompt
from .sparsity.semi_structured import log_dense_layers
from .sparsity.channel_scores import initial_channel_scores
from .sparsity.structured import ChannelSparsity
from .sparsity.unstructured import (
    COLLAPSE_WARNING_SPARSITY,
    DEFAULT_MIN_LAYER_DENSITY,
    StraightThroughMask,
    ThresholdFinder,
    collapsed_layers,
    density_floors,
    find_prunable_layers,
    layout,
    mask_from_scores_,
    pack_mask,
    packed_size,
    scaled_scores,
    unpack_mask,
)

logger = logging.getLogger(__name__)


class UnstructuredMask(nn.Module):
    """Holds either trainable float scores (`scores`, one per pruned weight, flat) or a frozen bit-packed mask
    (`mask_packed`). The hard 0/1 mask itself is derived, cached, and recomputed whenever the scores change."""

    def __init__(self, layers, sparsity: float, threshold: str, mask_format: str,
                 min_density: float = DEFAULT_MIN_LAYER_DENSITY, nm_pattern: str | None = None):
        super().__init__()
        self.layers = layers
        # N:M semi-structured selection (None: the threshold path); its ineligible layers stay dense.
        self.nm_pattern = nm_pattern
        self.nm_dense_layers = log_dense_layers(layers, nm_pattern) if nm_pattern is not None else []
        self.numel = sum(layer.numel for layer in layers)
        self.sparsity = float(sparsity)
        self.threshold = threshold
        self.min_density = float(min_density)
        self.protected_rows: dict[str, list[int]] = {}  # {head layer: the rows the label mapping reads}
        self._forced: set = set()  # floor groups forced at the last mask computation (see select_with_floors_)
        if mask_format == "scores":
            self.scores = nn.Parameter(torch.zeros(self.numel))
        else:
            self.scores = None
            self.register_buffer("mask_packed", torch.zeros(packed_size(self.numel), dtype=torch.uint8))
        self._finder = ThresholdFinder()
        self._mask = None  # float 0/1, flat, cached
        self._mask_source = None  # (tensor id, version) the cache was computed from
        self.generation = 0  # bumped whenever the hard mask may have changed (keys the wrapper's W * m cache)

    @property
    def frozen(self) -> bool:
        return self.scores is None

    def _source(self):
        t = self.mask_packed if self.frozen else self.scores
        return (id(t), t._version, t.device)

    @torch.no_grad()
    def update_mask(self) -> torch.Tensor:
        """Recompute the hard mask from the current scores (or unpack the frozen mask)."""
        if self.frozen:
            self._mask = unpack_mask(self.mask_packed, self.numel, device=self.mask_packed.device)
        else:
            if self._mask is None or self._mask.shape != self.scores.shape or self._mask.device != self.scores.device:
                self._mask = torch.empty_like(self.scores)
            mask_from_scores_(self.scores.detach(), self._mask, self.layers, self.sparsity, self.threshold,
                              self._finder, self.floors(), self._forced, nm_pattern=self.nm_pattern)
        self._mask_source = self._source()
        self.generation += 1
        return self._mask

    def mask(self) -> torch.Tensor:
        """The current hard mask (flat, float).

        Trainable scores in training mode: recomputed on every call (the ThresholdFinder makes that cheap), because
        fused and foreach optimisers (`AdamW(fused=True)`, the transformers Trainer's default) update the scores
        without bumping their `_version`. In eval mode (and for a frozen mask) it is cached until the tensor is
        replaced or changed in place, or the module switches mode (`train()`/`eval()`)."""
        if torch.compiler.is_compiling():
            if not self.frozen:
                raise RuntimeError("torch.export/torch.compile need a frozen mask: call model.freeze_mask() first "
                                   "(trainable scores select the mask with data-dependent control flow).")
            return unpack_mask(self.mask_packed, self.numel)  # traced into the graph; no cached fakes
        if self._mask is None or self._mask_source != self._source() or (self.training and not self.frozen):
            self.update_mask()
        return self._mask

    def floors(self) -> list:
        """The layer-collapse floors every mask computed here respects (see `density_floors`); none under an N:M
        pattern, which keeps N/M of every row of every eligible layer."""
        if self.nm_pattern is not None:
            return []
        return density_floors(self.layers, self.min_density, self.protected_rows)

    def protect_rows(self, layer_name: str, rows: list[int]) -> None:
        """Give each of these rows of `layer_name` its own floor (the rows of a pretrained head that a label
        mapping reads: the others never reach the output)."""
        if any(layer.name == layer_name for layer in self.layers):
            self.protected_rows = {layer_name: [int(r) for r in rows]}
            self._mask_source = None

    def warn_collapsed(self) -> dict[str, float]:
        """Warn, naming them, about the layers of the current mask pruned above 99%."""
        found = collapsed_layers(self.mask(), self.layers)
        if found:
            names = ", ".join(f"{n} ({100 * s:.2f}%)" for n, s in list(found.items())[:8])
            warnings.warn(
                f"{len(found)} pruned layer(s) are above {100 * COLLAPSE_WARNING_SPARSITY:.0f}% sparsity: {names}"
                f"{' ...' if len(found) > 8 else ''}. A layer with (almost) no weights outputs constants; keep a "
                "floor with min_layer_density (default 0.01) or exclude the layer (exclude_modules).",
                UserWarning, stacklevel=3)
        return found

    def train(self, mode: bool = True):
        self._mask_source = None  # an optimiser may have moved the scores without a version bump
        return super().train(mode)

    def layer_masks(self, differentiable: bool = False) -> dict[str, torch.Tensor]:
        flat = self.mask()
        if differentiable and not self.frozen and self.scores.requires_grad:
            flat = StraightThroughMask.apply(self.scores, flat)
        return {
            layer.param_name: flat[layer.offset : layer.offset + layer.numel].view(layer.shape) for layer in self.layers
        }

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the float scores by the 1-bit mask they define (about 1/32 of the size)."""
        if self.frozen:
            return
        packed = pack_mask(self.mask()).to(self.scores.device)
        self.scores = None
        self.register_buffer("mask_packed", packed)
        self._mask_source = None
        self.warn_collapsed()
        self.generation += 1

    @torch.no_grad()
    def set_mask(self, flat_mask: torch.Tensor) -> None:
        """Install a fixed 0/1 mask (e.g. from a magnitude or random pruner, or another subnetwork)."""
        if flat_mask.numel() != self.numel:
            raise ValueError(f"mask has {flat_mask.numel()} entries but the pruned layers hold {self.numel} weights.")
        device = self.scores.device if not self.frozen else self.mask_packed.device
        if not self.frozen:
            self.scores = None
        self.register_buffer("mask_packed", pack_mask(flat_mask).to(device))
        self._mask_source = None
        self.warn_collapsed()
        self.generation += 1

    def extra_repr(self) -> str:
        state = "frozen 1-bit mask" if self.frozen else "trainable scores"
        nm = f", nm_pattern={self.nm_pattern}" if self.nm_pattern is not None else ""
        return f"layers={len(self.layers)}, weights={self.numel}, sparsity={self.sparsity}{nm}, {state}"


class PromptedSparsePreTrainedModel(PreTrainedModel):
    config_class = PromptedSparseConfig
    base_model_prefix = "prompted_sparse"  # never a checkpoint prefix: keys are model.*, prompt.*, sparsity.*
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, VisualPrompt):
            module.reset_parameters(hf_init.zeros_)
        elif isinstance(module, ChannelSparsity):
            if module.hypernetwork is not None:
                module.hypernetwork.reset_parameters()  # after its children's generic init: this one wins
            elif not module.compact:  # channel scores from the dense base's filter norms (channel_scores.py)
                hf_init.copy_(module.channel_scores.scores,
                              initial_channel_scores(self.model, module.units).to(module.channel_scores.scores))
            else:  # a compact model's scores are a record of its search: they come from the checkpoint
                hf_init.zeros_(module.channel_scores.scores)
            hf_init.zeros_(module.kept_indices)
        elif isinstance(module, UnstructuredMask):
            if module.frozen:
                hf_init.constant_(module.mask_packed, 255)  # a mask built from a config alone keeps everything
            else:
                weights = self.model.state_dict()
                flat = torch.cat([scaled_scores(weights[layer.param_name]).flatten() for layer in module.layers])
                hf_init.copy_(module.scores, flat.to(module.scores))
        else:
            super()._init_weights(module)


class PromptedSparseModel(PromptedSparsePreTrainedModel):
    """A visual prompt + a sparse subnetwork of any `AutoModelForImageClassification`.

    `forward(pixel_values)` takes images in [0, 1] at `config.input_size` (the saved image processor produces
    them), applies the prompt and normalisation, runs the wrapped model with masked weights, and maps its logits
    to the target classes. The wrapped model keeps its own state-dict keys under `model.`.
    """

    def __init__(self, config: PromptedSparseConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            base_model = AutoModelForImageClassification.from_config(config.base_config)
        else:
            # Already initialised (pretrained): keep post_init() from touching it.
            for module in base_model.modules():
                module._is_hf_initialized = True
        self.model = base_model
        self.prompt = VisualPrompt(config)
        self.sparsity = None
        self.structure = None
        if config.sparsity_type == "unstructured":
            shapes = self._resolve_pruned_layers()
            self.sparsity = UnstructuredMask(layout(shapes), config.sparsity, config.threshold, config.mask_format,
                                             config.min_layer_density, config.nm_pattern)
            self._protect_mapped_rows()
        elif config.sparsity_type == "structured":
            self.structure = ChannelSparsity(config, self.model)  # shrinks self.model if already compacted
        self._forward_kwargs = self._base_forward_kwargs()
        self._masked_cache = None  # (key, {param name: W * m}) in frozen inference, see masked_parameters
        self.post_init()

    # ----------------------------------------------------------------------------------------------- building
    def _resolve_pruned_layers(self) -> dict[str, tuple[int, ...]]:
        found = {
            name: tuple(module.weight.shape)
            for name, module in find_prunable_layers(
                self.model, self.config.target_modules, self.config.exclude_modules,
                every_pattern_matches=self.config.pruned_layers is None,  # new masks only: saved ones still load
            )
        }
        recorded = self.config.pruned_layers
        if recorded is None:
            # A list of [name, shape] pairs: order defines the flat layout (JSON dicts get their keys sorted).
            self.config.pruned_layers = [[name, list(shape)] for name, shape in found.items()]
            return found
        recorded = {name: tuple(shape) for name, shape in recorded}
        if recorded != found:
            missing = [n for n in recorded if n not in found]
            wrong = [(n, recorded[n], found[n]) for n in recorded if n in found and recorded[n] != found[n]]
            detail = f"layers missing from the base model: {missing[:3]}" if missing else ""
            if wrong:
                n, want, got = wrong[0]
                detail += f"{'; ' if detail else ''}layer {n!r} has shape {list(got)} but the mask expects {list(want)}"
            if not detail:
                detail = f"the base model has extra prunable layers {[n for n in found if n not in recorded][:3]}"
            raise ValueError(
                "this sparse checkpoint does not fit the base model: "
                f"{detail}. Load it onto the base it was searched on ({self.config.base_model_name_or_path!r}, "
                "recorded in its config), or search a new mask for this model."
            )
        return recorded

    def _base_forward_kwargs(self) -> dict[str, Any]:
        params = inspect.signature(self.model.forward).parameters
        base_size = getattr(self.config.base_config, "image_size", None)
        if "interpolate_pos_encoding" in params and base_size not in (None, self.config.output_size):
            return {"interpolate_pos_encoding": True}  # ViT at a size other than its config's
        return {}

    @classmethod
    def from_base(
        cls,
        base_model: str | PreTrainedModel,
        *,
        head: str = "pretrained",
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        sparsity: float = 0.0,
        sparsity_type: str = "unstructured",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        input_size: int | None = None,
        output_size: int | None = None,
        **kwargs,
    ) -> "PromptedSparseModel":
        """Wrap a pretrained classifier (a model, a Hub id, a local dir, or a built-in name such as
        `"efficientnet-lite0"`). `head="new"` replaces the classifier with a fresh `num_labels`-way head;
        `head="pretrained"` keeps it (map classes later with `set_label_mapping`, e.g. from FLM).

        Loading options of `from_pretrained` (`token`, `cache_dir`, `dtype`, `revision`, `local_files_only`,
        `force_download`, `trust_remote_code`, ...; see `LOADING_KWARGS`) go to the base model's (and its image
        processor's) `from_pretrained` and are never stored in the config; every other keyword is a
        `PromptedSparseConfig` setting. `dtype` also applies to the wrapper's own tensors (prompt, scores).

        A model instance is deep-copied: the caller's object is neither changed (weights, train/eval mode) nor
        shared. Like `from_pretrained`, the result is in eval mode; `start_mask_search()` and the other stage
        methods switch it to training."""
        from .integrity import load_checked, refuse_subnetwork_as_base
        from .pretrained import resolve_pretrained

        load_kwargs = {k: kwargs.pop(k) for k in LOADING_KWARGS if k in kwargs}
        if "torch_dtype" in load_kwargs:  # the transformers 4 name
            load_kwargs.setdefault("dtype", load_kwargs.pop("torch_dtype"))
        load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
        if head not in ("pretrained", "new"):
            raise ValueError(f"head={head!r}: use 'pretrained' (keep the source head, FLM) or 'new' (fresh head).")
        if id2label is not None and num_labels is None:
            num_labels = len(id2label)
        if head == "new" and not num_labels:
            raise ValueError("head='new' needs num_labels (or id2label) for the fresh classifier.")
        name_or_path = None
        if isinstance(base_model, str):
            name_or_path = base_model
            path = resolve_pretrained(base_model)
            kwargs_base = dict(load_kwargs)
            if head == "new":
                labels = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
                kwargs_base.update(num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()})
                kwargs_base["ignore_mismatched_sizes"] = True
            revision = load_kwargs.get("revision")
            config_kwargs = {k: v for k, v in load_kwargs.items() if k != "dtype"}
            # Checked before the weights load: a subnetwork here would be wrapped again (its prompt applied twice).
            refuse_subnetwork_as_base(load_checked(lambda: AutoConfig.from_pretrained(path, **config_kwargs),
                                                   path, revision), name_or_path)
            base_model = load_checked(lambda: AutoModelForImageClassification.from_pretrained(path, **kwargs_base),
                                      path, revision)
        elif head == "new":
            raise ValueError("head='new' with a model instance: give the model with its new head already in place.")
        else:
            if load_kwargs:
                raise ValueError(
                    f"from_base got loading options {sorted(load_kwargs)} with a model instance, which is already "
                    "loaded; pass them to its from_pretrained, or give from_base the Hub id / local directory instead "
                    "(convert an instance with model.to(dtype))."
                )
            name_or_path = base_model.config.name_or_path or None
            refuse_subnetwork_as_base(base_model.config, name_or_path)
            base_model = copy.deepcopy(base_model)  # ours to train and to switch between train/eval
        mean, std = _normalisation_of(base_model.config, name_or_path, load_kwargs)
        # Not given: the size the base model's own image processor feeds it (else its config's), never a fixed one.
        size = input_size or _processor_input_size(name_or_path, load_kwargs) or _native_size(base_model.config)
        config = PromptedSparseConfig(
            base_config=base_model.config.to_dict(),
            base_model_name_or_path=name_or_path,
            head=head,
            sparsity=sparsity,
            sparsity_type=sparsity_type,
            image_mean=image_mean or mean,
            image_std=image_std or std,
            input_size=size,
            # The model's own size (unset input_size) is its canvas too; a chosen smaller input pads onto the native.
            output_size=output_size or (size if input_size is None else max(size, _native_size(base_model.config))),
            id2label=dict(base_model.config.id2label),
            **kwargs,
        )
        config.base_config = copy.deepcopy(base_model.config)
        model = cls(config, base_model=base_model)
        if load_kwargs.get("dtype") not in (None, "auto"):
            model.to(base_model.dtype)  # prompt and scores in the base's dtype (uint8 masks stay uint8)
        return model.eval()

    # ----------------------------------------------------------------------------------------------- forward
    def masked_parameters(self, differentiable: bool = True) -> dict[str, torch.Tensor]:
        """`{base param name: W * m}` for every pruned layer (straight-through w.r.t. scores when searching).

        Frozen inference (eval mode, frozen mask, no gradient to the weights) computes them once and reuses them:
        the cache is keyed on the mask tensor and on each weight's storage, version, dtype and device, and is
        dropped by `train()`/`eval()`, so loading, `set_mask`, moving the model or editing a weight in place all
        recompute. It holds a second copy of the pruned weights; `merge_and_unload()` avoids that for deployment."""
        if self.sparsity is None:
            return {}
        params = dict(self.model.named_parameters())
        names = [layer.param_name for layer in self.sparsity.layers]
        cacheable = (
            not self.training
            and self.sparsity.frozen
            and not torch.compiler.is_compiling()  # traced: W * m goes into the graph
            # A cached product would carry a graph whose buffers the first backward frees.
            and not (torch.is_grad_enabled() and any(params[n].requires_grad for n in names))
        )
        key = None
        if cacheable:
            self.sparsity.mask()  # refreshes the mask (and its generation) if its tensor changed
            key = (self.sparsity.generation, self.sparsity._source()) + tuple(
                (params[n].data_ptr(), params[n]._version, params[n].dtype, params[n].device) for n in names
            )
            cached = self._masked_cache
            if cached is not None and cached[0] == key:
                return cached[1]
        masks = self.sparsity.layer_masks(differentiable=differentiable)
        out = {name: params[name] * mask.to(params[name].dtype) for name, mask in masks.items()}
        self._masked_cache = (key, out) if cacheable else None
        return out

    def train(self, mode: bool = True):
        self._masked_cache = None  # weights may have moved without a version bump (fused optimisers)
        return super().train(mode)

    def source_logits(self, pixel_values: torch.Tensor, use_prompt: bool | None = None) -> torch.Tensor:
        """Logits of the prompted, masked base model before any label mapping."""
        self._check_pixels(pixel_values)
        if use_prompt is None:
            use_prompt = self.config.prompt_at_inference
        x = self.prompt(pixel_values, use_prompt=use_prompt)
        x = x.to(self.model.dtype)  # a base loaded with dtype=torch.bfloat16 takes bf16 inputs
        if self.structure is not None and not self.structure.compact and self.structure.enabled:
            masks, probs = self.structure.channel_masks(self.model, self.prompt.full_prompt())
            if self.training and self.config.flops_penalty > 0:
                from .sparsity.hypernetwork import soft_flops_penalty

                self._aux_loss = self.config.flops_penalty * soft_flops_penalty(
                    self.structure.flops_model(self.model), probs, self.config.flops_ratio, lam=1.0
                )
            masker = self.structure.masker(self.model)
            masker.set_masks(masks)
            with masker:
                return self.model(x, **self._forward_kwargs).logits
        masked = self.masked_parameters()
        if masked:
            out = functional_call(self.model, masked, (x,), dict(self._forward_kwargs), strict=False)
        else:
            out = self.model(x, **self._forward_kwargs)
        return out.logits

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        use_prompt: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        logits = self.source_logits(pixel_values, use_prompt=use_prompt)
        index = self._label_index(logits.device)
        if index is not None:
            logits = logits.index_select(-1, index)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device))
            aux, self._aux_loss = getattr(self, "_aux_loss", None), None
            if aux is not None:
                loss = loss + aux
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}; "
                "convert grayscale/RGBA images to RGB (PIL: image.convert('RGB')) and use the saved image processor."
            )

    def _label_index(self, device) -> torch.Tensor | None:
        mapping = self.config.label_mapping
        if mapping is None:
            return None
        if torch.compiler.is_compiling():
            return torch.tensor(mapping, dtype=torch.long, device=device)  # a graph constant, nothing cached
        cached = getattr(self, "_label_index_cache", None)
        if cached is None or cached.device != device or cached.tolist() != list(mapping):
            cached = torch.tensor(mapping, dtype=torch.long, device=device)
            self._label_index_cache = cached
        return cached

    # ----------------------------------------------------------------------------------------------- labels
    def set_label_mapping(self, mapping: list[int], id2label: dict[int, str] | None = None) -> None:
        """Read target class i from source logit `mapping[i]` (FLM). Stored in the config."""
        mapping = [int(i) for i in mapping]
        num_source = self.model.config.num_labels
        if len(set(mapping)) != len(mapping) or min(mapping) < 0 or max(mapping) >= num_source:
            raise ValueError(f"label mapping must hold distinct source indices in [0, {num_source}).")
        if self.config.head != "pretrained":
            raise ValueError("a label mapping reads the pretrained head's logits; this model has head='new'.")
        id2label = id2label or {i: f"LABEL_{i}" for i in range(len(mapping))}
        if len(id2label) != len(mapping):
            raise ValueError(f"id2label has {len(id2label)} classes but the mapping has {len(mapping)}.")
        self.config.label_mapping = mapping
        set_labels(self.config, id2label)
        self._protect_mapped_rows()

    def _protect_mapped_rows(self) -> None:
        """Under a label mapping only the mapped rows of the pretrained head act: each keeps its own floor."""
        if self.sparsity is None or self.config.label_mapping is None:
            return
        try:
            name, _ = find_classifier(self.model)
        except ValueError:  # no recognisable head: the per-layer floors still apply
            return
        self.sparsity.protect_rows(name, self.config.label_mapping)

    # ----------------------------------------------------------------------------------------------- stages
    def start_mask_search(self) -> None:
        """Stage 1: train the scores and the prompt; the base weights are frozen (norm statistics still update).
        A structured model with channel scores (`structure_search="scores"`) trains those."""
        if self.structure is not None and self.structure.channel_scores is not None:
            return self.start_structure_search()
        if self.sparsity is None or self.sparsity.frozen:
            raise ValueError("mask search needs trainable scores (config.mask_format='scores').")
        self.requires_grad_(False)
        self.sparsity.scores.requires_grad_(True)
        self.prompt.requires_grad_(True)
        self.train()

    def start_finetuning(self, train_prompt: bool = True) -> None:
        """Stage 2: freeze the mask (stored as 1 bit per weight; for channels: the compact model) and train all
        weights and the prompt."""
        if self.structure is not None and not self.structure.compact:
            raise ValueError("compact() the structured model before fine-tuning it.")
        self.freeze_mask()
        self.requires_grad_(True)
        if self.structure is not None:
            self.structure.search_module.requires_grad_(False)
        self.prompt.requires_grad_(train_prompt)
        self.train()

    def freeze_mask(self) -> None:
        if self.sparsity is not None and not self.sparsity.frozen:
            self.sparsity.freeze()
            self.config.mask_format = "packed"

    def set_mask(self, masks: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Install a fixed mask: a flat 0/1 tensor or `{module name: 0/1 tensor shaped like its weight}`."""
        if self.sparsity is None:
            raise ValueError("this model has no unstructured sparsity (config.sparsity_type).")
        if isinstance(masks, dict):
            flat = []
            for layer in self.sparsity.layers:
                m = masks.get(layer.name, masks.get(layer.param_name))
                if m is None or tuple(m.shape) != layer.shape:
                    raise ValueError(f"mask for {layer.name!r} missing or not of shape {list(layer.shape)}.")
                flat.append(m.flatten())
            masks = torch.cat(flat)
        self.sparsity.set_mask(masks)
        self.config.mask_format = "packed"

    def start_structure_search(self) -> None:
        """PASS search: train the hypernetwork (or the channel scores) and the prompt; the backbone is frozen."""
        if self.structure is None or self.structure.compact:
            raise ValueError("structure search needs an uncompacted structured model (sparsity_type='structured').")
        self.requires_grad_(False)
        self.structure.search_module.requires_grad_(True)
        self.prompt.requires_grad_(True)
        self.train()

    @torch.no_grad()
    def channel_masks(self) -> list[torch.Tensor]:
        """The hard per-unit channel masks the hypernetwork (or the channel scores) gives now (evaluation mode, no
        noise)."""
        was_training = self.training
        self.eval()
        try:
            hard, _ = self.structure.channel_masks(self.model, self.prompt.full_prompt(), hard_only=True)
        finally:
            self.train(was_training)
        return hard

    def compact(self, masks: list[torch.Tensor] | None = None) -> dict[str, int]:
        """Physically remove pruned channels (the hypernetwork's current masks, or the given ones). The widths
        are recorded in the config, so `from_pretrained` rebuilds this compact architecture."""
        if self.structure is None:
            raise ValueError("compact() needs a structured model (sparsity_type='structured').")
        if masks is None:
            masks = self.channel_masks()
        return self.structure.compact_(self.model, masks)

    def flops_report(self) -> dict[str, Any]:
        """Dense and current FLOPs (FlopCounterMode on a real forward at the canvas size) and parameters."""
        from .sparsity.flops import count_parameters, measure_flops

        size = self.config.output_size
        current = measure_flops(self.model, size)
        dense = None
        if self.structure is not None:
            dense = self.structure.dense_flops
        return {"flops": current, "dense_flops": dense, "flops_ratio": (current / dense) if dense else None,
                "params": count_parameters(self.model)}

    def update_mask(self) -> None:
        if self.sparsity is not None:
            self.sparsity.update_mask()

    def sparsity_report(self) -> dict[str, Any]:
        """Global and per-layer fraction of pruned weights (from the actual mask)."""
        if self.sparsity is None:
            return {"global": 0.0, "layers": {}, "pruned": 0, "total": 0}
        flat = self.sparsity.mask()
        layers = {
            layer.name: 1.0 - float(flat[layer.offset : layer.offset + layer.numel].sum()) / layer.numel
            for layer in self.sparsity.layers
        }
        pruned = int(flat.numel() - flat.sum())
        return {"global": pruned / flat.numel(), "layers": layers, "pruned": pruned, "total": flat.numel()}

    # ----------------------------------------------------------------------------------------------- export
    @torch.no_grad()
    def merge_and_unload(self, keep_prompt: bool = False) -> nn.Module:
        """A plain model (a copy) with the mask baked into the weights (zeros), the channels removed (compact
        models) and the label mapping folded into the head. Its `save_pretrained` folder holds the weights, the
        config with the labels, and the image processor, and reloads with transformers alone.

        `keep_prompt=False` (default): the model cannot apply the visual prompt, so its logits equal this model's
        with `use_prompt=False`, on images normalised with `config.image_mean`/`image_std` (its saved image processor
        normalises). A dense merge (unstructured or no sparsity) is the plain transformers class; a compact one is a
        `MergedClassifier` (the base with its per-layer widths).

        `keep_prompt=True`: a `MergedClassifier` for deployment, i.e. the same plain model behind a fixed input
        transform (the trained prompt and the normalisation, frozen). It takes what this model takes (images in
        [0, 1] at `input_size`, from `image_processor()`) and returns the same logits as this model with the prompt,
        with no masking at run time; `torch.export.export`, `torch.compile` and ONNX export trace it.

        A `MergedClassifier` folder carries its modeling code (`auto_map`): `from_pretrained(folder,
        trust_remote_code=True)` anywhere, or without the flag after `import prompt_sparsity`."""
        from .portable import build_merged, refresh_timm_config, with_image_processor

        if self.sparsity is not None and not self.sparsity.frozen:
            logger.warning("merge_and_unload(): the mask is still searched (float scores); merging bakes in the "
                           "current mask. Call freeze_mask() first to make that explicit.")
        if self.structure is not None and not self.structure.compact:
            raise ValueError("merge_and_unload(): this structured model is not compacted yet (its channels are still "
                             "searched); call model.compact() first, then merge.")
        prompted = self.config.prompt_method != "none" and self.config.prompt_at_inference
        if prompted and not keep_prompt:
            logger.warning(
                "merge_and_unload(): the plain model cannot apply the visual prompt; it matches this model called "
                "with use_prompt=False (on normalised images). Use merge_and_unload(keep_prompt=True) to keep it."
            )
        plain = copy.deepcopy(self.model)
        if self.sparsity is not None:
            masks = self.sparsity.layer_masks()
            for name, param in plain.named_parameters():
                if name in masks:
                    param.mul_(masks[name].to(param.dtype))
        if self.config.label_mapping is not None:
            fold_label_mapping(plain, self.config.label_mapping, self.config.id2label)
        plain.config.name_or_path = ""
        config = self.config
        refresh_timm_config(plain.config, config.input_size, config.image_mean, config.image_std)
        compact = self.structure is not None and self.structure.compact
        if not keep_prompt and not compact:
            return with_image_processor(plain, self.image_processor(normalize=True))
        merged = build_merged(
            plain, prompt=self.prompt.full_prompt().detach() if keep_prompt and prompted else None,
            normalize=keep_prompt, input_size=config.input_size, output_size=config.output_size,
            image_mean=config.image_mean, image_std=config.image_std, forward_kwargs=self._forward_kwargs)
        if keep_prompt:
            merged.requires_grad_(False).eval()
        return merged

    def image_processor(self, normalize: bool = False):
        """The image processor that feeds this model: resize to input_size, rescale to [0, 1]; normalisation
        happens inside the model after the prompt (set `normalize=True` for the merged plain model)."""
        from transformers import ViTImageProcessor

        size = self.config.input_size
        return ViTImageProcessor(
            do_resize=True,
            size={"height": size, "width": size},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=normalize,
            image_mean=list(self.config.image_mean),
            image_std=list(self.config.image_std),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a tensor of the checkpoint that does not fit the model (a mask,
        score or prompt of the wrong size) is always refused with a clear error instead of re-initialised."""
        from .integrity import load_checked, refuse_plain_model_as_subnetwork, saved_config, saved_num_labels

        want_info = kwargs.pop("output_loading_info", False)
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        revision = kwargs.get("revision")
        stored = saved_config(pretrained_model_name_or_path, revision)
        refuse_plain_model_as_subnetwork(stored, pretrained_model_name_or_path)
        asked = kwargs.get("num_labels", len(kwargs.get("id2label") or {}) or None)
        saved = saved_num_labels(stored) if asked is not None else None
        if saved is not None and asked != saved:
            # The head (or label mapping) of a subnetwork is part of what was saved: a new count cannot reuse it.
            raise ValueError(
                f"{pretrained_model_name_or_path} was saved with {saved} labels; num_labels/id2label asks for {asked}. "
                "Fix: load it without num_labels/id2label; to use the subnetwork on a dataset with another number "
                "of classes, transfer it: `recipes/transfer.py --subnetwork ... --dataset_name ...` (it applies the "
                "mask to the pretrained base and maps the new labels)."
            )
        model, info = load_checked(lambda: super(PromptedSparseModel, cls).from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        ), pretrained_model_name_or_path, revision)
        mismatched = [m for m in info["mismatched_keys"] if not ignore or not str(m[0]).startswith("model.")]
        if mismatched:
            detail = "; ".join(f"{m[0]}: checkpoint {list(m[1])} vs model {list(m[2])}" for m in mismatched[:3])
            raise ValueError(
                f"{pretrained_model_name_or_path}: checkpoint tensors do not fit the model built from its config "
                f"({detail}). The checkpoint and its config.json disagree (a damaged or hand-edited checkpoint?); "
                "re-save the subnetwork with save_pretrained, or load the matching config."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, push_to_hub: bool = False,
                        **kwargs):
        """`PreTrainedModel.save_pretrained` plus the image-processor config (so that
        `pipeline("image-classification", model=save_directory)` works) and a generated model card `README.md`
        (`prompt_sparsity.hub.write_model_card`; a hand-written README.md there is kept).

        `push_to_hub=True` then pushes the folder with `prompt_sparsity.hub.push_subnetwork` to `repo_id` (default:
        the folder's name); the standard push keywords (`commit_message`, `commit_description`, `private`, `token`,
        `revision`, `create_pr`, `tags`) go to the push."""
        from .hub import push_subnetwork, write_model_card
        from .portable import SUBNETWORK_AUTO_MAP, write_subnetwork_loader

        push_kwargs = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
        if "token" in push_kwargs:
            kwargs["token"] = push_kwargs["token"]
        if self.sparsity is not None and self.sparsity.frozen and kwargs.get("state_dict") is None:
            # Pruned weights never act (forward uses W * m): store them as zeros so the file compresses like
            # the sparse model it is. Loading gives W * m, hence exactly the same outputs.
            state = self.state_dict()
            for name, mask in self.sparsity.layer_masks().items():
                key = f"model.{name}"
                state[key] = state[key] * mask.to(state[key].dtype)
            kwargs["state_dict"] = state
        # Without prompt_sparsity, transformers would not know model_type 'prompted_sparse' ("upgrade transformers"):
        # the auto_map names a stub that imports the library, or says what to install (portable.py).
        self.config.auto_map = dict(SUBNETWORK_AUTO_MAP)
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return None
        self.image_processor().save_pretrained(save_directory)
        write_subnetwork_loader(save_directory)
        write_model_card(save_directory)
        if push_to_hub:
            return push_subnetwork(save_directory, repo_id, **push_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, results: dict[str, Any] | None = None, **kwargs):
        """Push this model to `repo_id` with a generated model card, in one commit; returns the commit (a
        `CommitInfo`: the commit URL as a string, `.oid`, and `.pr_url` with `create_pr=True`).

        Takes the keywords of `PreTrainedModel.push_to_hub` (`commit_message`, `commit_description`, `private`,
        `token`, `revision`, `create_pr`, `max_shard_size`, `tags`) plus `results` (a run's results dict, written as
        `results.json` and shown in the card) and `overwrite_card`. See `prompt_sparsity.hub.push_model`."""
        from .hub import push_model

        return push_model(self, repo_id, results=results, **kwargs)


#: The deployment model `merge_and_unload(keep_prompt=True)` returns (earlier name of `MergedClassifier`).
PromptedClassifier = MergedClassifier


def _native_size(config) -> int:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return size
    pretrained_cfg = getattr(config, "pretrained_cfg", None) or {}
    if "input_size" in pretrained_cfg:
        return int(pretrained_cfg["input_size"][-1])
    return 224


#: Keywords of `from_base` that are loading options for the base model's `from_pretrained`, not config settings
#: (a token in config.json would be published by a push).
LOADING_KWARGS = (
    "token", "cache_dir", "dtype", "torch_dtype", "revision", "local_files_only", "force_download",
    "trust_remote_code", "proxies", "subfolder", "device_map", "attn_implementation", "use_safetensors",
    "variant",
)
# Keywords of save_pretrained(push_to_hub=True) that belong to the push.
_PUSH_KWARGS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags",
                "overwrite_card")
# The subset that also applies to AutoImageProcessor.from_pretrained.
_PROCESSOR_KWARGS = ("token", "cache_dir", "revision", "local_files_only", "force_download", "trust_remote_code",
                     "proxies", "subfolder")


def _normalisation_of(
    config, name_or_path: str | None, load_kwargs: dict | None = None
) -> tuple[list[float], list[float]]:
    """The mean/std the base model was trained with: its image processor (a local folder or a Hub repo, read with
    `AutoImageProcessor`) if it has one, else timm's pretrained_cfg, else ImageNet's."""
    if name_or_path:
        from .pretrained import resolve_pretrained

        path = resolve_pretrained(name_or_path)
        kwargs = {k: v for k, v in (load_kwargs or {}).items() if k in _PROCESSOR_KWARGS}
        mean_std = _processor_mean_std(path, kwargs)
        if mean_std is not None:
            return mean_std
    pretrained_cfg = getattr(config, "pretrained_cfg", None) or {}
    if pretrained_cfg.get("mean") and pretrained_cfg.get("std"):
        return list(pretrained_cfg["mean"]), list(pretrained_cfg["std"])
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _processor_mean_std(path: str, kwargs: dict) -> tuple[list[float], list[float]] | None:
    """image_mean/image_std of the image processor saved with a base model, or None when it has none."""
    processor = _base_processor(path, kwargs)
    if processor is None:
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if not mean or not std:
        return None
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    return mean, std


def _processor_input_size(name_or_path: str | None, load_kwargs: dict | None = None) -> int | None:
    """The side of the images the base model's image processor produces (its crop when it crops, else its resize;
    timm: `data_config["input_size"]`), or None when the base has no processor or it does not say."""
    if not name_or_path:
        return None
    from .pretrained import resolve_pretrained

    kwargs = {k: v for k, v in (load_kwargs or {}).items() if k in _PROCESSOR_KWARGS}
    processor = _base_processor(resolve_pretrained(name_or_path), kwargs)
    if processor is None:
        return None
    data_config = getattr(processor, "data_config", None) or {}
    if data_config.get("input_size"):
        return int(data_config["input_size"][-1])
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    for size in (crop, getattr(processor, "size", None)):
        get = (lambda key: size.get(key)) if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        for key in ("height", "shortest_edge"):
            if isinstance(get(key), int) and get(key) > 0:
                return get(key)
        if isinstance(size, int) and size > 0:
            return size
    return None


def _base_processor(path: str, kwargs: dict):
    """The image processor saved with a base model (local folder or Hub repo), or None when it has none."""
    from transformers import AutoImageProcessor
    from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

    # A base without a preprocessor config is normal (a bare checkpoint): look for the file first, quietly, so
    # that only a real processor is loaded (AutoImageProcessor would otherwise raise or guess).
    probe = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    try:
        found = cached_file(path, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, **probe)
    except OSError:
        found = None
    if found is None:
        return None
    return AutoImageProcessor.from_pretrained(path, **kwargs)


AutoConfig.register("prompted_sparse", PromptedSparseConfig)
AutoModelForImageClassification.register(PromptedSparseConfig, PromptedSparseModel)
# Merged models carry their code (auto_map) for loading without this library; with it, no trust_remote_code needed.
AutoConfig.register(MERGED_MODEL_TYPE, MergedClassifierConfig)
AutoModelForImageClassification.register(MergedClassifierConfig, MergedClassifier)
