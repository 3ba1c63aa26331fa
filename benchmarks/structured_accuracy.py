"""Structured accuracy and speed: PASS against Taylor, DepGraph, L1-norm and random channels at equal FLOPs.

The offline ImageNet-pretrained EfficientNet-Lite0 (pretrained head + FLM) on the same fixed Fashion-MNIST subset
as the unstructured benchmark; each method removes channels (global selection under the FLOPs budget, then
physical compaction) down to each target fraction of the dense FLOPs and fine-tunes the compact model. Equal
budgets in passes over the training data: PASS splits them between its search (one prompted pass per epoch) and
its two-step fine-tuning (two passes per epoch); the one-shot baselines put them all into fine-tuning. A dense
fine-tuned reference gets the same passes.

Reported per method and FLOPs target: test accuracy (mean +- std over seeds; PASS with and without its prompt),
achieved FLOPs (FlopCounterMode, 2 x MACs, at the training size) and parameters of the compact model, and CPU
latency of the compact vs the dense model (median of 15 interleaved repeats after 3 warm-ups, batch 1 and 64 at
the training size, plus batch 1 at 224 px) with the measured speed-up beside its physical limit, dense FLOPs /
pruned FLOPs.

Learning rates: as in the unstructured benchmark, every method gets the same grid (0.3x / 1x / 3x all of its
default learning rates, 'auto' resolved at the run's step count) at the first seed; the scale best on validation
runs at the other seeds and is what the tables report (BN-scale with --methods).

Tuning (issue 18): `--tunings paper two_step two_step_prompt` tunes every method with its own recipe (PASS: two-step
+ prompt; the channel baselines: augmented batches, no prompt) and with the shared two-step recipe without and with
the pad prompt; `--tuning-passes N` gives every tuning stage N passes, the search on top (equal tuning).

    python benchmarks/structured_accuracy.py --quick     # ~5 min on 2 CPU cores: 50% FLOPs, 1 seed, tiny data
    python benchmarks/structured_accuracy.py --flops 0.5 # full mode at 50% FLOPs: 5 methods x (3 + 2) runs
    python benchmarks/structured_accuracy.py --methods vpns_channels depgraph --output-dir ...  # VPNs with channel
                                                         # scores (VPNS.md §8) vs DepGraph, same budget in passes

VPNs with channel scores (`vpns_channels`: two-step prompted + augmented search of per-channel scores, one score
per output channel, then compaction and fine-tuning) is selectable with --methods but not in the default list; its
search epoch is two passes (PASS's one), so equal passes give it half as many search epochs.

Writes structured_accuracy.json/.png/.md to benchmarks/results[/quick]; run folders (reused when rerun with the
same settings) under outputs/benchmarks/structured_accuracy[-quick]/. Redraw a saved result's figure alone with
`python benchmarks/structured_accuracy.py --replot benchmarks/results/structured_accuracy.json`.
"""

from __future__ import annotations

import textwrap
import time

import common
from common import DISPLAY, fmt_ms, human_count, markdown_table, mean_std

from prompt_sparsity.methods import display_name

# Selectable with --methods (not in the default lists): VPNs with channel scores. Named and coloured like the other
# methods (common's tables hold the default ones).
DISPLAY.setdefault("vpns_channels", display_name("vpns_channels"))
common.COLOURS.setdefault("vpns_channels", "C6")
PROMPTED = ("pass", "vpns_channels")  # methods with a prompt: reported and drawn with and without it

NAME = "structured_accuracy"
BASELINES = ("taylor", "depgraph", "l1", "random_channels", "bn_scale")
FAIR = ("pass", "taylor", "depgraph", "l1", "random_channels")  # the issue-11 protocol's methods

FULL = dict(train=640, validation=500, test=None, input_size=48, batch_size=64, passes=8,
            seeds=(7, 9, 17), flops=(0.5, 0.3), methods=FAIR, latency_size=224, lr_scales=(0.3, 1.0, 3.0),
            tunings=("paper",))
QUICK = dict(train=128, validation=128, test=256, input_size=48, batch_size=64, passes=4,
             seeds=(7,), flops=(0.5,), methods=FAIR, latency_size=224, lr_scales=(1.0, 3.0), tunings=("paper",))


