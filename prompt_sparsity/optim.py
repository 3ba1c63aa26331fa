"""Optimisers and learning rates of the training stages: per-group optimiser and schedule choice (as the authors'
code offers: SGD or Adam for each of scores, prompt and weights; cosine or multistep), and the budget rule behind
`lr="auto"`.

Why a budget rule: the paper's learning rates (Adam 1e-4 for the mask scores and the search prompt) assume its
~11,700 search steps (CIFAR-100: 50,000 images / batch 256 = 196 iterations x 2 steps x 30 epochs). Adam moves
each score by about `lr` per step, so at 40 steps 1e-4 moves the mask by 0.6% of its entries: the search returns
its initial mask. `auto` keeps the paper's total step length `lr x steps` (a score can travel as far as in the
paper) up to a ceiling, and never goes below the paper's lr:

    lr(steps) = clip(reference_lr * reference_steps / steps, reference_lr, max_lr)

The ceilings were chosen on the validation split only (`benchmarks/lr_rule.py`); the same rule holds at 70% and
90% sparsity and at twice the budget there (see `benchmarks/results/lr_rule.md`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "multistep")


@dataclass(frozen=True)
class LrRule:
    """`lr(steps) = clip(reference_lr * reference_steps / steps, reference_lr, max_lr)`."""

    reference_lr: float
    reference_steps: int
    max_lr: float

    def __call__(self, steps: int) -> float:
        steps = max(1, int(steps))
        return min(self.max_lr, max(self.reference_lr, self.reference_lr * self.reference_steps / steps))


# VPNs stage 1 (VPNS.md §6): Adam 1e-4 for scores and prompt over 30 two-step epochs of CIFAR-100 at batch 256.
PAPER_SEARCH_STEPS = 2 * math.ceil(50_000 / 256) * 30
SCORE_LR_RULE = LrRule(reference_lr=1e-4, reference_steps=PAPER_SEARCH_STEPS, max_lr=3e-2)
SEARCH_PROMPT_LR_RULE = LrRule(reference_lr=1e-4, reference_steps=PAPER_SEARCH_STEPS, max_lr=3e-2)
# PASS search (PASS.md): Adam 1e-3 for the hypernetwork over ~30 prompted epochs of the same data.
PAPER_STRUCTURE_STEPS = math.ceil(50_000 / 256) * 30
HYPERNET_LR_RULE = LrRule(reference_lr=1e-3, reference_steps=PAPER_STRUCTURE_STEPS, max_lr=1e-2)
STRUCTURE_PROMPT_LR_RULE = LrRule(reference_lr=1e-3, reference_steps=PAPER_STRUCTURE_STEPS, max_lr=1e-2)


# Adam moves every score by about `lr` per step. A step as large as the threshold carries almost every score across
# it at the first step, so the search forgets its start (at 90% on Lite0 the step-count rule gave lr 0.088 against a
# threshold of 0.030: the final mask kept 16% of the initial one, random ~5%); a tenth of the threshold lets the
# search refine its start (67% kept). `auto` therefore also caps the score lr at this fraction of the scores' scale
# at the threshold (`methods.pruners.score_threshold`), measured when the search starts.
SCORE_STEP_FRACTION = 0.1


def auto_score_lr(steps: int, threshold: float | None) -> float:
    """`auto` for mask scores: the step-count rule, capped at `SCORE_STEP_FRACTION` x the threshold (when known)."""
    lr = SCORE_LR_RULE(steps)
    if threshold is not None and threshold > 0 and math.isfinite(threshold):
        lr = min(lr, SCORE_STEP_FRACTION * threshold)
    return lr


def resolve_lr(value, rule, steps: int, name: str) -> float:
    """A learning rate from a setting that is a number (or its string) or 'auto' (`rule` at `steps`; only for the
    settings that have a rule)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        if rule is None:
            raise ValueError(f"--{name}=auto: this learning rate has no budget rule; give a number.")
        return rule(steps)
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}={value!r}: give a positive number (e.g. 1e-3) or 'auto'.") from None
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"--{name}={value!r}: a learning rate must be a positive number (or 'auto').")
    return lr


def check_choice(value: str, allowed, name: str) -> str:
    if value not in allowed:
        raise ValueError(f"--{name}={value!r}: use one of {', '.join(allowed)}.")
    return value


def cosine_schedule(total_steps: int, warmup_steps: int = 0):
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def multistep_schedule(total_steps: int, milestones=(0.5, 0.72), gamma: float = 0.1):
    bounds = [int(m * total_steps) for m in milestones]

    def fn(step: int) -> float:
        return gamma ** sum(step >= b for b in bounds)

    return fn


def schedule_fn(kind: str, total_steps: int, warmup_steps: int = 0):
    check_choice(kind, SCHEDULES, "schedule")
    return cosine_schedule(total_steps, warmup_steps) if kind == "cosine" else multistep_schedule(total_steps)


class GroupwiseOptimizer(torch.optim.Optimizer):
    """Several torch optimisers behind one: each parameter group names its own (`"optimizer": "adam" | "sgd"`).

    `param_groups` are the inner optimisers' own group dicts (in the order given), so one `LambdaLR` over this
    object schedules every group; `step`, `zero_grad` and `state_dict` go to every inner optimiser. Groups with the
    same optimiser share one inner instance, so an all-Adam or all-SGD set of groups runs exactly as the plain
    torch optimiser would.
    """

    def __init__(self, groups: list[dict], momentum: float = 0.9):
        kinds = []
        for g in groups:
            kind = check_choice(g.pop("optimizer", "adam"), OPTIMIZERS, "optimizer")
            if kind not in kinds:
                kinds.append(kind)
            g["_kind"] = kind
        self.inner: dict[str, torch.optim.Optimizer] = {}
        for kind in kinds:
            mine = [{k: v for k, v in g.items() if k != "_kind"} for g in groups if g["_kind"] == kind]
            self.inner[kind] = (torch.optim.Adam(mine) if kind == "adam"
                                else torch.optim.SGD(mine, momentum=momentum))
        super().__init__([{"params": [p for g in groups for p in g["params"]]}], {})
        # The inner optimisers' group dicts, in the order the caller gave the groups (a scheduler's lambdas follow it).
        order = {kind: iter(opt.param_groups) for kind, opt in self.inner.items()}
        self.param_groups = [next(order[g["_kind"]]) for g in groups]
        self.kinds = [g["_kind"] for g in groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.inner.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {kind: opt.state_dict() for kind, opt in self.inner.items()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != set(self.inner):
            raise ValueError(f"optimizer state holds {sorted(state_dict)} but this stage uses {sorted(self.inner)}; "
                             "resume with the same optimiser settings as the checkpoint.")
        for kind, opt in self.inner.items():
            opt.load_state_dict(state_dict[kind])
        order = {kind: iter(opt.param_groups) for kind, opt in self.inner.items()}
        self.param_groups = [next(order[kind]) for kind in self.kinds]


def build_optimizer(groups: list[dict], momentum: float = 0.9) -> torch.optim.Optimizer:
    """The plain torch optimiser when every group uses the same one (bit-identical to building it directly),
    else a `GroupwiseOptimizer`."""
    kinds = {check_choice(g.get("optimizer", "adam"), OPTIMIZERS, "optimizer") for g in groups}
    if len(kinds) == 1:
        kind = kinds.pop()
        plain = [{k: v for k, v in g.items() if k != "optimizer"} for g in groups]
        return torch.optim.Adam(plain) if kind == "adam" else torch.optim.SGD(plain, momentum=momentum)
    return GroupwiseOptimizer([dict(g) for g in groups], momentum=momentum)
