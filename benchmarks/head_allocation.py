"""Where the kept weights go: the 1000-way pretrained head under a label mapping, per unstructured method.

With FLM (VPNS.md §5) the EfficientNet-Lite0 head keeps its 1000 ImageNet rows, but only the rows of the mapped
classes (10 for Fashion-MNIST) can change an output: the other 990 rows are 27% of Lite0's prunable weights and
pruning them is free. A global threshold on magnitude-like scores (OMP, HYDRA's and VPNs' scaled init) does not
know that; a gradient-based one (SNIP, SynFlow through the mapped logits) scores them 0 and prunes them first.
This script reads the saved run folders of `unstructured_accuracy.py` (no training; seconds per run) and reports
for each method and sparsity: the share of the mapped rows' weights that was kept, the sparsity of the weights that
can act (the mapped rows + every other pruned layer), and the test accuracy beside them.

    python benchmarks/head_allocation.py            # reads outputs/benchmarks/unstructured_accuracy/runs
    python benchmarks/head_allocation.py --runs-dir outputs/benchmarks/unstructured_accuracy-quick/runs --quick

Writes head_allocation.json/.png/.md to benchmarks/results[/quick].
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import common
from common import DISPLAY, fmt_ms, markdown_table, mean_std

NAME = "head_allocation"


def analyse(run_dir: Path) -> dict | None:
    """The head allocation of one saved unstructured run folder (None when it is not one)."""
    from prompt_sparsity import PromptedSparseModel

    results_path = run_dir / "results.json"
    if not (run_dir / "model.safetensors").is_file() or not results_path.is_file():
        return None
    with open(results_path) as f:
        results = json.load(f)
    if results.get("method") == "dense":
        return None
    model = PromptedSparseModel.from_pretrained(str(run_dir))
    if model.sparsity is None or model.config.label_mapping is None:
        return None
    masks = dict(model.sparsity.layer_masks())
    # the pretrained head is the base model's last Linear; when the run excluded it from pruning it counts as kept
    head_name = [f"{n}.weight" for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    head_pruned = head_name in masks
    if not head_pruned:
        masks[head_name] = torch.ones_like(dict(model.model.named_parameters())[head_name], dtype=torch.bool)
    head_mask = masks[head_name]
    mapped = torch.zeros(head_mask.shape[0], dtype=torch.bool)
    mapped[torch.tensor(model.config.label_mapping)] = True
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    unused = int((~mapped).sum()) * head_mask.shape[1]
    kept_unused = int(head_mask[~mapped].sum())
    kept_mapped = int(head_mask[mapped].sum())
    mapped_total = int(mapped.sum()) * head_mask.shape[1]
    body_total = total - head_mask.numel()
    body_kept = kept - int(head_mask.sum())
    acting_total = total - unused
    acting_kept = kept - kept_unused
    accuracy = (results.get("accuracy") or {}).get("test") or {}
    return {
        "run_dir": str(run_dir), "method": results.get("method"), "seed": results.get("seed"),
        "sparsity_target": results.get("sparsity_target"), "exclude": (results.get("args") or {}).get("exclude_modules"),
        "head": head_name, "head_pruned": head_pruned, "head_rows": head_mask.shape[0], "mapped_rows": int(mapped.sum()),
        "conv_linear_weights": total, "kept": kept, "sparsity": 1 - kept / total,
        "unused_rows_share_of_prunable": unused / total,
        "mapped_rows_kept": kept_mapped / mapped_total, "unused_rows_kept": kept_unused / unused,
        "share_of_kept_in_unused_rows": kept_unused / kept,
        "body_sparsity": 1 - body_kept / body_total,
        "acting_sparsity": 1 - acting_kept / acting_total,
        "test_prompt": accuracy.get("test_accuracy_prompt"), "test_no_prompt": accuracy.get("test_accuracy_no_prompt"),
    }


def main(argv=None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--runs-dir", action="append", default=None,
                   help="a folder of run folders (repeatable; default: the full unstructured benchmark's runs)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out_dir, _ = common.setup(args, NAME)
    env = common.environment(args)
    dirs = [Path(d) for d in (args.runs_dir or [common.ROOT / "outputs" / "benchmarks" / "unstructured_accuracy" / "runs"])]
    rows = []
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"--runs-dir {d}: not a folder; run benchmarks/unstructured_accuracy.py first.")
        for run in sorted(d.iterdir()):
            r = analyse(run)
            if r is not None:
                common.progress(f"{run.name}: mapped rows kept {100 * r['mapped_rows_kept']:.1f}%")
                rows.append(r)
    if not rows:
        raise SystemExit(f"no saved unstructured run with a label mapping under {', '.join(map(str, dirs))}.")

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], r["sparsity_target"], ",".join(r["exclude"] or []))
        groups.setdefault(key, []).append(r)
    summary = []
    for (method, level, exclude), rs in groups.items():
        summary.append({"method": method, "sparsity_target": level, "exclude_modules": exclude,
                        "seeds": [r["seed"] for r in rs],
                        **{k: mean_std(r[k] for r in rs) for k in (
                            "sparsity", "mapped_rows_kept", "unused_rows_kept", "share_of_kept_in_unused_rows",
                            "body_sparsity", "acting_sparsity", "test_prompt", "test_no_prompt")}})
    order = list(DISPLAY)
    summary.sort(key=lambda s: (s["exclude_modules"], s["sparsity_target"] or 0,
                                order.index(s["method"]) if s["method"] in order else 99))

    first = rows[0]
    settings = common.settings_block(
        env,
        model=f"EfficientNet-Lite0, pretrained {first['head_rows']}-way head `{first['head']}` with FLM onto "
              f"{first['mapped_rows']} classes; the {first['head_rows'] - first['mapped_rows']} unused rows are "
              f"{100 * first['unused_rows_share_of_prunable']:.1f}% of the prunable weights",
        runs="the saved run folders under " + ", ".join(f"`{d}`" for d in dirs)
             + " (their settings are in the unstructured accuracy table)",
    )
    headers = ["method", "target", "pruning excludes", "sparsity of all Conv2d/Linear weights", "mapped head rows kept %",
               "unused head rows kept %", "kept weights that cannot act %", "sparsity of weights that can act",
               "test acc % (headline)"]
    table = []
    for s in summary:
        acc = s["test_prompt"] if s["test_prompt"]["mean"] is not None else s["test_no_prompt"]
        table.append([DISPLAY.get(s["method"], s["method"]), f"{100 * s['sparsity_target']:.0f}%",
                      s["exclude_modules"] or "–", fmt_ms(s["sparsity"], 1, 100) + "%",
                      fmt_ms(s["mapped_rows_kept"], 1, 100), fmt_ms(s["unused_rows_kept"], 2, 100),
                      fmt_ms(s["share_of_kept_in_unused_rows"], 1, 100), fmt_ms(s["acting_sparsity"], 1, 100) + "%",
                      fmt_ms(acc)])

    findings = []
    for level in sorted({s["sparsity_target"] for s in summary if not s["exclude_modules"]}):
        at = [s for s in summary if s["sparsity_target"] == level and not s["exclude_modules"]]
        ranked = sorted(at, key=lambda s: -s["mapped_rows_kept"]["mean"])
        findings.append(f"At {100 * level:.0f}%: mapped head rows kept — " + ", ".join(
            f"{DISPLAY.get(s['method'], s['method'])} {100 * s['mapped_rows_kept']['mean']:.1f}%" for s in ranked) + ".")
    findings.append("A method that keeps weights in the unused rows spends its budget on weights that cannot change "
                    "an output, and a method that prunes the mapped rows starves the classes it must predict; the "
                    "'sparsity of weights that can act' column is the sparsity the network really runs at.")

    md = [f"# Head allocation under the label mapping ({env['mode']} mode)", "", settings, "",
          markdown_table(headers, table), "", "## Findings", ""] + [f"- {f}" for f in findings]
    markdown = "\n".join(md) + "\n"

    fig, (ax,) = common.figure(1, width=7.0, height=4.2)
    plain = [s for s in summary if not s["exclude_modules"]]
    levels = sorted({s["sparsity_target"] for s in plain})
    methods = [m for m in order if any(s["method"] == m for s in plain)]
    width = 0.8 / max(1, len(levels))
    for j, level in enumerate(levels):
        vals = [next((100 * s["mapped_rows_kept"]["mean"] for s in plain
                      if s["method"] == m and s["sparsity_target"] == level), 0.0) for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], vals, width, label=f"{100 * level:.0f}% sparsity")
    ax.set_xticks([i + width * (len(levels) - 1) / 2 for i in range(len(methods))])
    ax.set_xticklabels([DISPLAY.get(m, m) for m in methods], fontsize=8)
    ax.set_ylabel("weights of the mapped head rows kept (%)")
    ax.set_title("EfficientNet-Lite0 → Fashion-MNIST with FLM: what the global threshold leaves the 10 mapped rows",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    results = {"benchmark": NAME, "environment": env, "runs_dirs": [str(d) for d in dirs], "summary": summary,
               "runs": rows, "findings": findings}
    common.finish(NAME, out_dir, results, markdown, fig, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
