"""The registry of unstructured pruning methods. A method is a plan: training stages and one-shot pruning steps,
run by one shared loop (`prompt_sparsity.training`). Any method can be combined with the visual prompt by a
switch (`prompt_method`), as in the paper's "VPNs w. X" experiments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """A training stage. `search`: scores + prompt trainable, weights frozen. `dense`: all weights + prompt
    trainable with every weight kept. `finetune`: the mask is fixed, weights + prompt trainable."""

    kind: str  # search | dense | finetune | structure_search
    epochs_field: str  # the PruningArguments field that holds its number of epochs
    steps: str | None = None  # overrides the method's steps for this stage


@dataclass(frozen=True)
class Prune:
    """A one-shot pruning step: score weights (or channels, for structured methods) with `criterion` and install
    the mask (or compact the model); `rewind` restores the pretrained weights afterwards (OMP rewinding)."""

    criterion: str
    rewind: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    plan: tuple
    prompt_method: str = "none"  # default prompt; override with --prompt_method
    steps: str = "augmented"  # default optimiser steps per iteration (see PruningArguments.steps)
    threshold: str = "global"
    sparse: bool = True
    structured: bool = False
    description: str = ""
    display_name: str = ""  # how tables and model cards name it

    def __post_init__(self):
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"a pruning method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def display_name(name: str | None) -> str:
    """A method's name for tables and cards (the name itself for unknown methods, e.g. 'transfer')."""
    return METHODS[name].display_name if name in METHODS else (name or "")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}.") from None


SEARCH = Stage("search", "search_epochs")
FINETUNE = Stage("finetune", "finetune_epochs")
DENSE = Stage("dense", "dense_epochs")

register_method(
    Method("vpns", (SEARCH, FINETUNE), prompt_method="pad", steps="two", display_name="VPNs",
           description="Visual prompt + mask scores searched jointly, then weights + prompt tuned (VPNs).")
)
register_method(
    Method("hydra", (SEARCH, FINETUNE), display_name="HYDRA", description="Score search then weight tuning, no prompt (HYDRA).")
)
register_method(
    Method("omp", (DENSE, Prune("magnitude", rewind=True), FINETUNE), display_name="OMP",
           description="Dense fine-tune, global magnitude mask, rewind to pretrained, fine-tune (OMP).")
)
register_method(Method("random", (Prune("random"), FINETUNE), threshold="layerwise", display_name="Random",
                       description="Uniform per-layer random mask, then fine-tune."))
register_method(Method("snip", (Prune("snip"), FINETUNE), display_name="SNIP", description="SNIP |w*g| at the pretrained weights."))
register_method(Method("grasp", (Prune("grasp"), FINETUNE), display_name="GraSP", description="GraSP -w*Hg at the pretrained weights."))
register_method(Method("synflow", (Prune("synflow"), FINETUNE), display_name="SynFlow", description="Iterative data-free SynFlow."))
register_method(Method("dense", (DENSE,), sparse=False, display_name="Dense fine-tuned", description="Dense fine-tuning reference (no pruning)."))

# Structured (channel) methods: PASS and the channel baselines at equal FLOPs (PASS.md §3).
STRUCTURE_SEARCH = Stage("structure_search", "search_epochs", steps="prompted")
register_method(
    Method("pass", (STRUCTURE_SEARCH, Prune("hypernetwork"), FINETUNE), prompt_method="pad", steps="two",
           display_name="PASS",
           structured=True,
           description="Prompt-conditioned LSTM hypernetwork emits channel masks under a FLOPs budget (PASS).")
)
# VPNs with channel scores (VPNS.md §8): the VPNs search (scores + prompt, two-step, weights frozen) on one score per
# channel under the FLOPs budget (sparsity/channel_scores.py), then the structured compaction and fine-tuning.
register_method(
    Method("vpns_channels", (SEARCH, Prune("channel_scores"), FINETUNE), prompt_method="pad", steps="two",
           display_name="VPNs (channels)", structured=True,
           description="Visual prompt + per-channel scores searched jointly under a FLOPs budget, then the compact "
                       "model + prompt tuned (VPNs, structured).")
)
for _criterion, _display, _text in [
    ("l1", "L1-norm", "L1 norm of filters"),
    ("taylor", "Taylor", "first-order Taylor |dL/dm| of channel masks"),
    ("bn_scale", "BN-scale", "BatchNorm scale |gamma| (network slimming)"),
    ("random_channels", "Random channels", "random channels"),
    ("depgraph", "DepGraph", "DepGraph group-norm importance (torch-pruning)"),
]:
    register_method(Method(_criterion, (Prune(_criterion), FINETUNE), structured=True, display_name=_display,
                           description=f"Channel pruning by {_text} at the FLOPs target, then fine-tune."))
