"""`training_curves.png`, written by every run beside results.json: accuracy and loss per epoch for each stage, the
mask dynamics of a search (flipped fraction and overlap with its start, per epoch), and the subnetwork's shape
(per-layer density, or kept channels per unit)."""

from __future__ import annotations

import os
from typing import Any

CURVES_FILE = "training_curves.png"


def write_training_curves(output_dir: str, results: dict[str, Any]) -> str:
    """Plot a run's `results` (its `history`, `layer_sparsity` or `channel_widths`) into
    `output_dir/training_curves.png` and return the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or under accelerate launch
    import matplotlib.pyplot as plt

    history = results.get("history") or []
    x = list(range(1, len(history) + 1))
    searched = any("mask_flip_fraction" in h for h in history)  # a panel only for runs that searched a mask
    fig, axes = plt.subplots(1, 4 if searched else 3, figsize=(20 if searched else 15, 4))
    ax_acc, ax_loss, ax_shape = axes[0], axes[1], axes[-1]
    labels = [f"{h['kind']} {h['epoch'] + 1}" for h in history]
    for key, style in (("validation_accuracy_prompt", "-o"), ("validation_accuracy_no_prompt", "--o")):
        points = [(i, h[key]) for i, h in zip(x, history) if key in h]
        if points:
            ax_acc.plot(*zip(*points), style, label=key.replace("validation_accuracy_", "validation, ").replace("_", " "))
    ax_acc.set(title="validation accuracy per epoch", ylabel="top-1 %", xlabel="stage, epoch")
    losses = [(i, h["train_loss"]) for i, h in zip(x, history) if "train_loss" in h]
    if losses:
        ax_loss.plot(*zip(*losses), "-o", color="C3")
    ax_loss.set(title="training loss per epoch", ylabel="loss", xlabel="stage, epoch")
    curves = [ax_acc, ax_loss]
    if searched:
        _plot_mask_dynamics(axes[2], x, history)
        curves.append(axes[2])
    for ax in curves:
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7) if x else None
        _mark_stages(ax, history)
        ax.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    _plot_shape(ax_shape, results)
    fig.suptitle(f"{results.get('name', '')}: {results.get('method', '')} on {results.get('dataset', '')}")
    fig.tight_layout()
    path = os.path.join(output_dir, CURVES_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mark_stages(ax, history) -> None:
    """A vertical line where one stage ends and the next begins."""
    for i in range(1, len(history)):
        if history[i]["stage"] != history[i - 1]["stage"]:
            ax.axvline(i + 0.5, color="grey", linewidth=0.8, linestyle=":")


def _plot_mask_dynamics(ax, x, history) -> None:
    """Per search epoch: the fraction of the mask that flipped in it, and the overlap (Jaccard) with the start mask;
    on the same stage/epoch axis as the accuracy and the loss."""
    for key, style, label in (("mask_flip_fraction", "-o", "flipped this epoch"),
                              ("mask_overlap_with_start", "--s", "overlap with the start mask")):
        points = [(i, h[key]) for i, h in zip(x, history) if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(title="mask dynamics per search epoch", ylabel="fraction of the mask", xlabel="stage, epoch",
           ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)


def _plot_shape(ax, results) -> None:
    widths = results.get("channel_widths")
    layers = results.get("layer_sparsity") or {}
    if widths:  # structured: channels kept per unit
        items = list(widths.items()) if isinstance(widths, dict) else list(enumerate(widths))
        ax.bar(range(len(items)), [v if isinstance(v, (int, float)) else sum(v) for _, v in items], color="C2")
        ax.set(title="kept channels per unit", ylabel="channels", xlabel="unit (forward order)")
    elif layers:
        ax.bar(range(len(layers)), [100 * (1 - v) for v in layers.values()], color="C2")
        ax.set(title="density per layer (kept weights)", ylabel="% kept", xlabel="layer (forward order)",
               ylim=(0, 100))
    else:
        ax.set_title("dense model (nothing pruned)")
    ax.grid(alpha=0.3, axis="y")