def latency_at(run_dir: str, size: int, threads: int) -> dict:
    """Batch-1 latency of the saved compact model vs the dense Lite0 at `size` px, and both FLOPs there."""
    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.latency import compare_latency
    from prompt_sparsity.sparsity.flops import measure_flops

    compact = PromptedSparseModel.from_pretrained(run_dir).model
    dense = PromptedSparseModel.from_base("efficientnet-lite0", sparsity_type="none").model
    out = compare_latency({"dense": dense, "compact": compact}, size, (1,), threads=threads)
    out["flops"] = {"dense": measure_flops(dense, size), "compact": measure_flops(compact, size)}
    out["physical_limit"] = out["flops"]["dense"] / out["flops"]["compact"]
    out["size"] = size
    return out


def main(argv=None) -> int:
    args = common.accuracy_arguments(NAME, __doc__, f"subset of pass vpns_channels {' '.join(BASELINES)}", "flops", "FLOPs targets as fractions of dense", argv)
    cfg = common.accuracy_config(args, QUICK, FULL, "flops")
    started = time.perf_counter()
    out_dir, work_dir = common.setup(args, NAME)
    env = common.environment(args)

    # the same fixed subset as the unstructured benchmark (one copy under outputs/benchmarks/data/)
    dataset = common.fixed_dataset(work_dir, train=cfg["train"], validation=cfg["validation"], test=cfg["test"])
    def tunings_of(method):  # a recipe that is the method's own runs once, as "paper"
        return dict.fromkeys(common.canonical_tuning(method, t) for t in cfg["tunings"])

    jobs = [{"method": m, "level": f, "tuning": t, "seed": seed}
            for f in cfg["flops"] for m in cfg["methods"] for t in tunings_of(m) for seed in cfg["seeds"]]
    if not args.no_dense:
        jobs += [{"method": "dense", "level": 1.0, "tuning": t, "seed": seed}
                 for t in tunings_of("dense") for seed in cfg["seeds"]]

    def make_args(method, level, tuning, seed, lr_scale):
        return common.accuracy_run_args(dataset=dataset, input_size=cfg["input_size"], batch_size=cfg["batch_size"],
                                        method=method, seed=seed, passes=cfg["passes"], threads=args.threads,
                                        flops_ratio=level if method != "dense" else 0.5, lr_scale=lr_scale,
                                        train=cfg["train"], search_share=cfg["search_share"], tuning=tuning,
                                        tuning_passes=cfg["tuning_passes"], dense_reference=False,
                                        **cfg["overrides"])

    all_runs, selection = common.run_lr_selected(jobs, work_dir, make_args, scales=cfg["lr_scales"],
                                                 fresh=args.fresh)
    runs = [r for r in all_runs if r.get("selected")]  # the tables: each method at its validation-selected lr
    for r in runs:
        if "error" not in r and r.get("latency") and cfg["latency_size"]:
            common.progress(f"latency at {cfg['latency_size']} px: {r['run_dir']}")
            try:
                r["latency_224"] = latency_at(r["run_dir"], cfg["latency_size"], args.threads)
            except Exception as exc:  # noqa: BLE001
                r["latency_224"] = {"error": f"{type(exc).__name__}: {exc}"}

    # ------------------------------------------------------------------ aggregate
    def lat(r, batch, key="speedup"):
        entry = ((r.get("latency") or {}).get(f"batch_{batch}") or {})
        if key == "speedup":
            return entry.get("speedup")
        return (entry.get(key) or {}).get("median_ms")

    rows = []
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["job"]["method"], r["job"]["level"], r["job"].get("tuning", "paper")), []).append(r)
    for (method, level, tuning), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        l224 = [r.get("latency_224") or {} for r in ok]
        rows.append({
            "method": method, "flops_target": level, "tuning": tuning,
            "flops_ratio": mean_std(r.get("flops_ratio") for r in ok),
            "flops": mean_std(r.get("flops") for r in ok),
            "dense_flops": mean_std(r.get("dense_flops") for r in ok),
            "params": mean_std(r.get("params") for r in ok),
            "dense_params": mean_std(r.get("dense_params") for r in ok),
            "test_no_prompt": mean_std(common.test_accuracy(r, False) for r in ok),
            "test_prompt": mean_std(common.test_accuracy(r, True) for r in ok),
            "physical_limit": mean_std((r["dense_flops"] / r["flops"]) if r.get("flops") else None for r in ok),
            "speedup_b1": mean_std(lat(r, 1) for r in ok),
            "speedup_b64": mean_std(lat(r, 64) for r in ok),
            "dense_ms_b1": mean_std(lat(r, 1, "dense") for r in ok),
            "compact_ms_b1": mean_std(lat(r, 1, "compact") for r in ok),
            "dense_ms_b64": mean_std(lat(r, 64, "dense") for r in ok),
            "compact_ms_b64": mean_std(lat(r, 64, "compact") for r in ok),
            "speedup_224_b1": mean_std((x.get("batch_1") or {}).get("speedup") for x in l224),
            "physical_limit_224": mean_std(x.get("physical_limit") for x in l224),
            "wall_time_s": mean_std(r.get("wall_time_s") for r in ok),
            "epochs": ok[0]["epochs"] if ok else None,
            "lr_scale": rs[0]["job"]["lr_scale"],
            "learning_rates": ok[0].get("learning_rates") if ok else None,
            "seeds": [r["job"]["seed"] for r in ok],
            "errors": [r["error"] for r in rs if "error" in r],
        })

    def headline(row):
        return row["test_prompt"] if row["test_prompt"]["mean"] is not None else row["test_no_prompt"]

    # ------------------------------------------------------------------ tables
    some = next((r for r in runs if "error" not in r and r.get("latency")), {})
    samples = some.get("samples", {})
    threads = (some.get("latency") or {}).get("threads", args.threads)
    settings = common.settings_block(
        env,
        model="EfficientNet-Lite0 (offline ImageNet weights), pretrained head + FLM; prunable units = the expanded "
              "channels of every inverted-residual block; global channel selection under the FLOPs budget, "
              "physical compaction",
        data=f"Fashion-MNIST fixed subset: {samples.get('train')} train / {samples.get('validation')} validation / "
             f"{samples.get('test')} test images, the same for every method and seed",
        image_size=f"{cfg['input_size']} px for training, FLOPs and the batch-1/64 latency; batch-1 latency also at "
                   f"{cfg['latency_size']} px; training batch {cfg['batch_size']}",
        budget=(f"equal tuning: every tuning stage makes {cfg['tuning_passes']} passes, the search its share of "
                f"{cfg['passes']} on top" if cfg["tuning_passes"] else
                f"{cfg['passes']} passes over the training data per method") + "; epochs"
               + (" by tuning recipe: " if len(cfg["tunings"]) > 1 else ": ")
               + "; ".join((f"{common.TUNING_DISPLAY[t]}: " if len(cfg["tunings"]) > 1 else "")
                           + common.epochs_text(list(cfg["methods"]) + ([] if args.no_dense else ["dense"]),
                                                cfg["passes"], cfg["search_share"], t, cfg["tuning_passes"])
                           for t in cfg["tunings"])
               + common.overrides_text(cfg),
        learning_rates=f"every method gets the same grid, {', '.join(f'{s:g}x' for s in cfg['lr_scales'])} its "
                       "default learning rates (all of them; 'auto' resolved at the run's step count), run at seed "
                       f"{cfg['seeds'][0]}; the best on validation is used for every seed (the tables)",
        latency=f"CPU, {threads} threads, median of 15 repeats after 3 warm-ups, dense and compact interleaved in one "
                "process; forward of the backbone only (no prompt)",
        seeds=", ".join(map(str, cfg["seeds"])) + " (mean ± sample std over seeds)",
    )
    acc_headers = ["method", "tuning", "FLOPs target", "FLOPs achieved", "params", "lr scale", "test acc % (no prompt)",
                   "test acc % (prompt)", "wall time / run (s)"]
    speed_headers = ["method", "tuning", "FLOPs target", "physical limit (dense/pruned FLOPs)", "speed-up b1",
                     "speed-up b64", f"speed-up b1 @ {cfg['latency_size']} px (limit)", "dense / compact ms b1",
                     "dense / compact ms b64"]
    order = {m: i for i, m in enumerate(list(cfg["methods"]) + ["dense"])}
    torder = {t: i for i, t in enumerate(common.TUNINGS)}
    acc_rows, speed_rows = [], []
    for row in sorted(rows, key=lambda r: (-r["flops_target"], torder[r["tuning"]], order[r["method"]])):
        name = DISPLAY.get(row["method"], row["method"])
        tuning = common.TUNING_DISPLAY[row["tuning"]]
        if row["errors"]:
            name += " (failed: " + row["errors"][0][:60] + ")"
        if row["method"] == "dense":
            dense_flops = next((x["dense_flops"]["mean"] for x in rows if x["dense_flops"]["mean"]), None)
            dense_params = next((x["dense_params"]["mean"] for x in rows if x["dense_params"]["mean"]), None)
            acc_rows.append([name, tuning, "100%", f"100% ({human_count(dense_flops)})", human_count(dense_params), "1x",
                             fmt_ms(row["test_no_prompt"]), fmt_ms(row["test_prompt"]), fmt_ms(row["wall_time_s"], 0)])
            continue
        acc_rows.append([
            name, tuning, f"{100 * row['flops_target']:.0f}%",
            f"{fmt_ms(row['flops_ratio'], 1, 100)}% ({human_count(row['flops']['mean'])})",
            human_count(row["params"]["mean"]), f"{row['lr_scale']:g}x", fmt_ms(row["test_no_prompt"]),
            fmt_ms(row["test_prompt"]), fmt_ms(row["wall_time_s"], 0),
        ])
        speed_rows.append([
            name, tuning, f"{100 * row['flops_target']:.0f}%", fmt_ms(row["physical_limit"]) + "×",
            fmt_ms(row["speedup_b1"]) + "×", fmt_ms(row["speedup_b64"]) + "×",
            f"{fmt_ms(row['speedup_224_b1'])}× ({fmt_ms(row['physical_limit_224'])}×)",
            f"{fmt_ms(row['dense_ms_b1'], 1)} / {fmt_ms(row['compact_ms_b1'], 1)}",
            f"{fmt_ms(row['dense_ms_b64'], 1)} / {fmt_ms(row['compact_ms_b64'], 1)}",
        ])

    # ------------------------------------------------------------------ findings
    findings = []
    for level, tuning in ((lv, t) for lv in cfg["flops"] for t in cfg["tunings"]):
        # a method whose own recipe is this one ran it as "paper"
        at = [r for r in rows
              if r["flops_target"] == level and r["method"] != "dense" and headline(r)["mean"] is not None
              and r["tuning"] == common.canonical_tuning(r["method"], tuning)]
        if not at:
            continue
        ranked = sorted(at, key=lambda r: -headline(r)["mean"])
        best = ranked[0]
        under = f" under {common.TUNING_DISPLAY[tuning]}" if len(cfg["tunings"]) > 1 else ""
        line = (f"At {100 * level:.0f}% FLOPs{under} the most accurate is {DISPLAY[best['method']]} "
                f"({fmt_ms(headline(best))}%)")
        for prompted in PROMPTED:
            ps = next((r for r in at if r["method"] == prompted), None)
            if ps is None:
                continue
            others = [r for r in ranked if r["method"] not in PROMPTED]
            line += (f"; {DISPLAY[prompted]} is {ranked.index(ps) + 1} of {len(ranked)} with "
                     f"{fmt_ms(ps['test_prompt'])}% with its prompt ({fmt_ms(ps['test_no_prompt'])}% without)")
            if others:
                o = others[0]
                diff = headline(ps)["mean"] - headline(o)["mean"]
                spread = max(headline(ps)["std"] or 0, headline(o)["std"] or 0)
                verdict = "within the seed spread" if abs(diff) <= spread else ("ahead" if diff > 0 else "behind")
                line += (f"; vs the best baseline {DISPLAY[o['method']]}: {diff:+.2f} points ({verdict}; largest seed "
                         f"std {spread:.2f})")
        sp = [r["speedup_b1"]["mean"] / r["physical_limit"]["mean"] for r in at
              if r["speedup_b1"]["mean"] and r["physical_limit"]["mean"]]
        sp64 = [r["speedup_b64"]["mean"] / r["physical_limit"]["mean"] for r in at
                if r["speedup_b64"]["mean"] and r["physical_limit"]["mean"]]
        sp224 = [r["speedup_224_b1"]["mean"] / r["physical_limit_224"]["mean"] for r in at
                 if r["speedup_224_b1"]["mean"] and r["physical_limit_224"]["mean"]]
        if sp and sp64:
            line += (f". Measured speed-ups reach {100 * min(sp):.0f}–{100 * max(sp):.0f}% of the FLOPs limit at "
                     f"batch 1 and {100 * min(sp64):.0f}–{100 * max(sp64):.0f}% at batch 64 ({cfg['input_size']} px)")
            if sp224:
                line += (f", {100 * min(sp224):.0f}–{100 * max(sp224):.0f}% at batch 1 and {cfg['latency_size']} px")
        findings.append(line + ".")
    for dense_row in (r for r in rows if r["method"] == "dense" and r["test_no_prompt"]["mean"] is not None):
        findings.append(f"Dense fine-tuned reference at the same budget ({common.TUNING_DISPLAY[dense_row['tuning']]}):"
                        f" {fmt_ms(headline(dense_row))}%.")
    findings.append("Equal FLOPs is the budget, not equal speed: methods that keep the same FLOPs in different layers "
                    "run at different speeds (depthwise and early high-resolution layers cost more time per FLOP on "
                    "CPU). Speed-ups stay below the FLOPs ratio where time goes to what removing channels does not "
                    "shrink: per-layer overheads (most visible at batch 1 and small inputs), memory-bound depthwise "
                    "convolutions, the stem and the head.")

    md = [f"# Structured accuracy and speed at equal FLOPs ({env['mode']} mode)", "", settings, "",
          "## Accuracy, FLOPs and parameters", "", markdown_table(acc_headers, acc_rows), "",
          "## Measured CPU speed-up of the compact models vs the physical limit", "",
          markdown_table(speed_headers, speed_rows), "", "## Findings", ""]
    md += [f"- {f}" for f in findings]
    md += ["", f"## Learning-rate selection (validation accuracy %, seed {cfg['seeds'][0]}; selected in bold)", ""]
    md += [f"- {line}" for line in common.lr_selection_text(selection, DISPLAY)]
    md += ["", common.reuse_note(all_runs)]
    markdown = "\n".join(md) + "\n"

    results = common.accuracy_results(NAME, env, cfg, dataset, rows, findings, all_runs,
                                      lr_selection=list(selection.values()))
    common.finish(NAME, out_dir, results, markdown, plot(results), started)
    return 0


