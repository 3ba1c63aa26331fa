"""Does the 'auto' learning-rate rule hold? VPNs' validation accuracy at 0.3x / 1x / 3x its default learning rates
(1x = 'auto' for the search, resolved at the run's step count) at 90% and 70% sparsity with the 8-pass budget,
and at 90% with twice the budget (16 passes), read from the accuracy benchmarks' learning-rate grids (no training
here). The rule was chosen on validation only; test accuracies are shown beside it for the record.

    python benchmarks/unstructured_accuracy.py --sparsities 0.9 --tuning-passes 8 --lr-scales 0.3 1 3 10 \\
        --methods vpns vpns:scaled hydra snip omp random --tunings paper two_step two_step_prompt   # 90%, equal tuning
    python benchmarks/unstructured_accuracy.py --sparsities 0.7 --no-dense \\
        --output-dir benchmarks/results/unstructured_70                           # ... and at 70%
    python benchmarks/unstructured_accuracy.py --methods vpns --sparsities 0.9 --seeds 7 --passes 16 --no-dense \\
        --output-dir benchmarks/results/ablations/budget_2x --work-dir outputs/benchmarks/unstructured_accuracy-2x
    python benchmarks/lr_rule.py                                    # this table

Writes lr_rule.json/.png/.md to benchmarks/results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
from common import markdown_table

NAME = "lr_rule"
SOURCES = [  # (budget label, the benchmark JSON holding its grid); the last two predate the threshold cap and SNIP init
    ("8 tuning passes (SNIP init, capped rule)", common.BENCH_DIR / "results" / "unstructured_accuracy.json"),
    ("8 passes (scaled init, step-count rule)",
     common.BENCH_DIR / "results" / "unstructured_70" / "unstructured_accuracy.json"),
    ("16 passes (2x budget; scaled init, step-count rule)",
     common.BENCH_DIR / "results" / "ablations" / "budget_2x" / "unstructured_accuracy.json"),
]


def main(argv=None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--method", default="vpns")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out_dir, _ = common.setup(args, NAME)
    env = common.environment(args)
    from prompt_sparsity.optim import SCORE_LR_RULE, SCORE_STEP_FRACTION

    rows, points = [], []
    for budget, path in SOURCES:
        if not Path(path).is_file():
            print(f"missing {path}: run the command in this script's docstring first")
            continue
        data = json.loads(Path(path).read_text())
        # The method's own tuning recipe only: the equal-tuning grids also hold its other recipes.
        runs = [r for r in data["runs"] if r.get("job", {}).get("method") == args.method and "error" not in r
                and r["job"].get("tuning", "paper") == "paper"]
        for level in sorted({r["job"]["level"] for r in runs}, reverse=True):
            at = sorted((r for r in runs if r["job"]["level"] == level and r["job"]["seed"] == data["config"]["seeds"][0]),
                        key=lambda r: r["job"]["lr_scale"])
            if not at:
                continue
            vals = {r["job"]["lr_scale"]: common.headline_val(r) for r in at}
            tests = {r["job"]["lr_scale"]: common.test_accuracy(r, True) or common.test_accuracy(r, False) for r in at}
            lrs = {r["job"]["lr_scale"]: (r.get("learning_rates") or {}).get("search/score_lr") for r in at}
            best = max(vals, key=lambda s: (vals[s], -abs(s - 1)))
            gap = vals[best] - vals.get(1.0, float("nan"))
            rows.append([budget, f"{100 * level:.0f}%",
                         ", ".join(f"{s:g}x = {lrs[s]:.2g}" for s in sorted(lrs) if lrs[s]),
                         ", ".join(f"{'**' if s == best else ''}{s:g}x: {vals[s]:.1f}{'**' if s == best else ''}"
                                   for s in sorted(vals)),
                         ", ".join(f"{s:g}x: {tests[s]:.1f}" for s in sorted(tests) if tests[s] is not None),
                         f"{best:g}x", f"{gap:.1f}"])
            points.append((budget, level, vals))

    md = [f"# Does the 'auto' search learning rate hold? ({args.method}, validation-selected)", "",
          common.settings_block(env, source="the learning-rate grids of benchmarks/unstructured_accuracy.py (seed "
                                "7; every learning rate of the run scaled, 1x = library defaults with 'auto' "
                                "search lrs)", rule=f"score lr = clip(1e-4 x {SCORE_LR_RULE.reference_steps} / "
                                f"search steps, 1e-4, {SCORE_LR_RULE.max_lr:g}), capped at {SCORE_STEP_FRACTION:g} x the "
                                f"score threshold at the start of the search (the cap came after the runs of the "
                                f"rows marked 'step-count rule')"), "",
          markdown_table(["budget", "sparsity", "score lr at each scale", "val acc % (best in bold)",
                          "test acc % (not used to choose)", "best scale", "best - auto (points)"], rows), ""]
    findings = []
    for budget, level, vals in points:
        best = max(vals, key=lambda s: vals[s])
        findings.append(f"{budget}, {100 * level:.0f}%: validation best at {best:g}x"
                        + (" (auto)" if best == 1.0 else f", auto {vals[best] - vals[1.0]:.1f} points below it"))
    md += ["## Findings", ""] + [f"- {f}" for f in findings]
    fig, (ax,) = common.figure(1, width=6.0, height=4.0)
    for budget, level, vals in points:
        xs = sorted(vals)
        ax.plot(xs, [vals[x] for x in xs], marker="o", label=f"{budget}, {100 * level:.0f}%")
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("learning-rate scale (1 = library default, 'auto' search lr)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    results = {"benchmark": NAME, "environment": env, "rows": rows, "findings": findings,
               "points": [{"budget": b, "level": lv, "val": {str(k): v for k, v in vals.items()}}
                          for b, lv, vals in points]}
    common.finish(NAME, out_dir, results, "\n".join(md) + "\n", fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
