"""Deployment latency: the merged models a user ships (dense, channel-pruned to 50% and 30% of the dense FLOPs,
90% unstructured) in PyTorch eager, `torch.compile` and onnxruntime, side by side in one run, against the FLOPs
limit.

Model: EfficientNet-Lite0 (offline ImageNet weights), a 10-class label mapping on its head, the pad prompt kept
(`merge_and_unload(keep_prompt=True)`: prompt + normalisation + network, what `export_onnx` exports):
  - dense: no sparsity;
  - compact 50% / 30% FLOPs: L1-norm channel selection at the FLOPs target (global ranking), channels physically
    removed (`compact()`); the channel choice does not change the cost, only the widths do;
  - 90% unstructured: a 90% global magnitude mask baked in as zeros (dense shapes).
Runtimes (CPU): PyTorch eager; `torch.compile` (inductor, compiled once per model and batch size, compile time
reported apart); onnxruntime (`export_onnx`, CPUExecutionProvider, intra-op threads = the thread count, inter-op 1).
Each (runtime, threads, batch) cell times the four models round-robin (drift and load hit them alike): warm-up,
then the median of the timed calls. The limit of a compact model's speed-up is dense FLOPs / its FLOPs
(FlopCounterMode at the input size).

    python benchmarks/deploy_latency.py --quick    # 64 px, batch 1 and 8, few repeats (~4 min on 2 loaded CPU cores)
    python benchmarks/deploy_latency.py            # 224 px, batch 1 and 64 (4.9 min on 2 idle CPU cores)

Writes deploy_latency.json/.png/.md to benchmarks/results[/quick].
"""

from __future__ import annotations

import statistics
import time

import torch

import common
from common import markdown_table

NAME = "deploy_latency"
FULL = dict(input_size=224, batches=(1, 64), threads=(1, 2), warmup={1: 5, 64: 2}, repeats={1: 30, 64: 8})
QUICK = dict(input_size=64, batches=(1, 8), threads=(1, 2), warmup={1: 2, 8: 1}, repeats={1: 5, 8: 3})
MODELS = ("dense", "compact 50% FLOPs", "compact 30% FLOPs", "90% unstructured")
RUNTIMES = ("PyTorch eager", "torch.compile", "onnxruntime")
# The four models share one forward code object, so dynamo counts all their graphs (4 models x 2 batch sizes, plus
# the ones guards add) against one limit (8 by default); past it, it would silently run eager. Raise the limit and
# make hitting it an error, so every torch.compile number is a compiled one.
RECOMPILE_LIMIT = 64


