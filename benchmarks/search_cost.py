"""Search cost: time per optimiser step of the VPNs mask search, the HYDRA score search and dense fine-tuning,
measured side by side in one process on the same model and batch, and the share of a search step spent on the
global threshold of a ResNet-50-sized model (~25M prunable weights).

Part 1 (EfficientNet-Lite0, offline weights, 48 px, batch 64, pretrained head + a 10-class label mapping, one fixed
batch of random pixels): the four kinds of step are run round-robin (so load drift hits all alike), each step
split into its phases (mask = recomputing the global threshold and the 0/1 mask from the scores; forward;
backward; optimiser step + zero_grad), median over the repeats:
  - VPNs search step: scores + pad prompt trainable (Adam 1e-4), weights frozen, the prompted step;
  - HYDRA search step: scores trainable (Adam 1e-4), no prompt;
  - VPNs subnetwork tuning step (stage 2): the 1-bit mask fixed, weights + prompt trainable (SGD 0.01, m 0.9);
  - PASS structure search step (for comparison): hypernetwork + prompt trainable (Adam 1e-3), backbone frozen,
    channel masks at 50% FLOPs emitted inside the forward (so its "mask" phase is part of "forward");
  - dense fine-tuning step: plain weights (SGD 0.01, m 0.9), no mask, no prompt.

Part 2 (ResNet-50 built from `ResNetConfig()` with 1000 classes, random weights: only the sizes matter for
timing; 90% global sparsity, pad prompt): a full VPNs search step at a small batch and image size, the threshold
inside it (`sparsity.update_mask()` right after the Adam step moved the scores: the incremental ThresholdFinder
path, which selects only inside a narrow band around the previous threshold), and against it a fresh exact
selection (`torch.kthvalue` over all |scores|) and a fresh ThresholdFinder (the full path of the first step).

    python benchmarks/search_cost.py --quick     # ~1 min on 2 CPU cores (fewer repeats)
    python benchmarks/search_cost.py             # full mode, ~4 min on 2 CPU cores (measured)

Writes search_cost.json/.png/.md to benchmarks/results[/quick].
"""

from __future__ import annotations

import statistics
import time

import torch

import common
from common import markdown_table

NAME = "search_cost"
FULL = dict(input_size=48, batch_size=64, warmup=3, repeats=20, r50_batch=8, r50_size=64, r50_warmup=2,
            r50_repeats=10, kth_repeats=5)
QUICK = dict(input_size=48, batch_size=64, warmup=1, repeats=4, r50_batch=8, r50_size=64, r50_warmup=1,
             r50_repeats=3, kth_repeats=2)
PHASES = ("mask", "forward", "backward", "optimizer")


