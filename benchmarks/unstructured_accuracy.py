"""Unstructured accuracy: VPNs against HYDRA, SNIP, OMP and Random at equal budgets, each at its own
validation-selected learning rate, each tuned with its own (paper) recipe and with one shared recipe (two-step
tuning, without and with the visual prompt), so the tables separate the mask, the tuning recipe and the prompt
(SynFlow, GraSP, IMP and BiP with --methods; 'vpns:scaled' = VPNs with the paper's scaled score init instead of
its default, SNIP's mask).

The offline ImageNet-pretrained EfficientNet-Lite0 (pretrained 1000-way head + frequency label mapping, as in the
paper) pruned on a fixed Fashion-MNIST subset (the same images for every method and seed; validation held out of
the official train split, the full official test split), at each sparsity, for each seed, every method with the
same number of passes over the training data, split equally between a method's stages (a VPNs/two-step epoch is
two passes; full mode, 8 passes: VPNs 2 search + 2 tune epochs = HYDRA 4 + 4 = OMP 4 dense + 4 tune =
Random/SNIP 8 tune epochs = IMP 4 epochs shared by its rounds + 4 tune = BiP 2 bilevel (two batches per iteration)
+ 4 tune), plus a dense fine-tuned reference at the same budget (8 epochs).

Learning rates: every method gets the same grid, 0.3x / 1x / 3x / 10x all of its default learning rates (library
defaults, 'auto' resolved at the run's step count), run at the first seed; the scale with the best validation
accuracy is then run at the other seeds, and the tables report those runs on the full test set (mean +- std over
seeds, with and without the prompt) with the validation accuracy of every scale beside them.

    python benchmarks/unstructured_accuracy.py --quick    # ~5 min on 2 CPU cores: 90% only, 1 seed, tiny data
    python benchmarks/unstructured_accuracy.py            # full mode: 5 methods x 2 sparsities x (4 + 2) runs
    python benchmarks/unstructured_accuracy.py --sparsities 0.9 --tuning-passes 8 --threads 1 \\
        --methods vpns vpns:scaled hydra snip omp random  # the committed table: equal tuning (8 tuning passes each)

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
FAIR = ("vpns", "hydra", "snip", "omp", "random")  # the protocol's methods; the others via --methods
TUNING_ORDER = tuple(common.TUNINGS)

FULL = dict(train=640, validation=500, test=None, input_size=48, batch_size=64, passes=8,
            seeds=(7, 9, 17), sparsities=(0.9, 0.7), methods=FAIR, synflow_iterations=100, lr_scales=(0.3, 1.0, 3.0, 10.0),
            tunings=TUNING_ORDER)
QUICK = dict(train=128, validation=128, test=256, input_size=48, batch_size=64, passes=4,
             seeds=(7,), sparsities=(0.9,), methods=FAIR, synflow_iterations=20, lr_scales=(1.0, 3.0),
             tunings=("paper", "two_step_prompt"))


def main(argv=None) -> int:
    args = common.accuracy_arguments(NAME, __doc__, f"subset of vpns {' '.join(BASELINES)} (method:init for a "
                                     "score search started at a criterion's mask, e.g. vpns:snip)", "sparsities",
                                     None, argv)
    cfg = common.accuracy_config(args, QUICK, FULL, "sparsities")
    started = time.perf_counter()
    out_dir, work_dir = common.setup(args, NAME)
    env = common.environment(args)

    dataset = common.fixed_dataset(work_dir, train=cfg["train"], validation=cfg["validation"], test=cfg["test"])
    jobs = []
    for s in cfg["sparsities"]:
        for m in cfg["methods"]:
            for t in dict.fromkeys(common.canonical_tuning(m, t) for t in cfg["tunings"]):
                jobs += [{"method": m, "level": s, "tuning": t, "seed": seed} for seed in cfg["seeds"]]
    if not args.no_dense:  # the ceiling: the dense network tuned with each recipe at the same passes
        for t in dict.fromkeys(common.canonical_tuning("dense", t) for t in cfg["tunings"]):
            jobs += [{"method": "dense", "level": 0.0, "tuning": t, "seed": seed} for seed in cfg["seeds"]]

    def make_args(method, level, tuning, seed, lr_scale):
        # The dense floor (pretrained + FLM, no training) is the same for every run: measured once, in one VPNs run.
        floor_run = (method, level, tuning, seed, lr_scale) == ("vpns", cfg["sparsities"][0], "paper",
                                                                cfg["seeds"][0], 1.0)
        return common.accuracy_run_args(dataset=dataset, input_size=cfg["input_size"], batch_size=cfg["batch_size"],
                                        method=method, seed=seed, passes=cfg["passes"], threads=args.threads,
                                        sparsity=level if method != "dense" else 0.9, lr_scale=lr_scale,
                                        train=cfg["train"], search_share=cfg["search_share"], tuning=tuning,
                                        tuning_passes=cfg["tuning_passes"],
                                        dense_reference=floor_run,
                                        synflow_iterations=cfg["synflow_iterations"], **cfg["overrides"])

    # The dense ceiling gets the same grid and selection rule: an under-tuned ceiling would flatter every method.
    all_runs, selection = common.run_lr_selected(jobs, work_dir, make_args, scales=cfg["lr_scales"],
                                                 fresh=args.fresh, no_grid=())
    runs = [r for r in all_runs if r.get("selected")]  # the table: each method at its validation-selected lr

    # ------------------------------------------------------------------ aggregate
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["job"]["method"], r["job"]["level"], r["job"]["tuning"]), []).append(r)
    for (method, level, tuning), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        dyn = [next(iter((r.get("mask_dynamics") or {}).values()), None) for r in ok]
        rows.append({
            "method": method, "sparsity_target": level, "tuning": tuning,
            "sparsity": mean_std(r.get("sparsity") for r in ok),
            "test_no_prompt": mean_std(common.test_accuracy(r, False) for r in ok),
            "test_prompt": mean_std(common.test_accuracy(r, True) for r in ok),
            "val_no_prompt": mean_std(common.val_accuracy(r, False) for r in ok),
            "val_prompt": mean_std(common.val_accuracy(r, True) for r in ok),
            "overlap_with_start": mean_std(d.get("overlap_with_start") for d in dyn if d),
            "wall_time_s": mean_std(r.get("wall_time_s") for r in ok),
            "train_s": mean_std((r.get("timings_s") or {}).get("train_s") for r in ok),
            "epochs": ok[0]["epochs"] if ok else None,
            "lr_scale": rs[0]["job"]["lr_scale"],
            "learning_rates": ok[0].get("learning_rates") if ok else None,
            "label_mapping_source": [r.get("label_mapping_source") for r in ok],
            "seeds": [r["job"]["seed"] for r in ok],
            "errors": [r["error"] for r in rs if "error" in r],
        })
    # the pretrained dense model + FLM on the fixed data: the same number in every run (no training involved)
    floor = mean_std([next(((r.get("dense_pretrained_flm") or {}).get("accuracy") for r in all_runs
                            if r.get("dense_pretrained_flm")), None)])

    def headline(row):  # the accuracy of the saved model as it runs by default (prompted if it has a prompt)
        return row["test_prompt"] if row["test_prompt"]["mean"] is not None else row["test_no_prompt"]

    def row_of(method, level, tuning):
        tuning = common.canonical_tuning(method, tuning)
        return next((r for r in rows if (r["method"], r["sparsity_target"], r["tuning"]) == (method, level, tuning)),
                    None)

    # ------------------------------------------------------------------ table
    some = next((r for r in runs if "error" not in r), {})
    samples = some.get("samples", {})
    methods_all = list(cfg["methods"]) + ([] if args.no_dense else ["dense"])
    epochs_lines = "; ".join(f"{common.TUNING_DISPLAY[t]}: "
                             f"{common.epochs_text(methods_all, cfg['passes'], cfg['search_share'], t, cfg['tuning_passes'])}"
                             for t in cfg["tunings"])
    test_kind = "the full test set" if not cfg["test"] else "a fixed class-balanced subset of the 10,000 test images"
    settings = common.settings_block(
        env,
        model="EfficientNet-Lite0 (offline ImageNet weights), pretrained head + FLM label mapping, every Conv2d/Linear "
              "pruned, global threshold (Random: uniform per layer)",
        data=f"Fashion-MNIST fixed subset: {samples.get('train')} train / {samples.get('validation')} validation / "
             f"{samples.get('test')} test images ({test_kind}), "
             f"the same for every method and seed",
        image_size=f"{cfg['input_size']} px (pad prompt, 4 px frame), batch {cfg['batch_size']}",
        budget=(f"equal tuning: every tuning stage makes {cfg['tuning_passes']} passes, the mask-finding stages their "
                f"share of {cfg['passes']} on top" if cfg["tuning_passes"] else
                f"{cfg['passes']} passes over the training data per method") + " (a two-step epoch is two passes); epochs "
               f"by tuning recipe: {epochs_lines}; library defaults otherwise (SNIP/GraSP on 4 batches, SynFlow "
               f"{cfg['synflow_iterations']} iterations)" + common.overrides_text(cfg),
        tuning="'own' = each method's paper recipe (baselines: augmented batches only, no prompt; VPNs: two-step + "
               "prompt); 'two-step' = the shared recipe, the tuning stage alternates an un-augmented batch at test "
               "scale and an augmented one; '+ prompt' = the pad prompt trained with the weights in that recipe "
               "(the mask-finding stages are each method's own)",
        learning_rates=f"every method and recipe gets the same grid, {', '.join(f'{s:g}x' for s in cfg['lr_scales'])}"
                       " its default learning rates (all of them; 'auto' resolved at the run), run at seed "
                       f"{cfg['seeds'][0]}; the best on validation is used for every seed (the table)",
        seeds=", ".join(map(str, cfg["seeds"])) + " (mean ± sample std over seeds)",
    )
    headers = ["method", "tuning", "target sparsity", "achieved", "lr scale", "test acc % (no prompt)",
               "test acc % (prompt)", "val acc % (headline)", "mask overlap with its start", "wall time / run (s)"]
    table_rows = []
    order = {m: i for i, m in enumerate(methods_all)}
    torder = {t: i for i, t in enumerate(TUNING_ORDER)}
    for row in sorted(rows, key=lambda r: (r["sparsity_target"] if r["method"] != "dense" else 2,
                                           torder[r["tuning"]], order[r["method"]])):
        val = row["val_prompt"] if row["val_prompt"]["mean"] is not None else row["val_no_prompt"]
        name = common.method_label(row["method"])
        if row["errors"]:
            name += " (failed: " + row["errors"][0][:60] + ")"
        table_rows.append([
            name, common.TUNING_DISPLAY[row["tuning"]],
            "0%" if row["method"] == "dense" else f"{100 * row['sparsity_target']:.0f}%",
            fmt_ms(row["sparsity"], 1, 100) + "%", f"{row['lr_scale']:g}x", fmt_ms(row["test_no_prompt"]),
            fmt_ms(row["test_prompt"]), fmt_ms(val), fmt_ms(row["overlap_with_start"], 2),
            fmt_ms(row["wall_time_s"], 0),
        ])
    table_rows.append(["Dense pretrained + FLM, no training (floor)", "–", "0%", "0%", "–", fmt_ms(floor), "–", "–",
                       "–", "–"])

    # ------------------------------------------------------------------ decomposition: mask / tuning / prompt
    decomposition = []
    dec_rows = []
    for level in cfg["sparsities"]:
        for m in cfg["methods"]:
            own, shared, shared_p = (row_of(m, level, t) for t in TUNING_ORDER)
            cells = {}
            if own and shared:
                cells["tuning"] = headline(shared)["mean"] - headline(own)["mean"] if headline(own)["mean"] is not None \
                    and shared["test_no_prompt"]["mean"] is not None else None
            if shared and shared_p and shared["test_no_prompt"]["mean"] is not None \
                    and shared_p["test_prompt"]["mean"] is not None:
                cells["prompt"] = shared_p["test_prompt"]["mean"] - shared["test_no_prompt"]["mean"]
            if not cells:
                continue
            entry = {"method": m, "level": level, **{f"{k}_gain": v for k, v in cells.items()},
                     "shared_no_prompt": shared["test_no_prompt"] if shared else None,
                     "shared_prompt": shared_p["test_prompt"] if shared_p else None}
            decomposition.append(entry)
            dec_rows.append([common.method_label(m), f"{100 * level:.0f}%",
                             fmt_ms(shared["test_no_prompt"]) if shared else "–",
                             fmt_ms(shared_p["test_prompt"]) if shared_p else "–",
                             f"{cells['tuning']:+.2f}" if cells.get("tuning") is not None else "–",
                             f"{cells['prompt']:+.2f}" if cells.get("prompt") is not None else "–"])

    # ------------------------------------------------------------------ findings
    findings = []
    for level in cfg["sparsities"]:
        for tuning in TUNING_ORDER:
            at = [r for r in rows if r["sparsity_target"] == level and r["method"] != "dense"
                  and r["tuning"] == tuning and headline(r)["mean"] is not None]
            at += [r for r in rows if r["sparsity_target"] == level and r["method"] != "dense" and r["tuning"] == "paper"
                   and tuning != "paper" and common.canonical_tuning(r["method"], tuning) == "paper"
                   and headline(r)["mean"] is not None]
            if len(at) < 2:
                continue
            ranked = sorted(at, key=lambda r: -headline(r)["mean"])
            best, second = ranked[0], ranked[1]
            diff = headline(best)["mean"] - headline(second)["mean"]
            spread = max(headline(best)["std"] or 0, headline(second)["std"] or 0)
            findings.append(
                f"At {100 * level:.0f}% under {common.TUNING_DISPLAY[tuning]}: "
                + ", ".join(f"{common.method_label(r['method'])} {fmt_ms(headline(r))}" for r in ranked)
                + f" — first by {diff:+.2f} points ({'within' if diff <= spread else 'beyond'} the largest seed std "
                  f"{spread:.2f}).")
    for tuning in TUNING_ORDER:
        d = row_of("dense", 0.0, tuning)
        if d and headline(d)["mean"] is not None:
            findings.append(f"Ceiling: dense fine-tuned with {common.TUNING_DISPLAY[tuning]} at the same passes "
                            f"{fmt_ms(headline(d))}%.")
    findings.append(f"Floor: pretrained dense + FLM without training {fmt_ms(floor)}%.")
    findings.append("Accuracy columns: 'prompt' = the prompted network (how a prompted model runs by default), 'no "
                    "prompt' = the same network on plain images. Runs without a prompt have only the second. "
                    "'Mask overlap with its start' = Jaccard overlap of the kept weights after the search with those "
                    "of its first mask (score searches only). Unstructured masks do not speed up dense kernels: the "
                    "wall times are training cost, not inference speed.")

    md = [f"# Unstructured accuracy at equal budgets and equal tuning ({env['mode']} mode)", "", settings, "",
          markdown_table(headers, table_rows), "", "## Mask, tuning recipe, prompt", "",
          "Each method's mask under the shared recipe, and what the recipe and the prompt add (test %, mean of the "
          "seeds; 'tuning' = shared two-step without prompt minus the method's own recipe, 'prompt' = shared with "
          "prompt minus without):", "",
          markdown_table(["method", "sparsity", "two-step, no prompt", "two-step + prompt", "tuning gain",
                          "prompt gain"], dec_rows) if dec_rows else "(needs more than one tuning recipe)",
          "", "## Findings", ""]
    md += [f"- {f}" for f in findings]
    md += ["", f"## Learning-rate selection (validation accuracy %, seed {cfg['seeds'][0]}; selected in bold)", ""]
    md += [f"- {line}" for line in common.lr_selection_text(selection, DISPLAY)]
    md += ["", common.reuse_note(all_runs)]
    markdown = "\n".join(md) + "\n"

    # ------------------------------------------------------------------ plot: one panel per sparsity
    levels = sorted(cfg["sparsities"])
    fig, axes = common.figure(len(levels), width=6.0, height=4.6)
    for ax, level in zip(axes, levels):
        names = list(cfg["methods"])
        width = 0.8 / max(1, len(cfg["tunings"]))
        for j, tuning in enumerate(cfg["tunings"]):
            ys, es = [], []
            for m in names:
                r = row_of(m, level, tuning)
                h = headline(r) if r else {"mean": None, "std": None}
                ys.append(h["mean"] if h["mean"] is not None else 0.0)
                es.append(h["std"] or 0.0)
            xs = [i + (j - (len(cfg["tunings"]) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=common.TUNING_DISPLAY[tuning], color=f"C{j}")
            d = row_of("dense", 0.0, tuning)
            if d and headline(d)["mean"] is not None:
                ax.axhline(headline(d)["mean"], color=f"C{j}", lw=1, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([common.method_label(m) for m in names], rotation=20, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        lo = min([v for v in (headline(r)["mean"] for r in rows if r["sparsity_target"] == level) if v] or [0])
        ax.set_ylim(max(0, lo - 10), None)
        ax.set_title(f"{100 * level:.0f}% sparsity (dashed: dense fine-tuned, same recipe)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"EfficientNet-Lite0 → Fashion-MNIST, {cfg['input_size']} px, {cfg['passes']} passes, "
                 f"{len(cfg['seeds'])} seed(s)", fontsize=10)

    results = common.accuracy_results(NAME, env, cfg, dataset, rows, findings, all_runs, dense_pretrained_flm=floor,
                                      lr_selection=list(selection.values()), decomposition=decomposition)
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
