"""The registry of unstructured pruning methods. A method is a plan: training stages and one-shot pruning steps
(iterative pruning, `Rounds`, unrolls into both with `expand_plan`), run by one shared loop (`prompt_sparsity.training`). Any method can be combined with the visual prompt by a
switch (`prompt_method`), as in the paper's "VPNs w. X" experiments."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Stage:
    """A training stage. `search`: scores + prompt trainable, weights frozen. `dense`: all weights + prompt
    trainable with every weight kept. `finetune`: the mask is fixed, weights + prompt trainable. `bilevel` (BiP):
    per iteration a weight step on one batch, then a score (+ prompt) step with the implicit gradient on another
    (`prompt_sparsity.methods.bilevel`)."""

    kind: str  # search | dense | finetune | structure_search | bilevel
    epochs_field: str  # the PruningArguments field that holds its number of epochs
    steps: str | None = None  # overrides the method's steps for this stage
    # Set only by `expand_plan` (the phases of iterative pruning): the stage trains this many iterations in all
    # (its share of `epochs_field`, possibly ending mid-epoch) on shuffles of its own (`shuffle_offset` + epoch).
    iterations: int | None = None
    shuffle_offset: int = 0


@dataclass(frozen=True)
class Prune:
    """A one-shot pruning step: score weights (or channels, for structured methods) with `criterion` and install
    the mask (or compact the model); `rewind` restores the pretrained weights afterwards (OMP rewinding)."""

    criterion: str
    rewind: bool = False
    sparsity: float | None = None  # this step's target (an IMP round's); None: the run's sparsity


@dataclass(frozen=True)
class Rounds:
    """Iterative pruning with rewinding (IMP / LTH), expanded into plain steps by `expand_plan` once the run knows
    its iterations per epoch: round 0 trains the dense network; each round r = 1..R then prunes by `criterion`
    (magnitude over the weights still kept: pruned weights stay pruned) to `num_pruned(1 - (1 - rate)^r, N)` weights,
    the last one exactly to the target, rewinds to the pretrained weights and trains. R is the smallest number of
    rounds whose sparsity reaches the target (rate 0.2, 90%: 1 - 0.8^10 = 89.3% < 90%, so 11). The R training
    phases before the last prune share `epochs_field` epochs, split evenly in iterations; the training after the
    last prune is the plan's next stage (the fine-tune)."""

    criterion: str = "kept_magnitude"
    rate_field: str = "imp_prune_rate"
    epochs_field: str = "imp_epochs"
    rewind: bool = True
    steps: str | None = None
    kind: str = "imp"