class Stepper:
    """One kind of optimiser step on its own model: `step()` runs and times its phases."""

    def __init__(self, name: str, model, optimizer, use_prompt: bool, x, y):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.use_prompt, self.x, self.y = use_prompt, x, y
        self.times = {p: [] for p in PHASES + ("total",)}

    def step(self, record: bool = True) -> None:
        model = self.model
        t0 = time.perf_counter()
        searching = model.sparsity is not None and not model.sparsity.frozen
        if searching:
            model.sparsity.update_mask()  # what the next forward would do lazily; here timed on its own
        t1 = time.perf_counter()
        out = model(pixel_values=self.x, labels=self.y, use_prompt=self.use_prompt)
        t2 = time.perf_counter()
        out.loss.backward()
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if record:
            for phase, dt in zip(PHASES + ("total",), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                self.times[phase].append(1000 * dt)

    def summary(self) -> dict:
        out = {p: statistics.median(v) for p, v in self.times.items() if v}
        out["total_min"] = min(self.times["total"])
        out["repeats"] = len(self.times["total"])
        return out


def lite0_steppers(cfg) -> list[Stepper]:
    from prompt_sparsity import PromptedSparseModel

    size, bs = cfg["input_size"], cfg["batch_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(bs, 3, size, size, generator=g)
    y = torch.randint(0, 10, (bs,), generator=g)

    def build(**kw):
        m = PromptedSparseModel.from_base("efficientnet-lite0", input_size=size, output_size=size, **kw)
        m.set_label_mapping(list(range(10)))
        return m

    steppers = []
    vpns = build(sparsity=0.9, prompt_method="pad", pad_size=4)
    vpns.start_mask_search()
    opt = torch.optim.Adam([{"params": [vpns.sparsity.scores], "lr": 1e-4, "weight_decay": 1e-4},
                            {"params": list(vpns.prompt.parameters()), "lr": 1e-4, "weight_decay": 1e-4}])
    steppers.append(Stepper("VPNs search", vpns, opt, True, x, y))
    hydra = build(sparsity=0.9, prompt_method="none")
    hydra.start_mask_search()
    opt = torch.optim.Adam([hydra.sparsity.scores], lr=1e-4, weight_decay=1e-4)
    steppers.append(Stepper("HYDRA search", hydra, opt, False, x, y))
    tune = build(sparsity=0.9, prompt_method="pad", pad_size=4)
    tune.start_finetuning()  # freezes the (initial, magnitude-like) mask to 1 bit per weight
    weights = [p for n, p in tune.named_parameters() if p.requires_grad and not n.startswith("prompt.")]
    opt = torch.optim.SGD([{"params": weights}, {"params": list(tune.prompt.parameters())}], lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    steppers.append(Stepper("VPNs subnetwork tuning", tune, opt, True, x, y))
    pss = build(sparsity_type="structured", flops_ratio=0.5, prompt_method="pad", pad_size=4)
    pss.start_structure_search()
    opt = torch.optim.Adam([{"params": list(pss.structure.hypernetwork.parameters()), "lr": 1e-3},
                            {"params": list(pss.prompt.parameters()), "lr": 1e-3}])
    steppers.append(Stepper("PASS structure search", pss, opt, True, x, y))
    dense = build(sparsity_type="none", prompt_method="none")
    dense.start_finetuning(train_prompt=False)
    opt = torch.optim.SGD([p for p in dense.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    steppers.append(Stepper("Dense fine-tuning", dense, opt, False, x, y))
    return steppers


def resnet50_threshold(cfg) -> dict:
    from transformers import ResNetConfig, ResNetForImageClassification

    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.sparsity.unstructured import ThresholdFinder, num_pruned

    torch.manual_seed(0)
    base = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    size, bs = cfg["r50_size"], cfg["r50_batch"]
    model = PromptedSparseModel.from_base(base, sparsity=0.9, prompt_method="pad", pad_size=4, input_size=size,
                                          output_size=size)
    model.start_mask_search()
    scores = model.sparsity.scores
    opt = torch.optim.Adam([{"params": [scores], "lr": 1e-4, "weight_decay": 1e-4},
                            {"params": list(model.prompt.parameters()), "lr": 1e-4}])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(bs, 3, size, size, generator=g), torch.randint(0, 1000, (bs,), generator=g)
    stepper = Stepper("ResNet-50 VPNs search", model, opt, True, x, y)
    n, k = scores.numel(), num_pruned(0.9, scores.numel())
    finder = model.sparsity._finder
    for _ in range(cfg["r50_warmup"]):
        stepper.step(record=False)
    fast_before, full_before = finder.stats["fast"], finder.stats["full"]
    for _ in range(cfg["r50_repeats"]):
        stepper.step()
    steps = stepper.summary()
    path = {"fast": finder.stats["fast"] - fast_before, "full": finder.stats["full"] - full_before}

    with torch.no_grad():
        a = scores.detach().abs()
        kth = common.median_ms(lambda: torch.kthvalue(a, k), cfg["kth_repeats"])
        exact = float(torch.kthvalue(a, k).values)
        mask = torch.empty_like(scores)

        def fresh_finder():
            from prompt_sparsity.sparsity.unstructured import mask_from_scores_

            mask_from_scores_(scores.detach(), mask, model.sparsity.layers, 0.9, "global", ThresholdFinder())

        fresh = common.median_ms(fresh_finder, cfg["kth_repeats"])
        stream = common.median_ms(lambda: torch.abs(scores.detach()).sum(), cfg["kth_repeats"] * 2)
    check = model.sparsity.mask()
    return {
        "model": "ResNetForImageClassification(ResNetConfig(num_labels=1000)) = ResNet-50 layout, random weights",
        "prunable_weights": n, "pruned": k, "batch": bs, "image_size": size,
        "step_ms": steps, "threshold_in_step_ms": steps["mask"],
        "threshold_share_of_step": steps["mask"] / steps["total"],
        "finder_path_during_steps": path,
        "fresh_kthvalue_ms": kth, "fresh_finder_mask_ms": fresh, "abs_sum_stream_ms": stream,
        "incremental_speedup_vs_kthvalue": kth["median_ms"] / steps["mask"] if steps["mask"] else None,
        "exact": {"pruned_in_mask": int(check.numel() - check.sum()), "expected": k,
                  "finder_tau": model.sparsity._finder.tau, "kthvalue_tau_now": exact},
    }


def main(argv=None) -> int:
    p = common.parser(NAME, __doc__)
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    started = time.perf_counter()
    out_dir, _ = common.setup(args, NAME)
    env = common.environment(args)

    # ------------------------------------------------------------------ part 1: Lite0, side by side
    common.progress("part 1: EfficientNet-Lite0 steps, round-robin")
    steppers = lite0_steppers(cfg)
    for _ in range(cfg["warmup"]):
        for s in steppers:
            s.step(record=False)
    for i in range(cfg["repeats"]):
        for s in steppers:
            s.step()
    lite0 = {s.name: s.summary() for s in steppers}
    prunable = steppers[0].model.sparsity.numel
    dense_ms = lite0["Dense fine-tuning"]["total"]
    del steppers

    # ------------------------------------------------------------------ part 2: ResNet-50 threshold share
    common.progress("part 2: ResNet-50-sized threshold")
    r50 = resnet50_threshold(cfg)

    # ------------------------------------------------------------------ tables
    settings1 = common.settings_block(
        env,
        model=f"EfficientNet-Lite0 (offline ImageNet weights, {prunable:,} prunable weights), 90% global sparsity "
              "for the sparse steps",
        image_size=f"{cfg['input_size']} px, batch {cfg['batch_size']} (one fixed batch of random pixels, 10 classes "
                   "via a label mapping on the pretrained head)",
        repeats=f"{cfg['warmup']} warm-up + {cfg['repeats']} timed steps of each kind, round-robin in one process; "
                "medians (ms)",
        epochs_and_seeds="not applicable (timing only; torch seed 0)",
    )
    rows1 = []
    for name, t in lite0.items():
        rows1.append([name, f"{t['total']:.0f}", f"{t['total_min']:.0f}", f"{t['mask']:.1f}", f"{t['forward']:.0f}",
                      f"{t['backward']:.0f}", f"{t['optimizer']:.1f}", f"{t['total'] / dense_ms:.2f}×"])
    headers1 = ["step", "median ms", "min ms", "mask/threshold ms", "forward ms", "backward ms", "optimizer ms",
                "vs dense step"]
    s = r50["step_ms"]
    settings2 = common.settings_block(
        env,
        model=f"{r50['model']}, {r50['prunable_weights']:,} prunable weights (every Conv2d and the Linear head), 90% "
              f"global sparsity (k = {r50['pruned']:,}), pad prompt",
        image_size=f"{r50['image_size']} px, batch {r50['batch']} (deliberately small: the threshold does not depend "
                   "on the batch, so this is close to the largest share it can take)",
        repeats=f"{cfg['r50_warmup']} warm-up + {cfg['r50_repeats']} search steps; fresh selections "
                f"{cfg['kth_repeats']}×; medians",
        epochs_and_seeds="not applicable (timing only; random weights, torch seed 0)",
    )
    rows2 = [
        ["full VPNs search step (mask + forward + backward + Adam)", f"{s['total']:.0f}", "100%"],
        ["  of which: threshold + mask, incremental ThresholdFinder (`update_mask()` after the Adam step)",
         f"{s['mask']:.1f}", f"{100 * r50['threshold_share_of_step']:.1f}%"],
        ["  forward (masked weights)", f"{s['forward']:.0f}", f"{100 * s['forward'] / s['total']:.1f}%"],
        ["  backward (to scores and prompt)", f"{s['backward']:.0f}", f"{100 * s['backward'] / s['total']:.1f}%"],
        ["  Adam step + zero_grad", f"{s['optimizer']:.0f}", f"{100 * s['optimizer'] / s['total']:.1f}%"],
        ["fresh exact selection: `torch.kthvalue` over all |scores|", f"{r50['fresh_kthvalue_ms']['median_ms']:.0f}",
         f"{100 * r50['fresh_kthvalue_ms']['median_ms'] / s['total']:.1f}% (if it replaced the incremental path)"],
        ["fresh ThresholdFinder + mask (first-step path)", f"{r50['fresh_finder_mask_ms']['median_ms']:.0f}",
         f"{100 * r50['fresh_finder_mask_ms']['median_ms'] / s['total']:.1f}%"],
        ["one streaming pass `abs().sum()` over the scores (floor)", f"{r50['abs_sum_stream_ms']['median_ms']:.1f}",
         "–"],
    ]
    ex = r50["exact"]
    findings = [
        f"Lite0, {cfg['input_size']} px, batch {cfg['batch_size']}: a VPNs search step costs "
        f"{lite0['VPNs search']['total'] / dense_ms:.2f}× a dense fine-tuning step, a HYDRA search step "
        f"{lite0['HYDRA search']['total'] / dense_ms:.2f}×, a VPNs subnetwork-tuning step "
        f"{lite0['VPNs subnetwork tuning']['total'] / dense_ms:.2f}×, a PASS structure-search step "
        f"{lite0['PASS structure search']['total'] / dense_ms:.2f}×; the threshold takes "
        f"{lite0['VPNs search']['mask']:.1f} ms of the VPNs step "
        f"({100 * lite0['VPNs search']['mask'] / lite0['VPNs search']['total']:.1f}%).",
        f"ResNet-50 size ({r50['prunable_weights'] / 1e6:.1f}M prunable weights), batch {r50['batch']} at "
        f"{r50['image_size']} px: the incremental threshold takes {s['mask']:.0f} ms = "
        f"{100 * r50['threshold_share_of_step']:.1f}% of a {s['total']:.0f} ms search step; a fresh `torch.kthvalue` "
        f"takes {r50['fresh_kthvalue_ms']['median_ms']:.0f} ms "
        f"({r50['incremental_speedup_vs_kthvalue']:.1f}× the incremental path). The finder took the fast path in "
        f"{r50['finder_path_during_steps']['fast']} of "
        f"{r50['finder_path_during_steps']['fast'] + r50['finder_path_during_steps']['full']} selections over the "
        f"{cfg['r50_repeats']} timed steps (a step selects again when the layer-collapse floor forces a layer in, "
        "so the floor's cost is inside the threshold time); the mask prunes exactly "
        f"{ex['pruned_in_mask']:,} weights (expected {ex['expected']:,}).",
        "At real training sizes (224 px, batch 64-256) the forward/backward grow with the batch while the threshold "
        "does not, so its share falls further; the share above is the small-batch worst case.",
    ]
    md = [f"# Search cost ({env['mode']} mode)", "",
          "## Time per optimiser step, side by side (EfficientNet-Lite0)", "", settings1, "",
          markdown_table(headers1, rows1), "",
          "## Global threshold on a ResNet-50-sized model", "", settings2, "",
          markdown_table(["what", "median ms", "share of the search step"], rows2, align="lrr"), "",
          "## Findings", ""] + [f"- {f}" for f in findings]
    markdown = "\n".join(md) + "\n"

    # ------------------------------------------------------------------ plot
    fig, (ax, bx) = common.figure(2, width=6.2, height=4.4)
    names = list(lite0)
    bottom = [0.0] * len(names)
    for i, phase in enumerate(PHASES):
        vals = [lite0[n][phase] for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, label=phase, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, n in enumerate(names):
        ax.text(i, bottom[i], f"{lite0[n]['total']:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("ms per optimiser step (median of phases)")
    ax.set_title(f"Lite0, {cfg['input_size']} px, batch {cfg['batch_size']}, {env['torch_threads']} threads",
                 fontsize=10)
    ax.legend(fontsize=8)
    labels = ["search step\n(total)", "incremental\nthreshold", "fresh\nkthvalue", "fresh finder\n+ mask"]
    vals = [s["total"], s["mask"], r50["fresh_kthvalue_ms"]["median_ms"], r50["fresh_finder_mask_ms"]["median_ms"]]
    bars = bx.bar(range(4), vals, color=["C7", "C0", "C3", "C1"])
    for b, v in zip(bars, vals):
        bx.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f} ms\n{100 * v / s['total']:.0f}%", ha="center",
                va="bottom", fontsize=8)
    bx.set_xticks(range(4))
    bx.set_xticklabels(labels, fontsize=8)
    bx.set_ylabel("ms")
    bx.set_ylim(0, max(vals) * 1.25)
    bx.set_title(f"ResNet-50 size ({r50['prunable_weights'] / 1e6:.1f}M weights), batch {r50['batch']} @ "
                 f"{r50['image_size']} px", fontsize=10)

    results = {"benchmark": NAME, "environment": env, "config": cfg, "lite0_steps_ms": lite0,
               "lite0_prunable_weights": prunable, "resnet50": r50, "findings": findings}
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
