"""Depgraph channel units on full-size architectures without a hand-written rule: how many units Torch-Pruning's
dependency graph yields, how long discovery takes, and how much of the FLOPs the units can remove.

Random weights (structure only; nothing is downloaded), one thread, one (1, 3, 224, 224) zero image traced.
Columns: units found, their channels, discovery seconds (trace included), dense GFLOPs (2 x MACs of conv/linear),
then the FLOPs left when every unit keeps half of its channels and when every unit keeps one channel (the floor
PASS can reach with these units; what stays is in residual streams, grouped convs, concatenations or the head).

    python benchmarks/depgraph_coverage.py     # ~1 min on 2 CPU cores

Prints a markdown table and writes it to benchmarks/results/depgraph_coverage.md (with the machine and commit).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch


def main() -> None:
    import timm
    from transformers import (
        MobileNetV1Config,
        MobileNetV1ForImageClassification,
        RegNetConfig,
        RegNetForImageClassification,
        TimmWrapperConfig,
        TimmWrapperForImageClassification,
    )

    from prompt_sparsity.sparsity.channels import find_channel_units
    from prompt_sparsity.sparsity.flops import FlopsModel

    torch.set_num_threads(1)
    size = 224
    models = {
        "transformers RegNet (RegNetConfig() defaults, groups_width=64)": lambda: RegNetForImageClassification(
            RegNetConfig()),
        "transformers MobileNetV1 (MobileNetV1Config() defaults, 1.0x)": lambda: MobileNetV1ForImageClassification(
            MobileNetV1Config()),
        "timm resnet50 in TimmWrapperForImageClassification": lambda: TimmWrapperForImageClassification(
            TimmWrapperConfig(architecture="resnet50", num_labels=1000)),
        "timm densenet121": lambda: timm.create_model("densenet121"),
    }
    lines = ["| model | units | channels | discovery s | dense GFLOPs | FLOPs at half of every unit | floor (1 channel "
             "per unit) |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, build in models.items():
        model = build().eval()
        start = time.perf_counter()
        units = find_channel_units(model, "auto", size)
        seconds = time.perf_counter() - start
        fm = FlopsModel(model, size, units)

        def keep(k):
            return [torch.zeros(u.num_channels).index_fill_(0, torch.arange(max(1, k(u.num_channels))), 1.0)
                    for u in units]

        half = fm.flops(keep(lambda c: c // 2)) / fm.dense_flops
        floor = fm.flops(keep(lambda c: 1)) / fm.dense_flops
        lines.append(f"| {name} | {len(units)} | {sum(u.num_channels for u in units)} | {seconds:.1f} | "
                     f"{fm.dense_flops / 1e9:.2f} | {100 * half:.1f}% | {100 * floor:.1f}% |")
        print(lines[-1], flush=True)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "depgraph_coverage.md")
    header = ["# Depgraph channel units on full-size architectures", "",
              f"**Machine:** {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
              f"random weights, one (1, 3, {size}, {size}) zero image traced; commit {_commit()}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(header + lines) + "\n")
    os.replace(tmp, path)  # atomic: never a half-written results file
    print(f"wrote {path}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