def imp_schedule(target: float, rate: float) -> list[float]:
    """The sparsity after each round: 1 - (1 - rate)^r for r < R, then exactly `target` (R = the smallest number of
    rounds with 1 - (1 - rate)^R >= target; [] for a target of 0)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"imp_prune_rate={rate}: the fraction of the remaining weights pruned per round must be in "
                         "(0, 1), e.g. 0.2.")
    if target <= 0:
        return []
    levels = []
    while True:
        # Rounded to 12 decimals: 1 - 0.8 is 0.19999999999999996 in floats, which would prune one weight too few.
        level = round(1.0 - (1.0 - rate) ** (len(levels) + 1), 12)
        if level >= target - 1e-12:
            return levels + [float(target)]
        levels.append(level)


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` iterations in `parts` phases, as even as integers allow (the earlier phases never get more)."""
    return [(total * (i + 1)) // parts - (total * i) // parts for i in range(parts)]


def expand_plan(plan: tuple, prune_args, sparsity: float, iters_per_epoch: int) -> list:
    """The method's plan with every `Rounds` step replaced by its stages and prune steps (see `Rounds`)."""
    out = []
    for step in plan:
        if not isinstance(step, Rounds):
            out.append(step)
            continue
        levels = imp_schedule(sparsity, float(getattr(prune_args, step.rate_field)))
        total = int(getattr(prune_args, step.epochs_field)) * iters_per_epoch
        phases = split_evenly(total, max(1, len(levels)))
        for r, iterations in enumerate(phases):
            # Round 0 is the dense network; after it, the weights pruned in the rounds so far stay masked.
            kind = "dense" if r == 0 else "finetune"
            out.append(Stage(kind, step.epochs_field, steps=step.steps, iterations=iterations,
                             shuffle_offset=1000 * r))
            if r < len(levels):
                out.append(Prune(step.criterion, rewind=step.rewind, sparsity=levels[r]))
    return out


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
    score_init: str = "scaled"  # initial mask scores of a score search when --score_init is not given

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


STEP_KINDS = ("two", "prompted", "augmented")
# How a score search (VPNs, HYDRA, BiP) initialises its scores: HYDRA's scaled init (the paper's) or the mask of a
# one-shot criterion (`methods.pruners.init_scores_from_criterion`).
SCORE_INITS = ("scaled", "magnitude", "snip", "grasp", "synflow", "random")
_STEP_NAMES = {"two": "two-step", "prompted": "prompted", "augmented": "augmented"}


def tuning_stage_index(plan: tuple) -> int | None:
    """The index of the plan's tuning stage: its last training stage (the fine-tune after the mask is found; the
    dense method's only stage), or None for a plan without one."""
    last = [i for i, step in enumerate(plan) if isinstance(step, Stage)]
    return last[-1] if last else None


def with_tuning(method: Method, *, finetune_steps: str | None = None, prompt_method: str | None = None) -> Method:
    """"X w. two-step" / "X w. prompt" for any registered X: the same mask-finding plan with its tuning stage run
    with `finetune_steps` per iteration (see PruningArguments.steps) and the run's prompt set to `prompt_method`.
    None keeps the method's own (its paper's recipe). The name stays X's, so runs group by the mask's method."""
    if finetune_steps is not None and finetune_steps not in STEP_KINDS:
        raise ValueError(f"finetune_steps={finetune_steps!r}: use one of {', '.join(STEP_KINDS)} (or None for the "
                         "method's own tuning).")
    plan, parts = method.plan, []
    idx = tuning_stage_index(plan)
    if finetune_steps is not None and idx is not None:
        own = plan[idx].steps or method.steps
        if finetune_steps != own:
            plan = plan[:idx] + (replace(plan[idx], steps=finetune_steps),) + plan[idx + 1:]
            parts.append(f"{_STEP_NAMES[finetune_steps]} tuning")
    prompt = method.prompt_method if prompt_method is None else prompt_method
    if prompt != method.prompt_method:
        parts.append("prompt" if prompt != "none" else "no prompt")
    if not parts:
        return method
    return replace(method, plan=plan, prompt_method=prompt,
                   display_name=f"{method.display_name} w. {' + '.join(parts)}")


SEARCH = Stage("search", "search_epochs")
FINETUNE = Stage("finetune", "finetune_epochs")
DENSE = Stage("dense", "dense_epochs")

register_method(
    # SNIP start: measured best on validation under equal tuning (benchmarks/README.md); the paper's is "scaled".
    Method("vpns", (SEARCH, FINETUNE), prompt_method="pad", steps="two", display_name="VPNs", score_init="snip",
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

# Unstructured baselines added later (registered last: the existing order of --method choices is kept).
register_method(
    Method("imp", (Rounds(), FINETUNE), display_name="IMP",
           description="Iterative magnitude pruning (LTH): prune 20% of the remaining weights per round, rewind to "
                       "pretrained, retrain; the last round lands on the target, then fine-tune.")
)
BILEVEL = Stage("bilevel", "search_epochs", steps="two")
register_method(
    Method("bip", (BILEVEL, FINETUNE), display_name="BiP",
           description="Bi-level pruning (BiP): alternating weight and score steps, the score step with the "
                       "implicit-gradient correction, then the frozen mask fine-tuned.")
)