def plot(results: dict):
    """The figure of a structured_accuracy.json (its `summary` rows and `config`): accuracy at equal FLOPs, and the
    measured speed-up against its physical limit. Drawn from the saved JSON alone, so it can be redrawn (`--replot`).

    Accuracy: with several FLOPs targets, accuracy against the achieved FLOPs on a 0-100% axis; with one target
    every method lands within ~0.01% of it, so an axis of FLOPs would be zoomed to that noise (an offset axis of
    0.003%) and the methods are drawn side by side instead, each labelled with the FLOPs it achieved."""
    cfg, rows = results["config"], results["summary"]
    methods = list(cfg["methods"])
    threads = next((r["latency"].get("threads") for r in results.get("runs", []) if isinstance(r.get("latency"), dict)
                    and r["latency"].get("threads")), "?")
    dense_row = next((r for r in rows if r["method"] == "dense" and r["test_no_prompt"]["mean"] is not None
                      and r.get("tuning", "paper") == "paper"), None)
    levels = sorted({r["flops_target"] for r in rows if r["method"] != "dense"})
    fig, (ax, bx) = common.figure(2, width=6.2, height=4.6)
    markers = dict(zip(methods, "o^sDvP*X"))
    series = []  # (method, prompt, label, [(achieved FLOPs %, accuracy)])
    tunings = list(dict.fromkeys(r.get("tuning", "paper") for r in rows))
    for t in tunings:
        for m in methods:
            for prompt in ((True, False) if m in PROMPTED else (False,)):
                key = "test_prompt" if prompt else "test_no_prompt"
                pts = sorted([(100 * r["flops_ratio"]["mean"], r[key]) for r in rows
                              if r["method"] == m and r.get("tuning", "paper") == t and r[key]["mean"] is not None
                              and r["flops_ratio"]["mean"]], key=lambda p: p[0])
                if pts:
                    label = DISPLAY.get(m, m) + ((" + prompt" if prompt else " (no prompt)") if m in PROMPTED else "")
                    if len(tunings) > 1:
                        label += f", {common.TUNING_DISPLAY[t]}"
                    series.append((m, prompt, label, pts))

    def style(m, prompt):
        return dict(marker=markers.get(m, "o"), capsize=3, lw=2.2 if m in PROMPTED else 1.2,
                    ls="-" if prompt or m not in PROMPTED else "--", color=common.COLOURS.get(m))

    if len(levels) > 1:
        for m, prompt, label, pts in series:
            ax.errorbar([x for x, _ in pts], [a["mean"] for _, a in pts], yerr=[a["std"] or 0 for _, a in pts],
                        label=label, **style(m, prompt))
        if dense_row:
            d = dense_row["test_no_prompt"]
            ax.errorbar([100], [d["mean"]], yerr=[d["std"] or 0], marker="*", ms=12, color="k", capsize=3, ls="none",
                        label="dense fine-tuned")
        ax.set_xlim(0, 105)
        ax.set_xlabel("FLOPs of the compact model (% of dense)")
        title = f"Accuracy at equal FLOPs ({cfg['input_size']} px, {cfg['passes']} passes)"
    else:
        for i, (m, prompt, label, pts) in enumerate(series):
            (flops, acc), = pts
            kw = style(m, prompt)
            kw["mfc"] = "none" if kw.pop("ls") == "--" else kw["color"]
            ax.errorbar([i], [acc["mean"]], yerr=[acc["std"] or 0], ls="none", label=f"{label}: {flops:.2f}% FLOPs",
                        **{k: v for k, v in kw.items() if k != "lw"})
        if dense_row:
            d = dense_row["test_no_prompt"]
            ax.axhline(d["mean"], color="k", lw=1, ls=":", label=f"dense fine-tuned ({d['mean']:.1f}%)")
        ax.set_xticks(range(len(series)), [textwrap.fill(label, 12) for _, _, label, _ in series], fontsize=8)
        ax.set_xlim(-0.6, len(series) - 0.4)
        level = f"{100 * levels[0]:.0f}% FLOPs" if levels else "equal FLOPs"
        title = f"Accuracy at {level} ({cfg['input_size']} px, {cfg['passes']} passes)"
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    top = 1.0
    for r in rows:
        if r["method"] == "dense" or not r["physical_limit"]["mean"]:
            continue
        lim = r["physical_limit"]["mean"]
        top = max(top, lim)
        for key, fill in (("speedup_b1", "none"), ("speedup_b64", None), ("speedup_224_b1", None)):
            v = r[key]["mean"]
            if v is None:
                continue
            x = r["physical_limit_224"]["mean"] if key == "speedup_224_b1" else lim
            kw = {"mfc": "none"} if fill == "none" else {}
            color = {"speedup_b1": "C0", "speedup_b64": "C1", "speedup_224_b1": "C2"}[key]
            bx.errorbar([x], [v], yerr=[r[key]["std"] or 0], marker=markers.get(r["method"], "o"), color=color,
                        ls="none", capsize=2, **kw)
            top = max(top, v, x)  # the 224 px limit too: no point drawn outside the axis
    bx.plot([1, top * 1.1], [1, top * 1.1], "k--", lw=1, label="physical limit (speed-up = FLOPs ratio)")
    for color, lab in (("C0", f"batch 1 @ {cfg['input_size']} px"), ("C1", f"batch 64 @ {cfg['input_size']} px"),
                       ("C2", f"batch 1 @ {cfg['latency_size']} px")):
        bx.plot([], [], "o", color=color, label=lab)
    for m in methods:
        bx.plot([], [], markers[m], color="grey", label=DISPLAY.get(m, m))
    bx.axhline(1, color="grey", lw=0.8)
    bx.set_xlim(0.9, top * 1.15)  # from "no speed-up" up: never zoomed into the spread of one FLOPs target
    bx.ticklabel_format(axis="both", useOffset=False)
    bx.set_xlabel("physical limit: dense FLOPs / pruned FLOPs")
    bx.set_ylabel("measured CPU speed-up (dense ms / compact ms)")
    bx.set_title(f"Measured speed-up vs its limit (CPU, {threads} threads)", fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7, ncol=2)
    return fig


def replot(json_path: str) -> str:
    """Redraw <name>.png beside a saved structured_accuracy.json, without rerunning anything; returns its path."""
    import json
    from pathlib import Path

    path = Path(json_path)
    with open(path) as f:
        results = json.load(f)
    out = path.with_suffix(".png")
    common.save_figure(plot(results), out)
    return str(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--replot"]:  # python benchmarks/structured_accuracy.py --replot results/x.json [...]
        for json_path in sys.argv[2:]:
            print(replot(json_path))
        raise SystemExit(0)
    raise SystemExit(main())
