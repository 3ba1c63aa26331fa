"""2:4 semi-structured sparsity: the measured speed-up of `torch.sparse.to_sparse_semi_structured` over dense
fp16 GEMMs on a GPU (when one is available; on a CPU this says that nothing was measured), and on any machine the
exact 2:4 pattern and the share of the weights an export converts.

Part 1, GPU only (`torch.cuda.is_available()`): fp16 `F.linear` latency, dense weight vs the same weight 2:4-pruned
(magnitude) and converted with `to_sparse_semi_structured`, for the Linear shapes of ViT-B/16 (attention qkv and
output projection, MLP fc1 and fc2, 197 tokens x batch) and ResNet-50's fc (1000 x 2048, padded to 1024 rows: torch
needs rows a multiple of 32), timed with CUDA events (median of repeats, each many calls); the outputs are checked
against the dense product. Then the EfficientNet-Lite0 subnetwork end to end (batch, 224 px, fp16):
`merge_and_unload()` (cuDNN convs) vs `prepare_semi_structured` (the same convs as dense channels-last GEMMs) vs
`export_semi_structured` (those GEMMs on 2:4 sparse tensors).

Part 2, any machine: the default EfficientNet-Lite0 (`PromptedSparseModel.from_base("efficientnet-lite0",
nm_pattern="2:4")`, offline ImageNet weights) pruned with the 2:4 magnitude criterion (and, in full mode, the
ViT-B/16 and ResNet-50 layouts with random weights): the pattern is verified on every eligible layer, the layers
left dense are counted, `semi_structured_matrices` reports how many weights an export converts (rows a multiple
of 32, columns of 64), `prepare_semi_structured`'s outputs are compared with the merged model's, and the 2:4
mask selection is timed against the global threshold it replaces in a VPNs score search (CPU, `--threads`).

    python benchmarks/semi_structured_speed.py --quick --threads 1   # Lite0 only, ~1 min on a CPU
    python benchmarks/semi_structured_speed.py --threads 1           # + ViT-B/16, ResNet-50 layouts

Writes semi_structured_speed.json/.png/.md to benchmarks/results[/quick].
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import common
from common import markdown_table

NAME = "semi_structured_speed"
FULL = dict(tokens_batch=32, fc_batch=256, gpu_warmup=10, gpu_repeats=30, gpu_inner=20, lite0_batch=64,
            lite0_size=224, cpu_size=224, cpu_batch=2, select_repeats=10, layouts=("vit-b16", "resnet-50"))
QUICK = dict(tokens_batch=8, fc_batch=64, gpu_warmup=3, gpu_repeats=10, gpu_inner=10, lite0_batch=16,
             lite0_size=224, cpu_size=224, cpu_batch=1, select_repeats=3, layouts=())
# (name, out_features, in_features, rows of the input): ViT-B/16 at 224 px has 197 tokens per image.
VIT_TOKENS = 197


def gpu_shapes(cfg) -> list[tuple[str, int, int, int]]:
    t = VIT_TOKENS * cfg["tokens_batch"]
    return [("ViT-B/16 attention qkv", 2304, 768, t), ("ViT-B/16 attention output", 768, 768, t),
            ("ViT-B/16 MLP fc1", 3072, 768, t), ("ViT-B/16 MLP fc2", 768, 3072, t),
            ("ResNet-50 fc (1000 rows padded to 1024)", 1024, 2048, cfg["fc_batch"])]


# --------------------------------------------------------------------------------------------- GPU part
def cuda_ms(fn, cfg) -> dict:
    """Median / min ms per call: `gpu_repeats` timings of `gpu_inner` back-to-back calls, CUDA events."""
    for _ in range(cfg["gpu_warmup"]):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(cfg["gpu_repeats"]):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(cfg["gpu_inner"]):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / cfg["gpu_inner"])
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times),
            "calls_per_repeat": cfg["gpu_inner"]}


@torch.no_grad()
def gpu_linear(cfg) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    from prompt_sparsity.sparsity.semi_structured import check_nm, nm_group_mask

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, out_f, in_f, n in gpu_shapes(cfg):
        row = {"layer": name, "weight": [out_f, in_f], "input_rows": n}
        try:
            w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16, generator=g)
            w = w * nm_group_mask(w.abs().float(), 2, 4).to(w.dtype)
            assert check_nm(w, 2, 4, exact=False)
            x = torch.randn(n, in_f, device="cuda", dtype=torch.float16, generator=g)
            ws = to_sparse_semi_structured(w)
            row["backend"] = type(ws).__name__
            dense, sparse = F.linear(x, w), F.linear(x, ws)
            row["max_abs_error"] = float((dense - sparse).abs().max())
            row["dense"] = cuda_ms(lambda: F.linear(x, w), cfg)
            row["sparse_2_4"] = cuda_ms(lambda: F.linear(x, ws), cfg)
            row["speedup"] = row["dense"]["median_ms"] / row["sparse_2_4"]["median_ms"]
        except Exception as err:  # noqa: BLE001 - recorded: a backend that refuses a shape is a result too
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


@torch.no_grad()
def gpu_lite0(cfg, model) -> dict:
    from prompt_sparsity import export_semi_structured, prepare_semi_structured

    out = {"batch": cfg["lite0_batch"], "image_size": cfg["lite0_size"]}
    try:
        model = model.to("cuda", torch.float16)
        x = torch.rand(cfg["lite0_batch"], 3, cfg["lite0_size"], cfg["lite0_size"], device="cuda",
                       dtype=torch.float16)
        merged = model.merge_and_unload().eval()
        gemm = prepare_semi_structured(model).eval()
        sparse, report = export_semi_structured(model, output_report=True)
        sparse.eval()
        ref = merged(x).logits.float()
        out["max_abs_logit_error"] = {"prepared": float((gemm(x).logits.float() - ref).abs().max()),
                                      "exported": float((sparse(x).logits.float() - ref).abs().max())}
        out["merged_cudnn"] = cuda_ms(lambda: merged(x), cfg)
        out["prepared_dense_gemm"] = cuda_ms(lambda: gemm(x), cfg)
        out["exported_2_4"] = cuda_ms(lambda: sparse(x), cfg)
        out["speedup_vs_cudnn"] = out["merged_cudnn"]["median_ms"] / out["exported_2_4"]["median_ms"]
        out["speedup_vs_dense_gemm"] = out["prepared_dense_gemm"]["median_ms"] / out["exported_2_4"]["median_ms"]
        out["converted_layers"] = len(report.converted)
    except Exception as err:  # noqa: BLE001
        out["error"] = f"{type(err).__name__}: {err}"
    return out


# --------------------------------------------------------------------------------------------- any machine
def build(name: str):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    from prompt_sparsity import PromptedSparseModel

    if name == "efficientnet-lite0":
        model = PromptedSparseModel.from_base("efficientnet-lite0", nm_pattern="2:4", prompt_method="none")
        model.set_label_mapping(list(range(10)))
        return model, "EfficientNet-Lite0 (offline ImageNet weights, pretrained head + 10-class label mapping)"
    torch.manual_seed(0)
    if name == "vit-b16":
        base = ViTForImageClassification(ViTConfig(num_labels=1000))
        desc = "ViT-B/16 layout (ViTConfig(), random weights)"
    else:
        base = ResNetForImageClassification(ResNetConfig(num_labels=1000))
        desc = "ResNet-50 layout (ResNetConfig(), random weights)"
    return PromptedSparseModel.from_base(base, nm_pattern="2:4", prompt_method="none"), desc


@torch.no_grad()
def pattern_and_eligibility(name: str, cfg, forward: bool) -> tuple[dict, object]:
    from prompt_sparsity import prepare_semi_structured
    from prompt_sparsity.methods.pruners import prune_once
    from prompt_sparsity.sparsity.semi_structured import check_nm, nm_eligible, nm_report

    model, desc = build(name)
    t0 = time.perf_counter()
    prune_once(model, "magnitude", 0.5)
    prune_s = time.perf_counter() - t0
    masks = model.sparsity.layer_masks()
    layers = model.sparsity.layers
    eligible = [l for l in layers if nm_eligible(l.shape, 4)]
    pattern_ok = all(check_nm(masks[l.param_name], 2, 4) for l in eligible)
    dense_ok = all(bool(masks[l.param_name].eq(1).all()) for l in layers if not nm_eligible(l.shape, 4))
    nm = nm_report(layers, "2:4")
    merged, report = prepare_semi_structured(model, output_report=True)
    out = {
        "model": desc, "prunable_weights": model.sparsity.numel, "pruned_layers": len(layers),
        "pattern_exact_on_every_eligible_layer": pattern_ok, "ineligible_layers_dense": dense_ok,
        "nm_eligible_layers": nm["eligible_layers"], "nm_dense_layers": len(nm["dense_layers"]),
        "nm_eligible_weights": nm["eligible_weights"], "nm_eligible_fraction": nm["eligible_weights"] / nm["total_weights"],
        "global_sparsity": model.sparsity_report()["global"], "magnitude_prune_s": prune_s,
        "export": {"converted_layers": len(report.converted), "dense_layers": len(report.dense),
                   "converted_weights": report.converted_weights,
                   # Of the wrapped model's prunable weights (a label-mapped head shrinks in the merged model).
                   "fraction_of_prunable": report.converted_weights / model.sparsity.numel,
                   "fraction_of_merged_pruned_layers": report.fraction_of_pruned,
                   "fraction_of_parameters": report.fraction_of_parameters,
                   "dense_reasons": _reason_counts(report.dense)},
    }
    if forward:
        size, bs = cfg["cpu_size"], cfg["cpu_batch"]
        x = torch.rand(bs, 3, size, size, generator=torch.Generator().manual_seed(0))
        mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
        x = (x - mean[:, None, None]) / std[:, None, None]
        plain = model.merge_and_unload().eval()
        ref = plain(x).logits
        out["prepared_vs_merged_max_abs_logit_diff"] = float((merged.eval()(x).logits - ref).abs().max())
        out["forward_check"] = f"batch {bs} at {size} px, float32, CPU"
    return out, model


def _reason_counts(dense: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in dense.values():
        key = ("N:M rule (inputs per tap not a multiple of 4)" if "N:M rule" in why
               else "matrix not a multiple of (32, 64)" if "multiple of (32, 64)" in why else why)
        counts[key] = counts.get(key, 0) + 1
    return counts


@torch.no_grad()
def selection_cost(model, cfg) -> dict:
    """ms to recompute the mask from the scores: the 2:4 group selection vs the global threshold (first call
    and the incremental ThresholdFinder path of later steps)."""
    from prompt_sparsity.sparsity.unstructured import ThresholdFinder, mask_from_scores_, scaled_scores

    params = dict(model.model.named_parameters())
    layers = model.sparsity.layers
    scores = torch.cat([scaled_scores(params[l.param_name]).flatten() for l in layers])
    mask = torch.empty_like(scores)
    nm = common.median_ms(lambda: mask_from_scores_(scores, mask, layers, 0.5, "global", nm_pattern="2:4"),
                          cfg["select_repeats"])
    fresh = common.median_ms(lambda: mask_from_scores_(scores, mask, layers, 0.5, "global", ThresholdFinder()),
                             cfg["select_repeats"])
    finder = ThresholdFinder()
    mask_from_scores_(scores, mask, layers, 0.5, "global", finder)
    g = torch.Generator().manual_seed(0)

    def incremental():  # the scores move a little, as after an optimiser step
        scores.add_(torch.randn(scores.shape, generator=g), alpha=1e-6)
        mask_from_scores_(scores, mask, layers, 0.5, "global", finder)

    inc = common.median_ms(incremental, cfg["select_repeats"])
    return {"weights": scores.numel(), "nm_2_4_ms": nm, "global_threshold_fresh_ms": fresh,
            "global_threshold_incremental_ms": inc}


def main(argv=None) -> int:
    p = common.parser(NAME, __doc__)
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    started = time.perf_counter()
    out_dir, _ = common.setup(args, NAME)
    env = common.environment(args)
    gpu = torch.cuda.is_available()
    results = {"benchmark": NAME, "environment": env, "config": {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in cfg.items()},
               "gpu_available": gpu}

    common.progress("EfficientNet-Lite0: 2:4 pattern and export eligibility (CPU)")
    lite0, lite0_model = pattern_and_eligibility("efficientnet-lite0", cfg, forward=True)
    common.progress("mask selection cost: 2:4 vs the global threshold")
    lite0["selection"] = selection_cost(lite0_model, cfg)
    models = {"efficientnet-lite0": lite0}
    for name in cfg["layouts"]:
        common.progress(f"{name}: 2:4 pattern and export eligibility")
        models[name], _ = pattern_and_eligibility(name, cfg, forward=False)
    results["models"] = models

    if gpu:
        env["device"] = "cuda"
        env["gpu"] = torch.cuda.get_device_name(0)
        common.progress(f"GPU ({env['gpu']}): dense vs 2:4 fp16 linear")
        results["gpu_linear"] = gpu_linear(cfg)
        common.progress("GPU: EfficientNet-Lite0 end to end")
        results["gpu_lite0"] = gpu_lite0(cfg, lite0_model)
        results["speedup_measured"] = True
    else:
        results["gpu_linear"] = None
        results["gpu_lite0"] = None
        results["speedup_measured"] = False
        results["note"] = ("No CUDA GPU was available (torch.cuda.is_available() is False), so no speed-up was "
                           "measured: torch.sparse.to_sparse_semi_structured runs on CUDA only (fp16/bf16, sparse "
                           "tensor cores). A 2:4 mask stored in dense weights is not faster on a CPU. Only the "
                           "pattern, the export eligibility and the CPU cost of the mask selection were measured.")

    # ------------------------------------------------------------------ tables
    md = [f"# 2:4 semi-structured sparsity ({env['mode']} mode)", ""]
    md += ["## Speed-up on a GPU", ""]
    if gpu:
        md += [common.settings_block(env, dtype="float16", timing=f"CUDA events, {cfg['gpu_warmup']} warm-up, "
                                     f"median of {cfg['gpu_repeats']} x {cfg['gpu_inner']} calls"), ""]
        rows = []
        for r in results["gpu_linear"]:
            if "error" in r:
                rows.append([r["layer"], f"{r['weight']}", r["input_rows"], "–", "–", "–", r["error"][:80]])
            else:
                rows.append([r["layer"], f"{r['weight']}", r["input_rows"], f"{r['dense']['median_ms']:.3f}",
                             f"{r['sparse_2_4']['median_ms']:.3f}", f"{r['speedup']:.2f}×",
                             f"{r['backend']}, max |err| {r['max_abs_error']:.2g}"])
        md += [markdown_table(["layer", "weight", "input rows", "dense ms", "2:4 ms", "speed-up", "note"], rows), ""]
        e2e = results["gpu_lite0"]
        if "error" in e2e:
            md += [f"Lite0 end to end: {e2e['error']}", ""]
        else:
            md += [markdown_table(
                ["EfficientNet-Lite0, batch " f"{e2e['batch']} @ {e2e['image_size']} px fp16", "median ms", "vs 2:4"],
                [["merge_and_unload() (cuDNN convs)", f"{e2e['merged_cudnn']['median_ms']:.2f}",
                  f"{e2e['speedup_vs_cudnn']:.2f}×"],
                 ["prepare_semi_structured (dense channels-last GEMMs)",
                  f"{e2e['prepared_dense_gemm']['median_ms']:.2f}", f"{e2e['speedup_vs_dense_gemm']:.2f}×"],
                 [f"export_semi_structured ({e2e['converted_layers']} layers 2:4)",
                  f"{e2e['exported_2_4']['median_ms']:.2f}", "1.00×"]]), ""]
    else:
        md += [common.settings_block(env), "", f"**{results['note']}**", ""]
    md += ["## Pattern and export eligibility", "",
           common.settings_block(env, criterion="2:4 magnitude (prune_once)",
                                 forward_check=lite0.get("forward_check")), ""]
    rows = []
    for name, r in models.items():
        ex = r["export"]
        rows.append([r["model"], f"{r['prunable_weights']:,}",
                     "yes" if r["pattern_exact_on_every_eligible_layer"] and r["ineligible_layers_dense"] else "NO",
                     f"{r['nm_eligible_layers']} / {r['pruned_layers']}", f"{100 * r['nm_eligible_fraction']:.1f}%",
                     f"{100 * r['global_sparsity']:.1f}%", f"{ex['converted_layers']}",
                     f"{ex['converted_weights']:,}", f"{100 * ex['fraction_of_prunable']:.1f}%",
                     f"{100 * ex['fraction_of_parameters']:.1f}%"])
    md += [markdown_table(["model", "prunable weights", "exact 2:4 (eligible) + dense (others)",
                           "2:4 layers / pruned layers", "weights under 2:4", "global sparsity",
                           "layers an export converts", "weights converted", "converted, of prunable",
                           "converted, of the exported model's parameters"],
                          rows), ""]
    md.append("- Exported model = `merge_and_unload()`: a label-mapped pretrained head is folded to its mapped rows "
              "(Lite0: 10 of 1000), so its parameter count is smaller than the wrapped model's.")
    for name, r in models.items():
        md.append(f"- {r['model']}: left dense / not converted: "
                  + "; ".join(f"{k}: {v}" for k, v in r["export"]["dense_reasons"].items()) + ".")
    if "prepared_vs_merged_max_abs_logit_diff" in lite0:
        md.append(f"- Lite0 `prepare_semi_structured` (convs as channels-last GEMMs) vs `merge_and_unload()`: max "
                  f"|logit difference| {lite0['prepared_vs_merged_max_abs_logit_diff']:.2g} ({lite0['forward_check']}).")
    sel = lite0["selection"]
    md += ["", "## Mask selection cost in a score search (CPU)", "",
           markdown_table(["Lite0, " f"{sel['weights']:,} scores", "median ms"],
                          [["2:4 group top-2 (every step)", f"{sel['nm_2_4_ms']['median_ms']:.1f}"],
                           ["global threshold, fresh (first step)", f"{sel['global_threshold_fresh_ms']['median_ms']:.1f}"],
                           ["global threshold, incremental (later steps)",
                            f"{sel['global_threshold_incremental_ms']['median_ms']:.1f}"]]), ""]
    markdown = "\n".join(md) + "\n"

    fig, (ax, bx) = common.figure(2, width=5.6, height=4.0)
    names = list(models)
    ax.bar(range(len(names)), [100 * models[n]["nm_eligible_fraction"] for n in names], label="under the 2:4 mask")
    ax.bar(range(len(names)), [100 * models[n]["export"]["fraction_of_prunable"] for n in names], width=0.5,
           label="converted by an export")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("% of prunable weights")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("2:4 coverage", fontsize=10)
    if gpu and results["gpu_linear"]:
        ok = [r for r in results["gpu_linear"] if "speedup" in r]
        bx.bar(range(len(ok)), [r["speedup"] for r in ok], color="C3")
        bx.axhline(1.0, color="k", lw=0.8)
        bx.set_xticks(range(len(ok)))
        bx.set_xticklabels([r["layer"].replace("ViT-B/16 ", "").split(" (")[0] for r in ok], fontsize=7, rotation=20)
        bx.set_ylabel("dense ms / 2:4 ms (fp16)")
        bx.set_title(env.get("gpu", "GPU"), fontsize=10)
    else:
        bx.text(0.5, 0.5, "no GPU available:\nno speed-up measured", ha="center", va="center", fontsize=11)
        bx.set_axis_off()
    results["findings"] = [line for line in md if line.startswith("- ")]
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
