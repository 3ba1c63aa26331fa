"""Settings of a pruning run, as dataclasses (recipes parse them with `HfArgumentParser`; the library does not
parse command lines). Defaults are the embedded default run: the offline ImageNet-pretrained EfficientNet-Lite0
pruned to 90% on a Fashion-MNIST subset, small enough for ~10 minutes on 2 CPU cores."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="efficientnet-lite0",
        metadata={"help": "A Hub id, a local directory, or a built-in offline model ('efficientnet-lite0')."},
    )
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    head: str = field(
        default="pretrained",
        metadata={"help": "'pretrained': keep the source head and map labels with FLM (paper); 'new': fresh head."},
    )
    prompt_method: str | None = field(
        default=None, metadata={"help": "pad|fix|random|expand|none (default: the method's own, pad for VPNs)."}
    )
    input_size: int = field(default=48, metadata={"help": "Images are resized to this size (paper: 224)."})
    output_size: int | None = field(default=None, metadata={"help": "Prompt canvas size (default: input_size)."})
    pad_size: int = field(default=4, metadata={"help": "Width of the 'pad' prompt frame (paper: 16 at 224)."})
    mask_size: int = field(default=40, metadata={"help": "Side of the 'fix'/'random' prompt square."})
    prompt_at_inference: bool = field(
        default=True, metadata={"help": "Whether the saved model applies the prompt at inference."}
    )

    def __post_init__(self):  # value checks at argument time, naming the flag
        for name in ("input_size", "output_size"):
            _require(self, name, lambda v: v is None or v > 0, "a positive integer")


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "A built-in offline set (fashion_mnist, mnist, digits), an image folder, or a cached Hub id."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected if not given)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected if not given)."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Held out of train for validation."})
    max_train_samples: int | None = field(default=2000, metadata={"help": "Class-balanced training subset."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Subset of validation and of test."})
    per_device_train_batch_size: int = field(default=64)
    per_device_eval_batch_size: int = field(default=128)
    dataloader_num_workers: int = field(default=1)

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_train_samples",
                     "max_eval_samples"):
            _require(self, name, lambda v: v is None or v > 0, "a positive integer")
        _require(self, "dataloader_num_workers", lambda v: v >= 0, "0 (load in the main process) or more")
        _require(self, "validation_fraction", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.1")


@dataclass
class PruningArguments:
    method: str = field(
        default="vpns",
        metadata={"help": "vpns, hydra, omp, random, snip, grasp, synflow, or dense (no pruning, a reference)."},
    )
    sparsity: float = field(default=0.9, metadata={"help": "Fraction of prunable weights set to zero."})
    threshold: str | None = field(default=None, metadata={"help": "global|layerwise (default: the method's)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Regexes of module names to prune (default: every Conv2d and Linear)."}
    )
    exclude_modules: list[str] | None = field(default=None, metadata={"help": "Regexes of module names to keep."})
    steps: str | None = field(
        default=None,
        metadata={
            "help": "Optimiser steps per iteration: 'two' (a prompted un-augmented batch, then an unprompted "
            "augmented batch; VPNs), 'prompted' (the first only) or 'augmented' (the second only)."
        },
    )
    search_epochs: int = field(default=2, metadata={"help": "Mask-finding epochs (paper: 30)."})
    finetune_epochs: int = field(default=2, metadata={"help": "Subnetwork-tuning epochs (paper: 30)."})
    dense_epochs: int = field(default=2, metadata={"help": "Dense fine-tuning epochs before OMP pruning."})
    score_lr: float = field(default=1e-4)
    score_weight_decay: float = field(default=1e-4)
    search_prompt_lr: float = field(default=1e-4)
    search_prompt_schedule: str = field(
        default="multistep", metadata={"help": "multistep (x0.1 at 50% and 72%; paper) or cosine (public code)."}
    )
    finetune_lr: float = field(default=0.01)
    finetune_prompt_lr: float = field(default=0.01)
    finetune_weight_decay: float = field(default=1e-4)
    momentum: float = field(default=0.9)
    warmup_ratio: float = field(default=0.0)
    pruner_batches: int = field(default=4, metadata={"help": "Batches SNIP/GraSP/Taylor average over."})
    flops_ratio: float = field(default=0.5, metadata={"help": "Structured methods: FLOPs budget vs the dense model."})
    channel_selection: str = field(default="global", metadata={"help": "global (PASS) or uniform per unit."})
    min_channels: int = field(default=1, metadata={"help": "Channels every unit keeps at least."})
    hypernet_lr: float = field(default=1e-3, metadata={"help": "PASS hypernetwork + prompt encoder (Adam)."})
    structure_prompt_lr: float = field(default=1e-3, metadata={"help": "PASS prompt during the search (Adam)."})
    hypernet_hidden_size: int = field(default=128)
    flops_penalty: float = field(default=0.0, metadata={"help": "Soft-FLOPs penalty weight (PASS.md: 2; 0 = off)."})
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    synflow_iterations: int = field(default=100)

    def __post_init__(self):
        for f in fields(self):  # every *_epochs and *_lr field, including ones added later
            if f.name.endswith("_epochs"):
                _require(self, f.name, lambda v: v >= 0, "0 (skip the stage) or more")
            elif f.name.endswith("_lr"):
                _require(self, f.name, lambda v: v > 0, "a positive learning rate, e.g. 1e-3")
        _require(self, "sparsity", lambda v: 0 <= v < 1, "in [0, 1): the fraction of weights removed, e.g. 0.9")
        _require(self, "flops_ratio", lambda v: 0 < v <= 1, "in (0, 1]: the fraction of FLOPs kept, e.g. 0.5")
        _require(self, "warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("pruner_batches", "synflow_iterations", "min_channels", "hypernet_hidden_size"):
            _require(self, name, lambda v: v > 0, "a positive integer")
        for name in ("target_modules", "exclude_modules"):
            for pattern in getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"--{name}: {pattern!r} is not a valid regular expression ({err}). Fix: "
                                     "escape special characters (e.g. '\\.' for a dot) or correct the pattern.") from None


@dataclass
class RunArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Default: outputs/<run name>."})
    seed: int = field(default=7)
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest one in output_dir."}
    )
    checkpointing: bool = field(default=True, metadata={"help": "Save the training state after each epoch."})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "Cut epochs short (smoke tests)."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: none, all, tensorboard, wandb."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when an accelerator is present."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads per process (default: the cores available / processes; `accelerate launch` "
                          "alone would leave 1)."},
    )
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None, metadata={"help": "Default: a name derived from the run."})
    hub_private: bool = field(default=False)

    def __post_init__(self):
        _require(self, "max_steps_per_epoch", lambda v: v is None or v > 0, "a positive integer")
        _require(self, "torch_threads", lambda v: v is None or v > 0, "a positive integer")


def _require(args, name: str, ok, what: str) -> None:
    value = getattr(args, name)
    try:
        good = not isinstance(value, bool) and ok(value)
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"--{name}={value!r} is invalid: it must be {what}.")
