"""Artifact size: bytes on disk of the dense model, the 90% VPNs subnetwork in its two saved states, what a
transfer downloads, and how far the sparse weights compress.

For EfficientNet-Lite0 (offline ImageNet weights; full mode adds a ResNet-50-sized model built from
`ResNetConfig()`, random weights, for the scale of a 25M-weight mask), at 90% global sparsity with the pad prompt:

  - dense: the base model, `save_pretrained` (model.safetensors);
  - stage 1 (mask search): `PromptedSparseModel` with float32 scores (one per prunable weight) + prompt + weights;
  - frozen: after `start_finetuning()` the scores become a 1-bit packed mask (`sparsity.mask_packed`);
  - transfer download: what `prompt_sparsity.transfer` fetches from a saved subnetwork: config.json and, by range
    requests, the safetensors header + `sparsity.mask_packed` + `prompt.*` (read here with `hub.download_tensors` on
    the local folder); the pretrained base model comes from its own repo (or the local cache) on top;
  - merged: `merge_and_unload()` (plain transformers model, mask baked in as zeros), raw and compressed with gzip -6,
    xz -6 and zstd -19 (the CLI, when installed) to show that the zeros compress;
  - mask + kept values: a safetensors file with the packed mask, only the kept weights of the pruned layers and all
    other parameters: the smallest uncompressed encoding of the subnetwork (written here, not a library format).

With `--subnetwork DIR` (default: the 90% VPNs run of the full unstructured benchmark, when it exists), a real
searched and fine-tuned subnetwork folder is measured as well (its pruned weights are stored as zeros, as
`save_pretrained` writes every frozen subnetwork, so the file compresses like the merged export).

    python benchmarks/artifact_size.py --quick   # ~1.5 min: Lite0
    python benchmarks/artifact_size.py           # ~11 min (measured, 2 CPU cores): Lite0 + ResNet-50 size (+ a saved run if present)

Writes artifact_size.json/.png/.md to benchmarks/results[/quick]; the saved folders go under
outputs/benchmarks/artifact_size[-quick]/.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
import time
from pathlib import Path

import torch

import common
from common import human_bytes, markdown_table

NAME = "artifact_size"
SPARSITY = 0.9


def folder_bytes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}


def safetensors_header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def compressed_sizes(path: Path) -> dict[str, int | None]:
    data = path.read_bytes()
    out = {"gzip -6": len(gzip.compress(data, compresslevel=6)),
           "xz -6": len(lzma.compress(data, preset=6))}
    zstd = shutil.which("zstd")
    if zstd:
        res = subprocess.run([zstd, "-19", "-q", "-c", "-T2", str(path)], capture_output=True, check=True)
        out["zstd -19"] = len(res.stdout)
    return out


@torch.no_grad()
def mask_and_values_file(model, path: Path) -> int:
    """Packed mask + kept values of the pruned layers + every other tensor, as one safetensors file."""
    from safetensors.torch import save_file

    layers = {layer.param_name: layer for layer in model.sparsity.layers}
    flat = model.sparsity.mask().bool()
    tensors = {"sparsity.mask_packed": model.sparsity.mask_packed.clone()}
    for name, t in model.model.state_dict().items():
        if name in layers:
            layer = layers[name]
            keep = flat[layer.offset : layer.offset + layer.numel]
            tensors[f"kept.{name}"] = t.flatten()[keep].contiguous()
        else:
            tensors[f"model.{name}"] = t.contiguous()
    for name, t in model.prompt.state_dict().items():
        tensors[f"prompt.{name}"] = t.contiguous()
    save_file(tensors, str(path))
    return path.stat().st_size


def measure(label: str, base, work: Path, *, dense_saver, subnetwork_dir: Path | None = None) -> dict:
    """Save every artifact of one model under work/<label>/ and measure them."""
    from prompt_sparsity import PromptedSparseModel
    from prompt_sparsity.hub import download_tensors

    root = work / label
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    out: dict = {"model": label}

    # dense
    dense_dir = root / "dense"
    dense_saver(dense_dir)
    out["dense"] = {"files": folder_bytes(dense_dir), "safetensors": (dense_dir / "model.safetensors").stat().st_size}
    out["dense"]["compressed"] = compressed_sizes(dense_dir / "model.safetensors")

    # stage 1 (float scores) and frozen (packed mask)
    model = base()
    model.start_mask_search()
    n = model.sparsity.numel
    out["prunable_weights"] = n
    out["total_params"] = sum(p.numel() for p in model.model.parameters())
    out["prompt_params"] = sum(p.numel() for p in model.prompt.parameters())
    s1 = root / "stage1-scores"
    model.save_pretrained(s1)
    out["stage1_scores"] = {"files": folder_bytes(s1), "safetensors": (s1 / "model.safetensors").stat().st_size}
    model.start_finetuning()  # scores -> 1-bit mask
    fz = root / "frozen-packed"
    model.save_pretrained(fz)
    out["frozen_packed"] = {"files": folder_bytes(fz), "safetensors": (fz / "model.safetensors").stat().st_size}
    out["frozen_packed"]["compressed"] = compressed_sizes(fz / "model.safetensors")
    report = model.sparsity_report()
    out["sparsity"] = report["global"]
    out["label_mapping"] = model.config.label_mapping is not None

    # what a transfer downloads
    tensors = download_tensors(str(fz), ["sparsity.mask_packed", "prompt.*"])
    tensor_bytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    mask_bytes = tensor_bytes.get("sparsity.mask_packed", 0)
    out["transfer"] = {
        "tensors": tensor_bytes,
        "tensor_bytes": sum(tensor_bytes.values()),
        "safetensors_header": safetensors_header_bytes(fz / "model.safetensors"),
        "config_json": (fz / "config.json").stat().st_size,
        "preprocessor_config_json": (fz / "preprocessor_config.json").stat().st_size,
        "mask_compressed": {"gzip -6": len(gzip.compress(tensors["sparsity.mask_packed"].numpy().tobytes(), 6)),
                            "xz -6": len(lzma.compress(tensors["sparsity.mask_packed"].numpy().tobytes(), preset=6))},
    }
    t = out["transfer"]
    t["total"] = t["tensor_bytes"] + t["safetensors_header"] + t["config_json"] + t["preprocessor_config_json"]
    # the same from the stage-1 state would move the float scores instead of the bits
    prompt_bytes = sum(v for k, v in tensor_bytes.items() if k.startswith("prompt."))
    out["transfer_from_stage1_scores_bytes"] = 4 * n + prompt_bytes
    out["mask_bits_per_weight"] = 8 * mask_bytes / n

    # merged plain model (zeros), and the mask + kept values encoding
    mg = root / "merged"
    plain = model.merge_and_unload()
    plain.save_pretrained(mg)
    out["merged"] = {"files": folder_bytes(mg), "safetensors": (mg / "model.safetensors").stat().st_size,
                     "compressed": compressed_sizes(mg / "model.safetensors")}
    out["mask_and_values"] = {"safetensors": mask_and_values_file(model, root / "mask_and_values.safetensors")}
    out["mask_and_values"]["compressed"] = compressed_sizes(root / "mask_and_values.safetensors")

    if subnetwork_dir is not None:
        saved = PromptedSparseModel.from_pretrained(str(subnetwork_dir))
        st = subnetwork_dir / "model.safetensors"
        pruned_nonzero = 0
        masks = saved.sparsity.layer_masks()
        params = dict(saved.model.named_parameters())
        for name, m in masks.items():
            pruned_nonzero += int(((params[name] != 0) & (m == 0)).sum())
        mg2 = root / "run-merged"
        saved.merge_and_unload().save_pretrained(mg2)
        out["saved_run"] = {
            "dir": str(subnetwork_dir), "safetensors": st.stat().st_size, "compressed": compressed_sizes(st),
            "pruned_weights_stored_nonzero": pruned_nonzero, "pruned_weights": int(saved.sparsity_report()["pruned"]),
            "merged_safetensors": (mg2 / "model.safetensors").stat().st_size,
            "merged_compressed": compressed_sizes(mg2 / "model.safetensors"),
        }
    return out


def rows_for(r: dict) -> list[list]:
    dense = r["dense"]["safetensors"]

    def row(what, size, note=""):
        return [what, human_bytes(size), f"{100 * size / dense:.1f}%", note]

    def best(comp):
        k = min(comp, key=comp.get)
        return comp[k], k

    rows = [row("dense model (model.safetensors)", dense, "float32 weights"),
            row("  compressed", *best(r["dense"]["compressed"])),
            row("VPNs stage 1: scores + weights + prompt", r["stage1_scores"]["safetensors"],
                "a float32 score per prunable weight"),
            row("VPNs frozen subnetwork: 1-bit mask + weights + prompt", r["frozen_packed"]["safetensors"],
                "what save_pretrained writes after the search; pruned weights stored as zeros"),
            row("  compressed", *best(r["frozen_packed"]["compressed"])),
            row("transfer download (config + header + mask + prompt)", r["transfer"]["total"],
                f"mask {human_bytes(r['transfer']['tensors'].get('sparsity.mask_packed'))}, prompt "
                f"{human_bytes(sum(v for k, v in r['transfer']['tensors'].items() if k.startswith('prompt.')))}, "
                f"header {human_bytes(r['transfer']['safetensors_header'])}, config "
                f"{human_bytes(r['transfer']['config_json'] + r['transfer']['preprocessor_config_json'])}; "
                "+ the pretrained base"),
            row("  the mask alone, compressed", *best(r["transfer"]["mask_compressed"])),
            row("  same transfer from the stage-1 scores", r["transfer_from_stage1_scores_bytes"], "float32 scores"),
            row("merged plain model, zeros baked in (merge_and_unload)", r["merged"]["safetensors"],
                "dense layout" + ("; the label mapping folds the 1000-way head to the mapped classes"
                                  if r.get("label_mapping") else "")),
            row("  compressed", *best(r["merged"]["compressed"])),
            row("mask + kept values only (safetensors)", r["mask_and_values"]["safetensors"],
                "bit mask + 10% of the pruned layers' values + unpruned tensors"),
            row("  compressed", *best(r["mask_and_values"]["compressed"]))]
    if "saved_run" in r:
        s = r["saved_run"]
        rows += [row("a real fine-tuned VPNs run folder (model.safetensors)", s["safetensors"],
                     f"{s['pruned_weights_stored_nonzero']:,} of {s['pruned_weights']:,} pruned weights "
                     "stored non-zero"),
                 row("  compressed", *best(s["compressed"])),
                 row("  its merged export, compressed", *best(s["merged_compressed"]))]
    return rows


def main(argv=None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--subnetwork", default=None,
                   help="a saved VPNs run folder to measure too (default: the full unstructured benchmark's 90%% "
                        "VPNs run, if present; 'none' to skip)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out_dir, work_dir = common.setup(args, NAME)
    env = common.environment(args)
    from transformers import ResNetConfig, ResNetForImageClassification

    from prompt_sparsity import PromptedSparseModel

    sub = None
    if args.subnetwork and args.subnetwork != "none":
        sub = Path(args.subnetwork)
    elif args.subnetwork is None and not args.quick:
        auto = common.ROOT / "outputs" / "benchmarks" / "unstructured_accuracy" / "runs" / "vpns-0p9-7"
        sub = auto if (auto / "model.safetensors").is_file() else None

    def lite0_base():
        m = PromptedSparseModel.from_base("efficientnet-lite0", sparsity=SPARSITY, prompt_method="pad", pad_size=4,
                                          input_size=48, output_size=48)
        m.set_label_mapping(list(range(10)))
        return m

    def lite0_dense(path):
        PromptedSparseModel.from_base("efficientnet-lite0", sparsity_type="none").model.save_pretrained(path)

    results_models = []
    common.progress("EfficientNet-Lite0")
    results_models.append(measure("EfficientNet-Lite0", lite0_base, work_dir, dense_saver=lite0_dense,
                                  subnetwork_dir=sub))
    if not args.quick:
        common.progress("ResNet-50 size")

        def r50():
            torch.manual_seed(0)
            return ResNetForImageClassification(ResNetConfig(num_labels=1000))

        def r50_base():
            return PromptedSparseModel.from_base(r50(), sparsity=SPARSITY, prompt_method="pad", pad_size=16,
                                                 input_size=224, output_size=224)

        results_models.append(measure("ResNet-50 size (random weights)", r50_base, work_dir,
                                      dense_saver=lambda path: r50().save_pretrained(path)))

    # ------------------------------------------------------------------ tables
    md = [f"# Artifact size at {100 * SPARSITY:.0f}% sparsity ({env['mode']} mode)", ""]
    for r in results_models:
        prompt_desc = ("pad prompt 4 px at 48 px" if "Lite0" in r["model"] else "pad prompt 16 px at 224 px")
        md += [f"## {r['model']}", "", common.settings_block(
            env,
            model=f"{r['model']}: {r['total_params']:,} parameters, {r['prunable_weights']:,} prunable "
                  f"(every Conv2d/Linear), {100 * r['sparsity']:.2f}% of them pruned (global threshold on the "
                  f"scaled-magnitude initial scores), {prompt_desc} ({r['prompt_params']:,} values)",
            sizes="bytes on disk; '%' is relative to the dense model.safetensors; compressed = the best of gzip -6, "
                  "xz -6" + (", zstd -19" if shutil.which("zstd") else "") + " (named in the note column)",
            epochs_and_seeds="not applicable (no training; torch seed 0)",
        ), "", markdown_table(["artifact", "bytes", "% of dense", "note"], rows_for(r), align="lrrl"), ""]
    lite = results_models[0]
    dense_bytes = lite["dense"]["safetensors"]
    findings = [
        f"Lite0: the frozen subnetwork file is {100 * lite['frozen_packed']['safetensors'] / dense_bytes:.1f}% "
        f"of the dense file (dense weights + a {lite['mask_bits_per_weight']:.2f}-bit-per-weight mask + prompt); the "
        f"stage-1 file with float scores is {100 * lite['stage1_scores']['safetensors'] / dense_bytes:.0f}%.",
        f"A transfer moves {human_bytes(lite['transfer']['total'])} "
        f"({100 * lite['transfer']['total'] / lite['dense']['safetensors']:.1f}% of the dense model) on top of the "
        f"pretrained base, which it needs anyway.",
        f"The zeros compress: the frozen file (pruned weights stored as zeros) compresses to "
        f"{100 * min(lite['frozen_packed']['compressed'].values()) / lite['dense']['safetensors']:.0f}% of dense; merged + "
        f"{min(lite['merged']['compressed'], key=lite['merged']['compressed'].get)} = "
        f"{human_bytes(min(lite['merged']['compressed'].values()))} "
        f"({100 * min(lite['merged']['compressed'].values()) / lite['dense']['safetensors']:.0f}% of dense), mask + "
        f"kept values = {human_bytes(lite['mask_and_values']['safetensors'])} "
        f"({100 * lite['mask_and_values']['safetensors'] / lite['dense']['safetensors']:.0f}%), the smallest uncompressed "
        f"encoding.",
        "Size is not speed: unstructured zeros are multiplied like any other weight by dense kernels.",
    ]
    if len(results_models) > 1:
        r = results_models[1]
        findings.append(f"ResNet-50 size ({r['prunable_weights'] / 1e6:.1f}M prunable weights): mask "
                        f"{human_bytes(r['transfer']['tensors']['sparsity.mask_packed'])} vs dense "
                        f"{human_bytes(r['dense']['safetensors'])}; transfer download "
                        f"{human_bytes(r['transfer']['total'])}.")
    md += ["## Findings", ""] + [f"- {f}" for f in findings]
    markdown = "\n".join(md) + "\n"

    # ------------------------------------------------------------------ plot
    fig, axes = common.figure(len(results_models), width=6.5, height=4.6)
    for ax, r in zip(axes, results_models):
        items = [("dense", r["dense"]["safetensors"]), ("dense\ncompr.", min(r["dense"]["compressed"].values())),
                 ("stage 1\nscores", r["stage1_scores"]["safetensors"]),
                 ("frozen\nmask", r["frozen_packed"]["safetensors"]),
                 ("merged\ncompr.", min(r["merged"]["compressed"].values())),
                 ("mask +\nvalues", r["mask_and_values"]["safetensors"]),
                 ("transfer\ndownload", r["transfer"]["total"])]
        bars = ax.bar(range(len(items)), [v for _, v in items],
                      color=["C7", "C7", "C1", "C0", "C2", "C2", "C3"])
        for b, (_, v) in zip(bars, items):
            ax.text(b.get_x() + b.get_width() / 2, v, human_bytes(v), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([k for k, _ in items], fontsize=8)
        ax.set_ylabel("bytes (log scale)")
        ax.set_title(f"{r['model']}, {100 * SPARSITY:.0f}% sparsity", fontsize=10)

    results = {"benchmark": NAME, "environment": env, "sparsity": SPARSITY, "models": results_models,
               "findings": findings}
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
