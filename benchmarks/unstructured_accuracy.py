"""Unstructured accuracy: VPNs against HYDRA, SNIP, OMP and Random at equal budgets, each at its own
validation-selected learning rate (the fair protocol of issue 11; SynFlow, GraSP, IMP and BiP with --methods).

The offline ImageNet-pretrained EfficientNet-Lite0 (pretrained 1000-way head + frequency label mapping, as in the
paper) pruned on a fixed Fashion-MNIST subset (the same images for every method and seed; validation held out of
the official train split, the full official test split), at each sparsity, for each seed, every method with the
same number of passes over the training data, split equally between a method's stages (a VPNs/two-step epoch is
two passes; full mode, 8 passes: VPNs 2 search + 2 tune epochs = HYDRA 4 + 4 = OMP 4 dense + 4 tune =
Random/SNIP 8 tune epochs = IMP 4 epochs shared by its rounds + 4 tune = BiP 2 bilevel (two batches per iteration)
+ 4 tune), plus a dense fine-tuned reference at the same budget (8 epochs).

Learning rates: every method gets the same grid, 0.3x / 1x / 3x all of its default learning rates (library
defaults, 'auto' resolved at the run's step count), run at the first seed; the scale with the best validation
accuracy is then run at the other seeds, and the tables report those runs on the full test set (mean +- std over
seeds, with and without the prompt) with the validation accuracy of every scale beside them.

    python benchmarks/unstructured_accuracy.py --quick    # ~5 min on 2 CPU cores: 90% only, 1 seed, tiny data
    python benchmarks/unstructured_accuracy.py            # full mode: 5 methods x 2 sparsities x (3 + 2) runs

Writes unstructured_accuracy.json/.png/.md to benchmarks/results[/quick]; run folders (reused when rerun with
the same settings, also across invocations with different --methods) under
outputs/benchmarks/unstructured_accuracy[-quick]/.
"""

from __future__ import annotations

import time

import common
from common import DISPLAY, fmt_ms, markdown_table, mean_std

NAME = "unstructured_accuracy"
BASELINES = ("hydra", "snip", "omp", "random", "synflow", "grasp", "imp", "bip")
FAIR = ("vpns", "hydra", "snip", "omp", "random")  # the issue-11 protocol's methods; the others via --methods

FULL = dict(train=640, validation=500, test=None, input_size=48, batch_size=64, passes=8,
            seeds=(7, 9, 17), sparsities=(0.9, 0.7), methods=FAIR, synflow_iterations=100, lr_scales=(0.3, 1.0, 3.0))
QUICK = dict(train=128, validation=128, test=256, input_size=48, batch_size=64, passes=4,
             seeds=(7,), sparsities=(0.9,), methods=FAIR, synflow_iterations=20, lr_scales=(1.0, 3.0))


