"""Settings of a pruning run, as dataclasses (recipes parse them with `HfArgumentParser`; the library does not
parse command lines). Defaults are the embedded default run: the offline ImageNet-pretrained EfficientNet-Lite0
pruned to 90% on a Fashion-MNIST subset, small enough for ~10 minutes on 2 CPU cores."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Literal

from .methods import METHODS, SCORE_INITS, get_method

# Closed option sets as Literal types: HfArgumentParser turns them into argparse `choices` (checked, listed in
# --help). Method names are the registry's at import time (register a new method before importing this module);
# PruningArguments built in code is checked against the registry as it is then.
MethodName = Literal[tuple(METHODS)]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="efficientnet-lite0",
        metadata={"help": "A Hub id, a local directory, or a built-in offline model ('efficientnet-lite0')."},
    )
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    head: Literal["pretrained", "new"] = field(
        default="pretrained",
        metadata={"help": "'pretrained': keep the source head and map labels with FLM (paper); 'new': fresh head."},
    )
    prompt_method: Literal["pad", "fix", "random", "expand", "none"] | None = field(
        default=None, metadata={"help": "The visual prompt (default: the method's own, pad for VPNs)."}
    )
    input_size: int | None = field(
        default=None, metadata={"help": "Images are resized to this size (default: the size the model's image "
                                        "processor gives, else its config's; the embedded demo: 48)."}
    )
    output_size: int | None = field(default=None, metadata={"help": "Prompt canvas size (default: input_size)."})
    pad_size: int = field(default=4, metadata={"help": "Width of the 'pad' prompt frame (paper: 16 at 224)."})
    mask_size: int = field(default=40, metadata={"help": "Side of the 'fix'/'random' prompt square."})
    prompt_at_inference: bool = field(
        default=True, metadata={"help": "Whether the saved model applies the prompt at inference."}
    )
    # The transformers example scripts' loading options (the Hub token is not a setting: the recipes take --token
    # into HF_TOKEN, so that it is never written to results.json or a checkpoint).
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models and data sets are stored (default: the HF cache)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a Hub model to run its own modelling code (read it first)."}
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
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Class-balanced training subset (default: all; the embedded demo: 2000)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Subset of validation and of test (default: all; the embedded demo: 1000)."}
    )
    per_device_train_batch_size: int = field(default=64)
    per_device_eval_batch_size: int = field(default=128)
    dataloader_num_workers: int = field(default=1)
    train_dir: str | None = field(
        default=None, metadata={"help": "An image folder (one subfolder per class) to train on, as in the "
                                        "transformers example scripts; instead of --dataset_name."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "An image folder to validate on (needs --train_dir; default: held out of it)."}
    )

    def __post_init__(self):
        if self.validation_dir and not self.train_dir:
            raise ValueError("--validation_dir needs --train_dir (the folder to train on).")
        if self.train_dir:  # the folders are the data set: the run is named after the training folder
            self.dataset_name = self.train_dir
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_train_samples",
                     "max_eval_samples"):
            _require(self, name, lambda v: v is None or v > 0, "a positive integer")
        _require(self, "dataloader_num_workers", lambda v: v >= 0, "0 (load in the main process) or more")
        _require(self, "validation_fraction", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.1")


@dataclass
class PruningArguments:
    method: MethodName = field(
        default="vpns",
        metadata={"help": "A registered pruning method (dense: no pruning, a reference; structured ones run in "
                          "recipes/pass.py)."},
    )
    sparsity: float = field(default=0.9, metadata={"help": "Fraction of prunable weights set to zero."})
    threshold: Literal["global", "layerwise"] | None = field(
        default=None, metadata={"help": "One global threshold or the same sparsity per layer (default: the method's)."}
    )
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Regexes of module names to prune (default: every Conv2d and Linear)."}
    )
    exclude_modules: list[str] | None = field(default=None, metadata={"help": "Regexes of module names to keep."})
    min_layer_density: float = field(
        default=0.01,
        metadata={"help": "Every pruned layer (and every label-mapped row of a pretrained head) keeps at least this "
                          "fraction of its weights, so no layer collapses; 0 allows collapse (layers above 99 "
                          "percent sparsity are then named in a warning)."},
    )
    nm_pattern: str | None = field(
        default=None,
        metadata={"help": "'N:M' (e.g. 2:4) semi-structured masks: exactly N kept of every M consecutive weights "
                          "along the input dimension (channels-last for convs), for every unstructured method; it "
                          "fixes --sparsity at 1 - N/M (the default --sparsity is replaced, another one refused); "
                          "layers whose inputs per tap are not a multiple of M stay dense."},
    )
    steps: Literal["two", "prompted", "augmented"] | None = field(
        default=None,
        metadata={
            "help": "Optimiser steps per iteration: 'two' (a prompted un-augmented batch, then an unprompted "
            "augmented batch; VPNs), 'prompted' (the first only) or 'augmented' (the second only)."
        },
    )
    finetune_steps: Literal["two", "prompted", "augmented"] | None = field(
        default=None,
        metadata={"help": "The tuning recipe: optimiser steps per iteration of the method's tuning stage (its last "
                          "training stage), as --steps; default: the method's own (its paper's). 'two' with a prompt "
                          "(--prompt_method pad) is the benchmark's shared recipe: 'X w. two-step + prompt'."},
    )
    score_init: Literal[SCORE_INITS] | None = field(
        default=None,
        metadata={"help": "Initial mask scores of a score search (VPNs, HYDRA, BiP): 'scaled' (HYDRA's "
                          "sqrt(6/fan_in) * W / max|W|, the papers'), or a one-shot criterion, globally rescaled so "
                          "that the first mask is exactly that criterion's mask and the threshold sits where "
                          "'scaled' puts it. Default: the method's (VPNs: snip, measured best; HYDRA, BiP: scaled)."},
    )
    flm_network: Literal["auto", "dense", "masked"] = field(
        default="auto",
        metadata={"help": "Which network frequency label mapping (FLM) counts predictions of: 'masked' (the "
                          "paper), 'dense' (the pretrained network, every weight kept), or 'auto' (masked, unless "
                          "its predictions have collapsed to fewer classes than the targets). Needs --head "
                          "pretrained."},
    )
    search_epochs: int = field(default=2, metadata={"help": "Mask-finding epochs (paper: 30)."})
    finetune_epochs: int = field(default=2, metadata={"help": "Subnetwork-tuning epochs (paper: 30)."})
    dense_epochs: int = field(default=2, metadata={"help": "Dense fine-tuning epochs before OMP pruning."})
    score_lr: str = field(
        default="auto",
        metadata={"help": "Mask-score lr: a number, or 'auto' = clip(1e-4 * 11760 / search steps, 1e-4, 3e-2): the "
                          "paper's 1e-4 at its ~11.7k steps, scaled to this run's (prompt_sparsity.optim)."},
    )
    score_weight_decay: float = field(default=1e-4)
    score_optimizer: Literal["adam", "sgd"] = field(default="adam",
                                                    metadata={"help": "adam (paper) or sgd (with --momentum)."})
    score_schedule: Literal["cosine", "multistep"] = field(default="cosine",
                                                           metadata={"help": "cosine (paper) or multistep."})
    search_prompt_lr: str = field(default="auto", metadata={"help": "Search-stage prompt lr: a number or 'auto' "
                                                                    "(the same rule as score_lr)."})
    search_prompt_optimizer: Literal["adam", "sgd"] = field(default="adam", metadata={"help": "adam (paper) or sgd."})
    search_prompt_schedule: Literal["multistep", "cosine"] = field(
        default="multistep",
        metadata={"help": "multistep (x0.1 at 50 and 72 percent of the steps; paper) or cosine (public code)."},
    )
    lr_scale: float = field(
        default=1.0,
        metadata={"help": "Multiplies every learning rate of the run, 'auto' ones after they are resolved (one knob "
                          "for a learning-rate grid, as the benchmarks run it)."},
    )
    finetune_lr: float = field(default=0.01)
    finetune_optimizer: Literal["sgd", "adam"] = field(default="sgd",
                                                       metadata={"help": "sgd (paper, with --momentum) or adam."})
    finetune_schedule: Literal["cosine", "multistep"] = field(default="cosine",
                                                              metadata={"help": "cosine (paper) or multistep."})
    finetune_prompt_lr: float = field(default=0.01)
    finetune_prompt_optimizer: Literal["sgd", "adam"] = field(default="sgd", metadata={"help": "sgd (paper) or adam."})
    finetune_prompt_schedule: Literal["cosine", "multistep"] = field(default="cosine",
                                                                     metadata={"help": "cosine (paper) or multistep."})
    finetune_weight_decay: float = field(default=1e-4)
    momentum: float = field(default=0.9)
    warmup_ratio: float = field(default=0.0)
    pruner_batches: int = field(default=4, metadata={"help": "Batches SNIP/GraSP/Taylor average over."})
    flops_ratio: float = field(default=0.5, metadata={"help": "Structured methods: FLOPs budget vs the dense model."})
    channel_selection: Literal["global", "uniform"] = field(
        default="global", metadata={"help": "global (PASS) or uniform per unit."}
    )
    min_channels: int = field(default=1, metadata={"help": "Channels every unit keeps at least."})
    channel_discovery: Literal["auto", "rules", "depgraph"] = field(
        default="auto", metadata={"help": "Channel units: hand-written rules, Torch-Pruning's dependency graph, or "
                                          "auto (rules, else the dependency graph)."}
    )
    hypernet_lr: str = field(
        default="auto",
        metadata={"help": "PASS hypernetwork + prompt encoder (Adam): a number, or 'auto' = clip(1e-3 * 5880 / "
                          "search steps, 1e-3, 1e-2) (PASS.md's 1e-3 over ~30 epochs, scaled to this run's steps)."},
    )
    structure_prompt_lr: str = field(default="auto", metadata={"help": "PASS prompt during the search (Adam): a "
                                                                       "number or 'auto' (the hypernet_lr rule)."})
    hypernet_hidden_size: int = field(default=128)
    flops_penalty: float = field(default=0.0, metadata={"help": "Soft-FLOPs penalty weight (PASS.md: 2; 0 = off)."})
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    synflow_iterations: int = field(default=100)
    imp_prune_rate: float = field(
        default=0.2,
        metadata={"help": "IMP: fraction of the remaining weights pruned per round (LTH: 0.2); the number of rounds "
                          "is the smallest that reaches --sparsity, the last round lands exactly on it."},
    )
    imp_epochs: int = field(
        default=2,
        metadata={"help": "IMP: epochs of training shared evenly (in iterations) by the dense round and every round "
                          "before the last prune; the training after the last prune is --finetune_epochs."},
    )
    bip_implicit_gradient: Literal["code", "paper"] = field(
        default="code",
        metadata={"help": "BiP's implicit-gradient term on the scores: 'code' = -c * (dL/ds)^2 (the authors' code), "
                          "'paper' = -c * sign(s) * dL/dz * dL/dtheta (the paper's Hessian-free form, z = m * theta)."},
    )
    bip_ig_scale: float = field(
        default=1e-4,
        metadata={"help": "BiP: the coefficient c of the implicit-gradient term (the paper's 1/gamma; the code's "
                          "lr2 = 1e-4); 0 leaves alternating weight and score steps without the correction."},
    )
    bip_gamma: float = field(
        default=1e-4,
        metadata={"help": "BiP: the lower-level ridge gamma/2 * |theta|^2, i.e. the weight decay of the weight step "
                          "(the code's wd = 1e-4; the code sets the implicit-gradient coefficient separately)."},
    )

    def __post_init__(self):
        get_method(self.method)  # built in code rather than parsed: the same clear error as a bad --method
        for f in fields(self):  # every *_epochs and *_lr field, including ones added later
            if f.name.endswith("_epochs"):
                _require(self, f.name, lambda v: v >= 0, "0 (skip the stage) or more")
            elif f.name.endswith("_lr") and not (isinstance(getattr(self, f.name), str)
                                                 and getattr(self, f.name).strip().lower() == "auto"):
                _require(self, f.name, lambda v: float(v) > 0, "a positive learning rate, e.g. 1e-3 (or 'auto' "
                         "where the help says so)")
        _require(self, "sparsity", lambda v: 0 <= v < 1, "in [0, 1): the fraction of weights removed, e.g. 0.9")
        if self.nm_pattern is not None:
            self._apply_nm_pattern()
        _require(self, "flops_ratio", lambda v: 0 < v <= 1, "in (0, 1]: the fraction of FLOPs kept, e.g. 0.5")
        _require(self, "warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        _require(self, "lr_scale", lambda v: v > 0 and v != float("inf"), "a positive factor, e.g. 3")
        _require(self, "imp_prune_rate", lambda v: 0 < v < 1, "in (0, 1): the fraction of the remaining weights "
                 "pruned per IMP round, e.g. 0.2")
        if self.bip_implicit_gradient not in ("code", "paper"):
            raise ValueError(f"--bip_implicit_gradient={self.bip_implicit_gradient!r} is invalid: use 'code' (the BiP "
                             "code's term) or 'paper' (the paper's Hessian-free form).")
        for name in ("bip_ig_scale", "bip_gamma"):
            _require(self, name, lambda v: v >= 0 and v == v and v != float("inf"), "a finite number >= 0")
        for name in ("pruner_batches", "synflow_iterations", "min_channels", "hypernet_hidden_size"):
            _require(self, name, lambda v: v > 0, "a positive integer")
        for name in ("target_modules", "exclude_modules"):
            for pattern in getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"--{name}: {pattern!r} is not a valid regular expression ({err}). Fix: "
                                     "escape special characters (e.g. '\\.' for a dot) or correct the pattern.") from None

    def _apply_nm_pattern(self) -> None:
        """--nm_pattern N:M fixes the sparsity at 1 - N/M: the default --sparsity gives way, another is refused."""
        from .sparsity.semi_structured import nm_sparsity

        try:
            target = nm_sparsity(self.nm_pattern)
        except ValueError as err:
            raise ValueError(f"--nm_pattern: {err}") from None
        default = next(f.default for f in fields(self) if f.name == "sparsity")
        if abs(self.sparsity - target) > 1e-9 and self.sparsity != default:
            raise ValueError(f"--sparsity={self.sparsity} conflicts with --nm_pattern {self.nm_pattern}, which prunes "
                             f"exactly {target:g} of every eligible layer; drop --sparsity (or set it to {target:g}).")
        self.sparsity = target


@dataclass
class RunArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Default: outputs/<run name>."})
    seed: int = field(default=7)
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest one in output_dir."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already saved in output_dir (its checkpoints/ folder is kept); without it a "
                          "folder holding a finished or unfinished run is refused."},
    )
    checkpointing: bool = field(default=True, metadata={"help": "Save the training state after each epoch."})
    eval_test: bool = field(default=True, metadata={"help": "Evaluate on the test split at the end (off: "
                                                             "validation only, e.g. for a learning-rate sweep)."})
    dense_reference: bool = field(default=True, metadata={"help": "Also report the pretrained dense model + FLM "
                                                                   "on the test split (a floor; one extra pass)."})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "Cut epochs short (smoke tests)."})
    report_to: Literal["none", "all", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive",
                       "aim", "swanlab"] = field(
        default="none", metadata={"help": "A tracker accelerate supports (its package must be installed; TensorBoard: "
                                          "the 'tracking' extra), or all installed ones."}
    )
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when an accelerator is present."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads per process (default: the cores available / processes; `accelerate launch` "
                          "alone would leave 1)."},
    )
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None, metadata={"help": "Default: a name derived from the run."})
    hub_private: bool = field(default=False)
    # The transformers example scripts' names.
    with_tracking: bool = field(default=False, metadata={"help": "Log to trackers (--report_to, default all then)."})
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "'epoch' (= --checkpointing) or 'no' (= --no_checkpointing); checkpoints are "
                                        "saved at the end of each epoch only."}
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Iterations of each training stage; overrides its epochs (default: epochs)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Forward/backward passes per optimizer step (the global batch grows by it)."}
    )

    def __post_init__(self):
        _require(self, "max_steps_per_epoch", lambda v: v is None or v > 0, "a positive integer")
        _require(self, "torch_threads", lambda v: v is None or v > 0, "a positive integer")
        _require(self, "max_train_steps", lambda v: v is None or v > 0, "a positive integer")
        _require(self, "gradient_accumulation_steps", lambda v: v > 0, "a positive integer")
        if self.with_tracking and self.report_to == "none":
            self.report_to = "all"
        if self.checkpointing_steps is not None:
            if self.checkpointing_steps not in ("epoch", "no"):
                raise ValueError(f"--checkpointing_steps={self.checkpointing_steps!r}: checkpoints are saved at the "
                                 "end of an epoch; use 'epoch' (or 'no' for none).")
            self.checkpointing = self.checkpointing_steps == "epoch"


def _require(args, name: str, ok, what: str) -> None:
    value = getattr(args, name)
    try:
        good = not isinstance(value, bool) and ok(value)
    except (TypeError, ValueError):  # e.g. a string where a number belongs
        good = False
    if not good:
        raise ValueError(f"--{name}={value!r} is invalid: it must be {what}.")