def build_models(size: int) -> tuple[dict, dict]:
    """{name: merged model (eval)} and {name: FLOPs at `size`}."""
    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.methods.channel_pruners import channel_importance, importance_masks
    from prompt_sparsity.sparsity.flops import measure_flops

    common_kwargs = dict(input_size=size, output_size=size, pad_size=max(2, size // 14))
    mapping = list(range(10))
    models = {}
    dense = PromptedSparseModel.from_base("efficientnet-lite0", sparsity_type="none", **common_kwargs)
    dense.set_label_mapping(mapping)
    models["dense"] = dense.merge_and_unload(keep_prompt=True)
    for ratio in (0.5, 0.3):
        model = PromptedSparseModel.from_base("efficientnet-lite0", sparsity_type="structured", flops_ratio=ratio,
                                              **common_kwargs)
        model.set_label_mapping(mapping)
        units = model.structure.units
        scores = channel_importance("l1", model.model, units)
        masks = importance_masks(scores, model.structure.flops_model(model.model), ratio)
        model.compact(masks)
        models[f"compact {round(ratio * 100)}% FLOPs"] = model.merge_and_unload(keep_prompt=True)
    sparse = PromptedSparseModel.from_base("efficientnet-lite0", sparsity=0.9, **common_kwargs)
    sparse.set_label_mapping(mapping)
    sparse.freeze_mask()  # the initial scores are the scaled weight magnitudes: a 90% magnitude mask
    models["90% unstructured"] = sparse.merge_and_unload(keep_prompt=True)
    flops = {name: float(measure_flops(m.model, size)) for name, m in models.items()}
    for m in models.values():
        m.eval()
    return models, flops


class Runner:
    """One model in one runtime: `run(x)` returns the logits."""

    def __init__(self, runtime: str, name: str, model, onnx_path=None):
        self.runtime, self.name, self.model = runtime, name, model
        if runtime == "torch.compile":
            # One static graph per model and batch size (what a fixed-batch deployment runs); see RECOMPILE_LIMIT.
            self.fn = torch.compile(model, dynamic=False)
        elif runtime == "onnxruntime":
            self.onnx_path, self.sessions = onnx_path, {}
        else:
            self.fn = model

    def session(self, threads: int):
        import onnxruntime as ort

        if threads not in self.sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[threads] = ort.InferenceSession(str(self.onnx_path), opts,
                                                          providers=["CPUExecutionProvider"])
        return self.sessions[threads]

    @torch.no_grad()
    def run(self, x: torch.Tensor, threads: int):
        if self.runtime == "onnxruntime":
            return self.session(threads).run(["logits"], {"pixel_values": x.numpy()})[0]
        return self.fn(x).logits


def measure_cell(runners: list, x: torch.Tensor, threads: int, warmup: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    for _ in range(warmup):
        for r in runners:
            r.run(x, threads)
    times = {r.name: [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            t0 = time.perf_counter()
            r.run(x, threads)
            times[r.name].append(1000 * (time.perf_counter() - t0))
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "repeats": len(t)} for name, t in times.items()}


def main(argv=None) -> int:
    p = common.parser(NAME, __doc__)
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    started = time.perf_counter()
    out_dir, work = common.setup(args, NAME)
    env = common.environment(args)
    env["versions"].update({m: common._version(m) for m in ("onnx", "onnxruntime", "onnxscript")})
    size = cfg["input_size"]
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    common.progress("building the merged models")
    models, flops = build_models(size)
    dense_flops = flops["dense"]
    from prompt_sparsity import export_onnx

    common.progress("exporting to ONNX")
    onnx_reports = {}
    for i, (name, model) in enumerate(models.items()):
        onnx_reports[name] = export_onnx(model, work / f"model{i}.onnx", overwrite=True)
    runners = {rt: [Runner(rt, name, m, work / f"model{i}.onnx") for i, (name, m) in enumerate(models.items())]
               for rt in RUNTIMES}

    cells = []
    compile_s = {}
    for batch in cfg["batches"]:
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        for runtime in RUNTIMES:
            if runtime == "torch.compile":  # compile (first call per batch size) outside the timed cells
                for r in runners[runtime]:
                    common.progress(f"compiling {r.name}, batch {batch}")
                    t0 = time.perf_counter()
                    r.run(x, cfg["threads"][-1])
                    compile_s[f"{r.name}, batch {batch}"] = round(time.perf_counter() - t0, 1)
            for threads in cfg["threads"]:
                common.progress(f"{runtime}, {threads} thread(s), batch {batch}")
                cell = measure_cell(runners[runtime], x, threads, cfg["warmup"][batch], cfg["repeats"][batch])
                cells.append({"runtime": runtime, "threads": threads, "batch": batch, "models": cell})
    torch.set_num_threads(args.threads)

    # ------------------------------------------------------------------ tables
    settings = common.settings_block(
        env,
        model="EfficientNet-Lite0 (offline ImageNet weights), 10-class label mapping, pad prompt kept "
              "(merge_and_unload(keep_prompt=True))",
        image_size=f"{size} px; batch {' and '.join(str(b) for b in cfg['batches'])}",
        repeats=", ".join(f"batch {b}: {cfg['warmup'][b]} warm-up + {cfg['repeats'][b]} timed calls per model, "
                          "round-robin over the four models" for b in cfg["batches"]) + "; medians (ms)",
        epochs_and_seeds="not applicable (timing only; random pixels, torch seed 0)",
    )
    rows = []
    for name in MODELS:
        ratio = flops[name] / dense_flops
        row = [name, f"{flops[name] / 1e9:.3f}", f"{100 * ratio:.1f}%", f"{1 / ratio:.2f}×"]
        rows.append(row)
    flops_table = markdown_table(["model", "GFLOPs / image", "of dense", "speed-up limit"], rows)
    lat_rows = []
    for cell in cells:
        d = cell["models"]["dense"]["median_ms"]
        lat_rows.append([cell["runtime"], cell["threads"], cell["batch"]] + [
            f"{cell['models'][n]['median_ms']:.2f}" + ("" if n == "dense" else f" ({d / cell['models'][n]['median_ms']:.2f}×)")
            for n in MODELS])
    lat_table = markdown_table(["runtime", "threads", "batch", *MODELS], lat_rows, align="lrr" + "r" * len(MODELS))
    onnx_rows = [[n, f"{r['max_abs_diff']:.2e}"] for n, r in onnx_reports.items()]
    onnx_table = markdown_table(["model", "largest logit difference, onnxruntime vs PyTorch"], onnx_rows)
    compile_line = ", ".join(f"{k}: {v} s" for k, v in compile_s.items())

    best = {}
    for name in MODELS[1:]:
        speedups = [(c["models"]["dense"]["median_ms"] / c["models"][name]["median_ms"], c) for c in cells]
        best[name] = max(speedups, key=lambda t: t[0])
    findings = []
    for name in ("compact 50% FLOPs", "compact 30% FLOPs"):
        s, c = best[name]
        findings.append(f"- {name}: best speed-up {s:.2f}× ({c['runtime']}, {c['threads']} thread(s), batch "
                        f"{c['batch']}) against a FLOPs limit of {dense_flops / flops[name]:.2f}×.")
    s, c = best["90% unstructured"]
    sp = [c2["models"]["dense"]["median_ms"] / c2["models"]["90% unstructured"]["median_ms"] for c2 in cells]
    findings.append(f"- 90% unstructured: {min(sp):.2f}–{max(sp):.2f}× of dense across all cells (dense kernels "
                    "multiply the zeros; the mask saves storage, not time).")
    markdown = "\n\n".join([
        "# Deployment latency: dense vs compact vs unstructured, eager vs torch.compile vs onnxruntime",
        settings,
        "## FLOPs (FlopCounterMode, per image at the input size)", flops_table,
        "## Median latency (ms; in brackets the speed-up over dense in the same cell)", lat_table,
        "## Findings", "\n".join(findings),
        f"torch.compile first-call (compile) times: {compile_line}.",
        "## ONNX export check (export_onnx: onnxruntime vs PyTorch on a random batch of 3; tolerance 1e-4 + "
        "1e-4·|logit|)", onnx_table,
    ])

    fig, axes = common.figure(ncols=len(cfg["batches"]), width=6.5, height=4.4)
    for ax, batch in zip(axes, cfg["batches"]):
        group = [c for c in cells if c["batch"] == batch]
        labels = [f"{c['runtime']}\n{c['threads']} thr" for c in group]
        width = 0.27
        for j, name in enumerate(MODELS[1:]):
            vals = [c["models"]["dense"]["median_ms"] / c["models"][name]["median_ms"] for c in group]
            ax.bar([i + (j - 1) * width for i in range(len(group))], vals, width, label=name,
                   color=("C0", "C1", "C7")[j])
        for name, colour in (("compact 50% FLOPs", "C0"), ("compact 30% FLOPs", "C1")):
            ax.axhline(dense_flops / flops[name], color=colour, ls="--", lw=1)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(group)), labels, fontsize=7)
        ax.set_ylabel("speed-up over dense (same runtime, threads)")
        ax.set_title(f"batch {batch}, {size} px (dashed: FLOPs limits)")
        ax.legend(fontsize=7)
    results = {"environment": env, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
               "flops": flops, "flops_ratio": {n: flops[n] / dense_flops for n in MODELS}, "cells": cells,
               "compile_s": compile_s, "onnx": onnx_reports,
               "best_speedup": {n: {"speedup": s, "runtime": c["runtime"], "threads": c["threads"],
                                    "batch": c["batch"]} for n, (s, c) in best.items()}}
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