def main(argv=None) -> int:
    args = common.accuracy_arguments(NAME, __doc__, f"subset of vpns {' '.join(BASELINES)}", "sparsities", None, argv)
    cfg = common.accuracy_config(args, QUICK, FULL, "sparsities")
    started = time.perf_counter()
    out_dir, work_dir = common.setup(args, NAME)
    env = common.environment(args)

    dataset = common.fixed_dataset(work_dir, train=cfg["train"], validation=cfg["validation"], test=cfg["test"])
    jobs = [{"method": m, "level": s, "seed": seed} for s in cfg["sparsities"] for m in cfg["methods"]
            for seed in cfg["seeds"]]
    if not args.no_dense:
        jobs += [{"method": "dense", "level": 0.0, "seed": seed} for seed in cfg["seeds"]]

    def make_args(method, level, seed, lr_scale):
        # The dense floor (pretrained + FLM, no training) is the same for every run: measured once, in one VPNs run
        # (fixed, so that invocations over different --methods reuse each other's runs).
        floor_run = (method, level, seed, lr_scale) == ("vpns", cfg["sparsities"][0], cfg["seeds"][0], 1.0)
        return common.accuracy_run_args(dataset=dataset, input_size=cfg["input_size"], batch_size=cfg["batch_size"],
                                        method=method, seed=seed, passes=cfg["passes"], threads=args.threads,
                                        sparsity=level if method != "dense" else 0.9, lr_scale=lr_scale,
                                        train=cfg["train"], search_share=cfg["search_share"],
                                        dense_reference=floor_run,
                                        synflow_iterations=cfg["synflow_iterations"], **cfg["overrides"])

    all_runs, selection = common.run_lr_selected(jobs, work_dir, make_args, scales=cfg["lr_scales"],
                                                 fresh=args.fresh)
    runs = [r for r in all_runs if r.get("selected")]  # the table: each method at its validation-selected lr

    # ------------------------------------------------------------------ aggregate
    rows = []
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["job"]["method"], r["job"]["level"]), []).append(r)
    for (method, level), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        rows.append({
            "method": method, "sparsity_target": level,
            "sparsity": mean_std(r.get("sparsity") for r in ok),
            "test_no_prompt": mean_std(common.test_accuracy(r, False) for r in ok),
            "test_prompt": mean_std(common.test_accuracy(r, True) for r in ok),
            "val_no_prompt": mean_std(common.val_accuracy(r, False) for r in ok),
            "val_prompt": mean_std(common.val_accuracy(r, True) for r in ok),
            "wall_time_s": mean_std(r.get("wall_time_s") for r in ok),
            "train_s": mean_std((r.get("timings_s") or {}).get("train_s") for r in ok),
            "epochs": ok[0]["epochs"] if ok else None,
            "lr_scale": rs[0]["job"]["lr_scale"],
            "learning_rates": ok[0].get("learning_rates") if ok else None,
            "seeds": [r["job"]["seed"] for r in ok],
            "errors": [r["error"] for r in rs if "error" in r],
        })
    # the pretrained dense model + FLM on the fixed data: the same number in every run (no training involved)
    floor = mean_std([next(((r.get("dense_pretrained_flm") or {}).get("accuracy") for r in all_runs
                            if r.get("dense_pretrained_flm")), None)])

    def headline(row):  # the accuracy of the saved model as it runs by default (prompted if it has a prompt)
        return row["test_prompt"] if row["test_prompt"]["mean"] is not None else row["test_no_prompt"]

    # ------------------------------------------------------------------ table
    some = next((r for r in runs if "error" not in r), {})
    samples = some.get("samples", {})
    epochs_text = common.epochs_text(list(cfg["methods"]) + ([] if args.no_dense else ["dense"]), cfg["passes"],
                                 cfg["search_share"])
    test_kind = "the full test set" if not cfg["test"] else "a fixed class-balanced subset of the 10,000 test images"
    settings = common.settings_block(
        env,
        model="EfficientNet-Lite0 (offline ImageNet weights), pretrained head + FLM label mapping, every Conv2d/Linear "
              "pruned, global threshold (Random: uniform per layer)",
        data=f"Fashion-MNIST fixed subset: {samples.get('train')} train / {samples.get('validation')} validation / "
             f"{samples.get('test')} test images ({test_kind}), "
             f"the same for every method and seed",
        image_size=f"{cfg['input_size']} px (pad prompt, 4 px frame), batch {cfg['batch_size']}",
        budget=f"{cfg['passes']} passes over the training data per method; epochs: {epochs_text}; library "
               f"defaults otherwise (SNIP/GraSP on 4 batches, SynFlow {cfg['synflow_iterations']} iterations)"
               + common.overrides_text(cfg),
        learning_rates=f"every method gets the same grid, {', '.join(f'{s:g}x' for s in cfg['lr_scales'])} its "
                       "default learning rates (all of them; 'auto' resolved at the run's step count), run at seed "
                       f"{cfg['seeds'][0]}; the best on validation is used for every seed (the table)",
        seeds=", ".join(map(str, cfg["seeds"])) + " (mean ± sample std over seeds)",
    )
    headers = ["method", "target sparsity", "achieved", "lr scale", "test acc % (no prompt)", "test acc % (prompt)",
               "val acc % (headline)", "wall time / run (s)"]
    table_rows = []
    order = {m: i for i, m in enumerate(list(cfg["methods"]) + ["dense"])}
    for row in sorted(rows, key=lambda r: (r["sparsity_target"] if r["method"] != "dense" else -1, order[r["method"]])):
        val = row["val_prompt"] if row["val_prompt"]["mean"] is not None else row["val_no_prompt"]
        name = DISPLAY.get(row["method"], row["method"])
        if row["errors"]:
            name += " (failed: " + row["errors"][0][:60] + ")"
        table_rows.append([
            name, "0%" if row["method"] == "dense" else f"{100 * row['sparsity_target']:.0f}%",
            fmt_ms(row["sparsity"], 1, 100) + "%", f"{row['lr_scale']:g}x", fmt_ms(row["test_no_prompt"]),
            fmt_ms(row["test_prompt"]),
            fmt_ms(val), fmt_ms(row["wall_time_s"], 0),
        ])
    table_rows.append(["Dense pretrained + FLM, no training (floor)", "0%", "0%", "–", fmt_ms(floor), "–", "–", "–"])

    # ------------------------------------------------------------------ findings
    findings = []
    for level in cfg["sparsities"]:
        at = [r for r in rows
              if r["sparsity_target"] == level and r["method"] != "dense" and headline(r)["mean"] is not None]
        if not at:
            continue
        ranked = sorted(at, key=lambda r: -headline(r)["mean"])
        vp = next((r for r in at if r["method"] == "vpns"), None)
        best = ranked[0]
        line = (f"At {100 * level:.0f}% sparsity the best is {DISPLAY[best['method']]} "
                f"({fmt_ms(headline(best))}%)")
        if vp is not None:
            rank = ranked.index(vp) + 1
            others = [r for r in ranked if r["method"] != "vpns"]
            line += (f"; VPNs is {rank} of {len(ranked)} with {fmt_ms(vp['test_prompt'])}% with its prompt "
                     f"({fmt_ms(vp['test_no_prompt'])}% without)")
            if others:
                o = others[0]
                diff = headline(vp)["mean"] - headline(o)["mean"]
                spread = max(headline(vp)["std"] or 0, headline(o)["std"] or 0)
                verdict = ("within the seed spread" if abs(diff) <= spread else ("ahead" if diff > 0 else "behind"))
                line += (f"; vs the best baseline {DISPLAY[o['method']]}: {diff:+.2f} points ({verdict}; largest "
                         f"seed std {spread:.2f})")
        findings.append(line + ".")
    dense_row = next((r for r in rows if r["method"] == "dense"), None)
    if dense_row and headline(dense_row)["mean"] is not None:
        findings.append(f"Dense fine-tuned reference at the same budget: {fmt_ms(headline(dense_row))}%; "
                        f"pretrained dense + FLM without training: {fmt_ms(floor)}%.")
    findings.append("Accuracy columns: 'prompt' = the prompted network (how the saved VPNs model runs by default and "
                    "what the paper's figure draws), 'no prompt' = the same network on plain images (what the "
                    "authors' code evaluates). Baselines have no prompt. Unstructured masks do not speed up dense "
                    "kernels: the wall times are training cost, not inference speed.")

    md = [f"# Unstructured accuracy at equal budgets ({env['mode']} mode)", "", settings, "",
          markdown_table(headers, table_rows), "", "## Findings", ""]
    md += [f"- {f}" for f in findings]
    md += ["", f"## Learning-rate selection (validation accuracy %, seed {cfg['seeds'][0]}; selected in bold)", ""]
    md += [f"- {line}" for line in common.lr_selection_text(selection, DISPLAY)]
    md += ["", common.reuse_note(all_runs)]
    markdown = "\n".join(md) + "\n"

    # ------------------------------------------------------------------ plot
    fig, (ax,) = common.figure(1, width=7.0, height=4.6)
    levels = sorted(cfg["sparsities"])
    for m in cfg["methods"]:
        for prompt in ((True, False) if m == "vpns" else (False,)):
            key = "test_prompt" if prompt else "test_no_prompt"
            pts = [(100 * r["sparsity_target"], r[key]) for r in rows
                   if r["method"] == m and r[key]["mean"] is not None]
            pts = sorted(pts, key=lambda t: t[0])
            if not pts:
                continue
            label = DISPLAY[m] + ((" + prompt" if prompt else " (no prompt)") if m == "vpns" else "")
            ax.errorbar([x for x, _ in pts], [a["mean"] for _, a in pts], yerr=[a["std"] for _, a in pts],
                        marker="o", capsize=3, lw=2.2 if m == "vpns" else 1.2,
                        ls="-" if prompt or m != "vpns" else "--",
                        label=label, color=common.COLOURS.get(m))
    if dense_row and headline(dense_row)["mean"] is not None:
        d = headline(dense_row)
        ax.axhline(d["mean"], color="k", lw=1, label="dense fine-tuned")
        ax.axhspan(d["mean"] - d["std"], d["mean"] + d["std"], color="k", alpha=0.08)
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks([100 * s for s in levels])
    ax.set_title(f"EfficientNet-Lite0 → Fashion-MNIST, {cfg['input_size']} px, {cfg['passes']} passes, "
                 f"{len(cfg['seeds'])} seed(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    results = common.accuracy_results(NAME, env, cfg, dataset, rows, findings, all_runs, dense_pretrained_flm=floor,
                                      lr_selection=list(selection.values()))
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
