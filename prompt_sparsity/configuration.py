"""`PromptedSparseConfig`: everything that defines a prompted sparse subnetwork, except tensors."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

PROMPT_METHODS = ("pad", "fix", "random", "expand", "none")
SPARSITY_TYPES = ("unstructured", "structured", "none")
THRESHOLDS = ("global", "layerwise")
MASK_FORMATS = ("scores", "packed")
STRUCTURE_SEARCHES = ("hypernetwork", "scores")
HEADS = ("pretrained", "new")
CHANNEL_DISCOVERY = ("auto", "rules", "depgraph")


class PromptedSparseConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PromptedSparseModel`]: a wrapped image classifier (its config nested as `base_config`),
    a visual prompt, and a sparsity pattern.

    Prompt settings:
        prompt_method (`str`, defaults to `"pad"`): one of `pad`, `fix`, `random`, `expand`, `none`.
        input_size (`int`): images are resized to `input_size` by the image processor.
        output_size (`int`): the canvas the prompt is drawn on (`>= input_size`; images are zero-padded, centred).
        pad_size (`int`): width of the `pad` frame. mask_size (`int`): side of the `fix`/`random` square.
        image_mean, image_std: normalisation applied *after* the prompt, inside the model.
        prompt_at_inference (`bool`): whether `forward` applies the prompt when not told otherwise.
    Sparsity settings:
        sparsity_type: `unstructured` (per-weight masks), `structured` (channels) or `none`.
        sparsity (`float` in [0, 1)): the fraction of prunable weights set to zero.
        threshold: `global` (one threshold over all pruned layers) or `layerwise` (same sparsity per layer).
        target_modules / exclude_modules: regular expressions matched (`re.search`) against module names of the base
            model; by default every `Conv2d` and `Linear` weight is pruned, the classifier included.
        mask_format: `scores` (trainable float scores, during a search) or `packed` (a frozen 1-bit mask).
        min_layer_density (`float`, defaults to 0.01): every pruned layer, and every row of a pretrained head that
            the label mapping reads, keeps at least this fraction of its weights (its largest scores), so no layer
            collapses; the global count stays exact. 0 allows collapse (a warning names layers above 99%).
        nm_pattern (`str`, optional): `"N:M"` (e.g. `"2:4"`) for a semi-structured mask: in every group of M
            consecutive weights along the input dimension (channels-last for convs) exactly N are kept
            (`prompt_sparsity.sparsity.semi_structured`). It fixes the sparsity at 1 - N/M on every eligible layer
            (`sparsity` defaults to it; another value is refused); layers whose inputs per tap are not a multiple of M
            (depthwise convs, a 3-channel stem) are left dense. `threshold` does not apply (the selection is per
            group) and `min_layer_density` must be <= N/M (every row keeps N/M of its weights, so none collapses).
            Unstructured sparsity only.
        pruned_layers: `[[module name, weight shape], ...]` (in flat-layout order) recorded at wrap time so that a checkpoint is only ever
            loaded onto a base model with the same shapes.
    Structured (channel) settings, PASS:
        flops_ratio: the FLOPs budget as a fraction of the dense model's, in (0, 1].
        channel_selection: `global` (one threshold across units) or `uniform` (same keep ratio per unit).
        min_channels: channels every unit keeps at least. hypernet_*: the PASS hypernetwork's sizes/temperature.
        channel_discovery: how channel units are found: `rules` (hand-written per-block rules), `depgraph`
            (Torch-Pruning's dependency graph, for models without a rule) or `auto` (rules, else depgraph; resolved
            and recorded at wrap time).
        structure_search: what searches the channel masks: `hypernetwork` (PASS) or `scores` (one trainable score per
            channel, VPNs with channel scores; `prompt_sparsity.sparsity.channel_scores`).
        channel_units: `[[unit name, channels], ...]` of the dense base, recorded at wrap time.
        channel_widths: `{unit name: kept channels}` once the model is compacted; `from_pretrained` rebuilds
            this compact architecture from the base config before loading weights.
        dense_flops: FLOPs of the dense base at `output_size` (FlopCounterMode), recorded at compaction.
    Labels:
        head: `pretrained` (keep the source head; map classes with `label_mapping`) or `new` (a fresh head).
        label_mapping: for each target class, the index of the source logit it reads (FLM).
    """

    model_type = "prompted_sparse"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    base_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None

    prompt_method: str = "pad"
    input_size: int = 224
    output_size: int = 224
    pad_size: int = 16
    mask_size: int = 156
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    num_channels: int = 3
    prompt_at_inference: bool = True

    sparsity_type: str = "unstructured"
    sparsity: float = 0.0
    threshold: str = "global"
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    mask_format: str = "scores"
    pruned_layers: list | None = None
    min_layer_density: float = 0.01
    nm_pattern: str | None = None

    flops_ratio: float = 0.5
    channel_selection: str = "global"
    min_channels: int = 1
    hypernet_hidden_size: int = 128
    hypernet_stat_dim: int = 64
    hypernet_temperature: float = 0.4
    flops_penalty: float = 0.0
    channel_discovery: str = "auto"
    structure_search: str = "hypernetwork"
    channel_units: list | None = None
    channel_widths: dict | None = None
    dense_flops: float | None = None

    head: str = "pretrained"
    label_mapping: list[int] | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.base_config, dict) and "model_type" in self.base_config:
            # Through the config class's own from_dict: some (TimmWrapperConfig) rebuild labels there.
            base = dict(self.base_config)
            self.base_config = CONFIG_MAPPING[base.pop("model_type")].from_dict(base)
        super().__post_init__(**kwargs)
        if self.image_mean is None:
            self.image_mean = list(IMAGENET_MEAN)
        if self.image_std is None:
            self.image_std = list(IMAGENET_STD)
        if self.nm_pattern is not None and not self.sparsity and isinstance(self.nm_pattern, str):
            from .sparsity.semi_structured import nm_sparsity

            try:
                self.sparsity = nm_sparsity(self.nm_pattern)  # the pattern fixes the sparsity of its layers
            except ValueError:
                pass  # validate_settings names the problem
        self.validate_settings()

    def validate_settings(self):
        """Raise a ValueError naming the first invalid setting and how to fix it."""

        def bad(msg):
            raise ValueError(f"PromptedSparseConfig: {msg}")

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                bad(f"{name}={getattr(self, name)!r} is not supported; use one of {', '.join(allowed)}.")

        choice("prompt_method", PROMPT_METHODS)
        choice("sparsity_type", SPARSITY_TYPES)
        choice("threshold", THRESHOLDS)
        choice("mask_format", MASK_FORMATS)
        choice("head", HEADS)
        for name in ("input_size", "output_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}.")
        if self.input_size > self.output_size:
            bad(
                f"input_size={self.input_size} is larger than output_size={self.output_size}; the image is padded "
                "onto the prompt canvas, so use input_size <= output_size."
            )
        if self.prompt_method == "expand" and self.input_size >= self.output_size:
            bad("prompt_method='expand' draws the prompt around the image: it needs input_size < output_size.")
        if self.prompt_method == "pad" and not (0 < self.pad_size < self.output_size / 2):
            bad(f"pad_size={self.pad_size} must be in (0, output_size/2 = {self.output_size / 2}).")
        if self.prompt_method in ("fix", "random") and not (0 < self.mask_size <= self.output_size):
            bad(f"mask_size={self.mask_size} must be in (0, output_size={self.output_size}].")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != self.num_channels:
                bad(f"{name} has {len(value)} values but num_channels={self.num_channels}; give one per channel.")
        if any(s <= 0 for s in self.image_std):
            bad(f"image_std={self.image_std} must be positive.")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            bad(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not 0.0 <= float(self.sparsity) < 1.0:
            bad(
                f"sparsity={self.sparsity} is outside [0, 1): it is the fraction of weights removed, e.g. 0.9 keeps "
                "10% of the weights."
            )
        if isinstance(self.min_layer_density, bool) or not isinstance(self.min_layer_density, (int, float)) or not (
            0.0 <= float(self.min_layer_density) <= 1.0
        ):
            bad(f"min_layer_density={self.min_layer_density!r} must be in [0, 1] (0 allows a layer to lose every "
                "weight).")
        if self.nm_pattern is not None:
            from .sparsity.semi_structured import parse_nm

            try:
                n, m = parse_nm(self.nm_pattern)
            except ValueError as err:
                bad(str(err))
            if self.sparsity_type != "unstructured":
                bad(f"nm_pattern={self.nm_pattern!r} is a per-weight (unstructured) mask pattern, but "
                    f"sparsity_type={self.sparsity_type!r}; use sparsity_type='unstructured' or drop nm_pattern.")
            if abs(float(self.sparsity) - (1.0 - n / m)) > 1e-9:
                bad(f"sparsity={self.sparsity} conflicts with nm_pattern={self.nm_pattern!r}, which fixes the "
                    f"sparsity of its layers at 1 - {n}/{m} = {1.0 - n / m:g}; leave sparsity unset (0) or set it to "
                    f"{1.0 - n / m:g}.")
            if float(self.min_layer_density) > n / m:
                bad(f"min_layer_density={self.min_layer_density} is above the {n}/{m} = {n / m:g} of its weights "
                    f"that nm_pattern={self.nm_pattern!r} keeps in every layer; lower it to at most {n / m:g}.")
        choice("channel_selection", ("global", "uniform"))
        choice("channel_discovery", CHANNEL_DISCOVERY)
        choice("structure_search", STRUCTURE_SEARCHES)
        if self.structure_search == "scores" and self.flops_penalty:
            bad(f"flops_penalty={self.flops_penalty!r} acts on the PASS hypernetwork's keep probabilities; with "
                "structure_search='scores' every hard mask meets the FLOPs budget by construction: use flops_penalty=0.")
        if isinstance(self.flops_ratio, bool) or not isinstance(self.flops_ratio, (int, float)) or not (
            0.0 < float(self.flops_ratio) <= 1.0
        ):
            bad(
                f"flops_ratio={self.flops_ratio!r} is outside (0, 1]: it is the fraction of the dense model's FLOPs "
                "to keep, e.g. 0.5 halves the FLOPs."
            )
        if self.label_mapping is not None:
            if len(set(self.label_mapping)) != len(self.label_mapping) or min(self.label_mapping, default=0) < 0:
                bad("label_mapping must list distinct, non-negative source-class indices (one per target class).")


__all__ = ["PromptedSparseConfig", "IMAGENET_MEAN", "IMAGENET_STD"]
