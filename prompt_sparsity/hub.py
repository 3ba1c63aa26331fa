"""Push saved subnetworks to the Hugging Face Hub with a generated model card, and pull them back by repo id.

A saved subnetwork is a folder written by `PromptedSparseModel.save_pretrained` (and, after a run, by
`prompt_sparsity.training`): `config.json`, `model.safetensors`, `preprocessor_config.json` and, for a run,
`results.json`. This module never writes into that folder.

- `render_model_card(output_dir)`: the model card (YAML front matter + Markdown) from `config.json` and, if present,
  `results.json`, filled into the template `model_cards/subnetwork.md`.
- `push_subnetwork(output_dir, repo_id)`: one commit with the subnetwork files and the card (the card only when the
  repo has no README.md yet, unless `overwrite_card=True`). Failures raise `HubPushError`, which says that the local
  folder is intact.
- `push_model(model, repo_id)`: save an in-memory model (and an optional results dict) to a temporary folder, then
  `push_subnetwork`; `PromptedSparseModel.push_to_hub` calls it.
- `download_subnetwork(repo_id_or_path)`: the files of a subnetwork in the local HF cache (or a local folder as is).
- `download_tensors(repo_id, names)`: only the named tensors of `model.safetensors` (e.g. the 1-bit mask and the
  prompt), read with HTTP range requests: the safetensors header says where each tensor's bytes lie.

Structured results (PASS and channel baselines, `PruningRun.structured_results`) add these keys to
`results.json`; the card renders them when present:

    "flops": 0.9e9, "dense_flops": 1.8e9, "flops_ratio": 0.5, "flops_target": 0.5,
    "params": 5.2e6, "dense_params": 11.7e6,
    "latency": {"device": "cpu", "threads": 4, "warmup": 3, "repeats": 15,
                "batch_1": {"dense": {"median_ms": 12.0, ...}, "compact": {"median_ms": 7.0, ...}, "speedup": 1.71},
                "batch_64": {...}}

(`flops` / `params` may also be `{"dense": .., "pruned": ..}` dicts, `flops_ratio` a `{"target", "achieved"}`
dict, and a latency entry may give `dense_ms` / `pruned_ms` numbers.)
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from .methods import display_name

logger = logging.getLogger(__name__)

__all__ = [
    "HubPushError",
    "render_model_card",
    "push_subnetwork",
    "push_model",
    "download_subnetwork",
    "download_tensors",
    "SUBNETWORK_FILES",
]

#: Files of a saved subnetwork that are pushed (when present); anything else in the folder (checkpoints/,
#: logs, trainer state) stays local.
SUBNETWORK_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "results.json")
_METADATA_FILES = ("config.json", "preprocessor_config.json", "results.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
_CARD = "README.md"
_SAFETENSORS = "model.safetensors"

_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "subnetwork.md"
# Used only when the package is installed without the repository's model_cards/ folder.
_FALLBACK_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Results

{{ results_table }}

{{ efficiency }}

## How to use

```python
import prompt_sparsity
from prompt_sparsity import PromptedSparseModel

model = PromptedSparseModel.from_pretrained("{{ repo_id }}")
```

`pipeline("image-classification", model="{{ repo_id }}")` works after `import prompt_sparsity`.

## Speed and storage

{{ speed_note }}

## Details

{{ details }}
"""

# The built-in offline data sets and the Hub data sets they are copies of (for the card's `datasets:`).
_HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "mnist": "ylecun/mnist"}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class HubPushError(RuntimeError):
    """A push to the Hub failed. The message names the repo and the cause and says that the local files are intact;
    `repo_id`, `output_dir` and `__cause__` (the original exception) are kept for programs."""

    def __init__(self, message: str, repo_id: str, output_dir: str | None):
        super().__init__(message)
        self.repo_id = repo_id
        self.output_dir = output_dir


# ================================================================================================ model card
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_hub_id(name: str | None) -> bool:
    """`org/name` that is neither an existing local path nor a built-in model name."""
    if not name or not isinstance(name, str) or os.path.exists(name):
        return False
    return name not in _builtin_models() and bool(_REPO_ID_RE.match(name)) and ".." not in name


def _builtin_models() -> dict:
    try:
        from .pretrained import BUILTIN_MODELS
    except Exception:  # pragma: no cover - keep the card independent of optional pieces
        return {}
    return BUILTIN_MODELS


def _pct(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def _num(value: Any) -> str:
    """A compact human number: 11689512 -> 11.69M, 1.8e9 -> 1.80G, 0.4971 -> 0.497."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    v = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    if isinstance(value, int) or v.is_integer():
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def _md(text: Any) -> str:
    """A value made safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio_value(ratio: Any) -> float | None:
    """The achieved FLOPs ratio from a number or a dict (`achieved` / `ratio` / `actual` / `value`, else `target`)."""
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        return float(ratio)
    if isinstance(ratio, Mapping):
        for key in ("achieved", "ratio", "actual", "value", "measured", "target"):
            if isinstance(ratio.get(key), (int, float)):
                return float(ratio[key])
    return None


def _dense_pruned(results: Mapping, key: str) -> tuple[Any, Any]:
    """(dense, pruned) of `results[key]`: a number (dense in `dense_<key>`) or a `{"dense", "pruned"}` dict."""
    d = results.get(key)
    if isinstance(d, Mapping):
        dense = next((d[k] for k in ("dense", "original", "base") if k in d), None)
        pruned = next((d[k] for k in ("pruned", "compact", "sparse", "subnetwork") if k in d), None)
        return dense, pruned
    return results.get(f"dense_{key}"), d


def _ms(value: Any) -> float | None:
    """A latency in ms from a number or a `{"median_ms": ..}` entry."""
    if isinstance(value, Mapping):
        value = next((value[k] for k in ("median_ms", "ms", "mean_ms") if k in value), None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _latency_runs(latency: Mapping) -> list[dict]:
    """Normalise the accepted latency layouts (see the module docstring) into a list of runs."""
    if isinstance(latency.get("runs"), list):
        return [dict(r) for r in latency["runs"] if isinstance(r, Mapping)]
    runs = []
    for key, value in latency.items():
        if isinstance(value, Mapping):
            run = dict(value)
            m = re.search(r"(\d+)", str(key))
            if "batch_size" not in run and m and "batch" in str(key).lower():
                run["batch_size"] = int(m.group(1))
            run.setdefault("_label", str(key))
            runs.append(run)
    if not runs and any(k.endswith("_ms") or k in ("speedup", "speed_up") for k in latency):
        runs = [dict(latency)]
    return runs


def _latency_table(latency: Mapping) -> str:
    runs = _latency_runs(latency)
    if not runs:
        return "\n".join(f"- {_md(k)}: {_md(v)}" for k, v in latency.items())
    device = latency.get("device")
    threads = latency.get("threads", latency.get("torch_threads"))
    rows = []
    for r in runs:
        dense = next((_ms(r[k]) for k in ("dense_ms", "dense") if k in r), None)
        pruned = next((_ms(r[k]) for k in ("pruned_ms", "compact_ms", "sparse_ms", "compact", "pruned") if k in r),
                      None)
        speedup = r.get("speedup", r.get("speed_up"))
        if speedup is None and dense and pruned:
            speedup = dense / pruned
        rows.append([
            str(r.get("device", device) or "–"),
            str(r.get("threads", threads) or "–"),
            str(r.get("batch_size", r.get("_label", "–"))),
            _pct(dense) if dense is not None else "–",
            _pct(pruned) if pruned is not None else "–",
            f"{float(speedup):.2f}×" if isinstance(speedup, (int, float)) else "–",
        ])
    out = _table(["device", "threads", "batch size", "dense (ms)", "pruned (ms)", "speed-up"], rows)
    how = []
    if latency.get("repeats"):
        how.append(f"median of {latency['repeats']} timed forward passes")
    if latency.get("warmup"):
        how.append(f"after {latency['warmup']} warm-up passes")
    if how:
        out += "\n\n" + " ".join(how).capitalize() + ", dense and pruned models measured round-robin."
    return out


def _accuracies(results: Mapping) -> dict[str, dict[str, float]]:
    """`{"test": {"accuracy_prompt": .., "top5_accuracy_no_prompt": ..}, "validation": {...}}` from results.json."""
    out: dict[str, dict[str, float]] = {}
    for split, values in (results.get("accuracy") or {}).items():
        if not isinstance(values, Mapping):
            continue
        out[split] = {k[len(split) + 1:] if k.startswith(split + "_") else k: v for k, v in values.items()
                      if isinstance(v, (int, float))}
    return out


def _card_values(config: Mapping, results: Mapping | None, repo_id: str | None, folder_name: str) -> dict[str, str]:
    from huggingface_hub import EvalResult, ModelCardData

    results = dict(results or {})
    sparsity_type = config.get("sparsity_type", "unstructured")
    structured = sparsity_type == "structured"
    method = str(results["method"]) if results.get("method") else None
    method_name = display_name(method) if method else None
    base = config.get("base_model_name_or_path") or results.get("model")
    base_is_hub = _is_hub_id(base)
    base_config = config.get("base_config") or {}
    arch = ", ".join(base_config.get("architectures") or []) or base_config.get("model_type") or "image classifier"
    dataset = results.get("dataset")
    dataset_id = _HUB_DATASETS.get(dataset, dataset) if dataset else None
    dataset_is_hub = _is_hub_id(dataset_id)
    sparsity = results.get("sparsity", config.get("sparsity"))
    ratio = _ratio_value(results.get("flops_ratio"))
    ratio_target = results.get("flops_target")
    if ratio_target is None and isinstance(results.get("flops_ratio"), Mapping):
        ratio_target = results["flops_ratio"].get("target")
    if ratio_target is None and structured:
        ratio_target = config.get("flops_ratio")
    compacted = bool(config.get("channel_widths"))
    prompt_on = config.get("prompt_method", "none") != "none"
    model_name = (repo_id.split("/")[-1] if repo_id else None) or results.get("name") or folder_name
    num_labels = len(config.get("id2label") or {}) or results.get("num_labels")
    accs = _accuracies(results)
    eval_split = "test" if "test" in accs else next(iter(accs), None)

    # ---------------------------------------------------------------- front matter (YAML written by huggingface_hub)
    tags = ["prompt-sparsity", "pruning", method, sparsity_type if sparsity_type != "none" else "dense",
            "image-classification"]
    if prompt_on:
        tags.append("visual-prompting")
    tags = list(dict.fromkeys(t for t in tags if t))
    eval_results = []
    if eval_split is not None:
        common = dict(task_type="image-classification", task_name="Image Classification",
                      dataset_type=dataset_id or "unknown", dataset_name=str(dataset or "unknown"),
                      dataset_split=eval_split)
        a = accs[eval_split]
        for key, label in (("accuracy_prompt", "with prompt"), ("accuracy_no_prompt", "without prompt")):
            if key in a:
                eval_results.append(EvalResult(metric_type="accuracy", metric_value=round(float(a[key]), 4),
                                               metric_name=f"Top-1 accuracy (%) {label}", **common))
        if structured and ratio is not None:
            eval_results.append(EvalResult(metric_type="flops_ratio", metric_value=round(ratio, 4),
                                           metric_name="FLOPs ratio (pruned / dense)", **common))
        elif not structured and sparsity is not None:
            eval_results.append(EvalResult(metric_type="sparsity", metric_value=round(100 * float(sparsity), 4),
                                           metric_name="Weight sparsity (%)", **common))
    builtin = _builtin_models().get(base) if base and not base_is_hub else None
    license_ = (builtin or {}).get("license")
    card_data = ModelCardData(
        library_name="prompt-sparsity",
        license=license_,
        tags=tags,
        base_model=base if base_is_hub else None,
        datasets=[dataset_id] if dataset_is_hub else None,
        metrics=["accuracy"] if eval_results else None,
        pipeline_tag="image-classification",
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )

    # ---------------------------------------------------------------- body
    if structured:
        kept = ratio if ratio is not None else ratio_target
        what = (f"a channel-pruned (structured) subnetwork keeping {100 * float(kept):.1f}% of the FLOPs"
                if kept is not None else "a channel-pruned (structured) subnetwork")
    elif sparsity_type == "unstructured":
        what = f"an unstructured sparse subnetwork ({100 * float(sparsity or 0):.1f}% of the prunable weights are zero)"
    else:
        what = "a dense model"
    if base_is_hub:
        base_txt = f"[`{base}`](https://huggingface.co/{base})"
    elif builtin is not None:
        base_txt = f"`{base}` (a built-in model of prompt-sparsity)"
    else:
        base_txt = f"`{base}`" if base else "a base model"
    on = f" on `{dataset}`" if dataset else ""
    summary = (f"{what[0].upper()}{what[1:]} of {base_txt} ({arch})"
               + (f", found with **{method_name}**{on}" if method_name else on)
               + (f", with a learned visual prompt (`{config.get('prompt_method')}`)" if prompt_on else "")
               + f". {num_labels or '?'} classes.")

    # results table
    cols_acc = []
    for split in ("test", "validation"):
        if split in accs:
            cols_acc.append((split, "accuracy", f"top-1 {split} (%)"))
            if any(k.startswith("top5_accuracy") for k in accs[split]):
                cols_acc.append((split, "top5_accuracy", f"top-5 {split} (%)"))
    flops_dense, flops_pruned = _dense_pruned(results, "flops")
    params_dense, params_pruned = _dense_pruned(results, "params")
    header = ["model", "weights pruned" if not structured else "FLOPs ratio"]
    if results.get("flops") is not None:
        header.append("FLOPs")
    if results.get("params") is not None:
        header.append("params")
    header += [c[2] for c in cols_acc]

    def row(label, prune_cell, flops, params, acc_of):
        r = [label, prune_cell]
        if results.get("flops") is not None:
            r.append(_num(flops) if flops is not None else "–")
        if results.get("params") is not None:
            r.append(_num(params) if params is not None else "–")
        r += [acc_of(split, metric) for split, metric, _ in cols_acc]
        return r

    rows = []
    dense_ref = results.get("dense_pretrained_flm")
    if isinstance(dense_ref, Mapping):
        rows.append(row("dense pretrained + FLM (no training, no prompt)", "0%" if not structured else "1.00",
                        flops_dense, params_dense,
                        lambda split, metric: _pct(dense_ref.get(metric)) if split == "test" else "–"))
    prune_cell = (f"{ratio:.3f}" if ratio is not None else (
        f"{float(ratio_target):.3f} (target)" if ratio_target is not None else "–")) if structured else (
        f"{100 * float(sparsity):.1f}%" if sparsity is not None else "–")
    modes = [("prompt", "with prompt"), ("no_prompt", "without prompt")]
    for tag, label in modes:
        if any(f"accuracy_{tag}" in accs[s] for s in accs):
            rows.append(row(f"{method_name or 'subnetwork'}, {label}", prune_cell, flops_pruned, params_pruned,
                            lambda split, metric, tag=tag: _pct(accs.get(split, {}).get(f"{metric}_{tag}"))))
    if not rows:
        rows.append(row(method_name or "this subnetwork", prune_cell, flops_pruned, params_pruned, lambda s, m: "–"))
        results_table = _table(header, rows) + "\n\nNo accuracy was recorded with this checkpoint (no results.json)."
    else:
        n_test = (results.get("samples") or {}).get("test")
        notes = []
        if n_test:
            notes.append(f"Test accuracy over {n_test} images"
                         + (f" at {results['input_size']} px." if results.get("input_size") else "."))
        if isinstance(dense_ref, Mapping):
            notes.append("The dense row is the pretrained model with frequency label mapping (FLM) and no "
                         "training: a floor, not a fine-tuned dense baseline.")
        results_table = _table(header, rows) + ("\n\n" + " ".join(notes) if notes else "")

    efficiency_parts = []
    if structured and (ratio is not None or flops_pruned is not None or params_pruned is not None):
        facts = []
        if ratio is not None:
            facts.append(f"FLOPs ratio (pruned / dense) {ratio:.3f}"
                         + (f" for a target of {float(ratio_target):.3f}" if ratio_target is not None else ""))
        if flops_pruned is not None:
            facts.append(f"{_num(flops_pruned)} FLOPs" + (f" vs {_num(flops_dense)} FLOPs dense"
                                                        if flops_dense is not None else "")
                         + f" (torch FlopCounterMode, one {config.get('output_size', '?')} px image)")
        if params_pruned is not None:
            facts.append(f"{_num(params_pruned)} parameters" + (f" vs {_num(params_dense)} dense"
                                                                if params_dense is not None else ""))
        efficiency_parts.append("### Cost\n\n" + "; ".join(facts) + ".")
    if isinstance(results.get("latency"), Mapping):
        efficiency_parts.append("### Measured latency\n\n" + _latency_table(results["latency"]))
    efficiency = "\n\n".join(efficiency_parts)

    if structured:
        speed_note = (
            "Channels were **physically removed**: the model is a smaller dense network, so ordinary dense kernels "
            "run less work and it is really faster and smaller. The FLOPs ratio is the upper bound of the "
            "speed-up; the measured latency (above, when recorded) is what you actually get on that device, "
            "batch size and thread count — small batches on CPU often gain less than the FLOPs ratio."
        )
        if not isinstance(results.get("latency"), Mapping):
            speed_note += " No latency was measured for this checkpoint."
        if not compacted:
            speed_note = ("This checkpoint is **not compacted yet** (no `channel_widths` in its config): it holds the "
                          "channel-search state and runs at dense cost. Compact it (`model.compact()`) to get the "
                          "smaller, faster network.")
    elif sparsity_type == "unstructured":
        speed_note = (
            "This is **unstructured** sparsity: individual weights are zero, the tensors keep their dense shapes. "
            "Dense kernels (PyTorch convolutions and matrix products on CPU or GPU) do the same work on zeros, so "
            "**this model is not faster than the dense one**, and it does not use less memory at run time. "
            "The saving is in storage and transfer: the mask costs 1 bit per prunable weight (see "
            "`download_tensors` above), and the merged weights (`merge_and_unload()`) compress well because most "
            "of them are zero — but the files here store the dense weights plus the mask, so they are not smaller "
            "as saved. Speed-ups from unstructured sparsity need sparse kernels or hardware support. For real "
            "speed with ordinary kernels, use structured (channel) pruning, e.g. PASS in `prompt-sparsity`, "
            "which yields a compact model."
        )
    else:
        speed_note = "No weights are pruned: speed and size are those of the base model."

    details = []

    def add(label, value):
        if value not in (None, "", [], {}):
            details.append(f"- {label}: {value}")

    add("Method", f"{method_name} (`{method}`)" if method else None)
    add("Base model", base_txt if base else None)
    add("Base architecture", f"`{arch}`")
    add("Data set", f"`{dataset}`" if dataset else None)
    samples = results.get("samples")
    if isinstance(samples, Mapping):
        add("Images (train / validation / test)", " / ".join(str(samples.get(k, "–")) for k in
                                                             ("train", "validation", "test")))
    add("Sparsity type", f"`{sparsity_type}`")
    if structured:
        add("Channel selection", f"`{results.get('channel_selection') or config.get('channel_selection')}`"
            if results.get("channel_selection") or config.get("channel_selection") else None)
        add("Compacted", "yes (kept widths in `config.channel_widths`)" if compacted else "no")
    if not structured and sparsity is not None:
        target = results.get("sparsity_target", config.get("sparsity"))
        add("Weight sparsity (achieved / target)", f"{100 * float(sparsity):.2f}% / {100 * float(target):.2f}%"
            + (f" ({results['pruned_weights']} of {results['prunable_weights']} prunable weights)"
               if results.get("pruned_weights") is not None and results.get("prunable_weights") else "")
            + (f", {config.get('threshold')} threshold" if config.get("threshold") else ""))
    add("Visual prompt", (f"`{config.get('prompt_method')}` on a {config.get('output_size')} px canvas, images at "
                          f"{config.get('input_size')} px" + (f", pad {config.get('pad_size')} px"
                                                              if config.get("prompt_method") == "pad" else ""))
        if prompt_on else "none")
    add("Classifier head", {"pretrained": "the pretrained head, classes mapped by label mapping (FLM)",
                            "new": "a new head"}.get(config.get("head"), config.get("head")))
    epochs = results.get("epochs")
    if isinstance(epochs, Mapping) and epochs:
        add("Epochs", ", ".join(f"{k} {v}" for k, v in epochs.items()))
    if isinstance(results.get("wall_time_s"), (int, float)):
        add("Wall time", f"{results['wall_time_s'] / 60:.1f} min on {results.get('world_size', 1)} process(es), "
                         f"device `{results.get('device', '?')}`")
    add("Mask SHA-256", f"`{results['mask_sha256']}`" if results.get("mask_sha256") else None)
    add("Seed", results.get("seed"))

    transfer = ["structure.*" if structured else "sparsity.*"] + (["prompt.*"] if prompt_on else [])
    return {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "summary": summary,
        "results_table": results_table,
        "efficiency": efficiency,
        "repo_id": repo_id or f"<user>/{model_name}",
        "input_size": str(config.get("input_size", "?")),
        "merge_what": "channel pruning" if structured else "mask and label mapping",
        "transfer_tensors": json.dumps(transfer),
        "speed_note": speed_note,
        "details": "\n".join(details),
    }


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Replace every `{{ name }}` in one pass; values are inserted verbatim and never re-scanned."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"model card template: unknown placeholder {{{{ {key} }}}}; known: {', '.join(values)}.")
        return values[key]

    return re.sub(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", sub, template)


def render_model_card(output_dir: str | os.PathLike, repo_id: str | None = None, *,
                      template: str | os.PathLike | None = None) -> str:
    """The model card (README.md text) of a saved subnetwork, from its `config.json` and, when present,
    `results.json` (without it the card has the sparsity from the config and no accuracy).

    `repo_id` fills the loading snippets (default `<user>/<name>`); `template` is a path to another template
    (default `model_cards/subnetwork.md`)."""
    output_dir = Path(output_dir)
    config = _read_json(output_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{output_dir}: no config.json; save the model with save_pretrained(...) first.")
    results = _read_json(output_dir / "results.json")
    if template is not None:
        text = Path(template).read_text(encoding="utf-8")
    elif _TEMPLATE_PATH.is_file():
        text = _TEMPLATE_PATH.read_text(encoding="utf-8")
    else:
        text = _FALLBACK_TEMPLATE
    values = _card_values(config, results, repo_id, output_dir.resolve().name)
    card = _fill(text, values)
    return re.sub(r"\n{3,}", "\n\n", card).rstrip() + "\n"


# ================================================================================================ push
def _upload_files(output_dir: Path) -> list[str]:
    """The files of a saved subnetwork to upload (relative names), or a FileNotFoundError naming what is missing."""
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} is not a directory; save the subnetwork there first "
                                "(model.save_pretrained(output_dir)).")
    names = [n for n in SUBNETWORK_FILES if (output_dir / n).is_file()]
    index = output_dir / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint
        names.append(index.name)
        names += sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [n for n in ("config.json",) if n not in names]
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"{output_dir} is not a saved subnetwork: {', '.join(missing)} missing. Save it with "
                                "PromptedSparseModel.save_pretrained(output_dir) (a run writes it at the end).")
    return names


def _describe(exc: BaseException, endpoint: str) -> str:
    """A short, actionable description of why a Hub call failed."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0][:300].rstrip(".") if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it (or set it to 0) to push"
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return (f"authentication failed (HTTP {status}: {first}). The token is missing, invalid or has no write "
                "access to this namespace: run `hf auth login`, set HF_TOKEN, or pass `token=`")
    if isinstance(exc, HfHubHTTPError) and status is not None:
        return f"the Hub answered HTTP {status}: {first}"
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"ConnectError", "ConnectTimeout", "TransportError", "NetworkError", "TimeoutException",
                "ConnectionError"}:
        return f"could not reach the Hub at {endpoint} ({type(exc).__name__}: {first}); check the network / HF_ENDPOINT"
    return f"{type(exc).__name__}: {first}"


def push_subnetwork(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    overwrite_card: bool = False,
    commit_message: str | None = None,
    _local_note: str | None = None,
):
    """Upload a saved subnetwork folder to `repo_id` in one commit and return the commit (a `CommitInfo`, which is a
    `str` holding the commit URL; `.oid` is its sha).

    The repo is created if needed (`private` applies only then). `revision` names a branch (created from `main` if
    missing) or a PR ref (`refs/pr/N`). Uploaded: `config.json`, `model.safetensors` (or its shards and index),
    `preprocessor_config.json` and `results.json` when present, and `README.md`: the card from
    `render_model_card` (or the folder's own README.md), written only when the repo has no README.md at that
    revision unless `overwrite_card=True`. Checkpoints and other run files are not uploaded.

    `output_dir` is only read, never modified. Any failure (server unreachable, HTTP 401/403, ...) raises
    `HubPushError` naming the repo and the cause; the local folder is intact and the push can simply be retried.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    output_dir = Path(output_dir)
    names = _upload_files(output_dir)  # local problems first, before any network traffic
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repo id: use 'name' (your namespace) or "
                         f"'org/name' ({exc}).") from None
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(f"revision={revision!r} is a commit sha; push to a branch name (or refs/pr/N) instead.")
    local_note = _local_note or f"The local output at {output_dir} is intact; nothing was deleted or changed"
    endpoint = constants.ENDPOINT
    api = HfApi(token=token)
    step = "creating the repo"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        full_id = repo_url.repo_id or repo_id
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            step = f"creating branch {revision!r}"
            api.create_branch(full_id, branch=revision, exist_ok=True)
        step = "checking for an existing model card"
        has_card = api.file_exists(full_id, _CARD, revision=revision)
        operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(output_dir / n)) for n in names]
        if overwrite_card or not has_card:
            own = output_dir / _CARD
            card = own.read_text(encoding="utf-8") if own.is_file() else render_model_card(output_dir, full_id)
            operations.append(CommitOperationAdd(path_in_repo=_CARD, path_or_fileobj=card.encode("utf-8")))
        if commit_message is None:
            config = _read_json(output_dir / "config.json") or {}
            results = _read_json(output_dir / "results.json") or {}
            method = display_name(results.get("method")) or "prompt-sparsity"
            sp = results.get("sparsity", config.get("sparsity"))
            kind = config.get("sparsity_type", "unstructured")
            commit_message = f"Upload {method} subnetwork ({kind}" + (
                f", {100 * float(sp):.1f}% sparse)" if sp is not None and kind == "unstructured" else ")")
        step = "uploading"
        commit = api.create_commit(full_id, operations=operations, commit_message=commit_message, revision=revision)
    except Exception as exc:  # every failure of the remote part gets the same clear message
        raise HubPushError(
            f"Pushing {output_dir} to the Hub repo {repo_id!r} failed while {step}: {_describe(exc, endpoint)}. "
            f"{local_note}; fix the cause and push again "
            f"(prompt_sparsity.hub.push_subnetwork({str(output_dir)!r}, {repo_id!r})).",
            repo_id, str(output_dir),
        ) from exc
    logger.info("pushed %s to %s (%s)", output_dir, full_id, commit.oid)
    return commit


def push_model(model, repo_id: str, *, results: Mapping[str, Any] | None = None,
               max_shard_size: str | int | None = None, **kwargs):
    """Save `model` (a `PromptedSparseModel`) and, if given, a `results` dict (written as `results.json`, rendered in
    the card) to a temporary folder and push it with `push_subnetwork` (`**kwargs`: private, token, revision,
    overwrite_card, commit_message). Returns the commit (see `push_subnetwork`). The model is not changed."""
    with tempfile.TemporaryDirectory(prefix="prompt-sparsity-push-") as tmp:
        save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        model.save_pretrained(tmp, **save_kwargs)
        if results is not None:
            with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
                json.dump(dict(results), f, indent=2, default=str)
        return push_subnetwork(tmp, repo_id, _local_note="The model in memory is unchanged", **kwargs)


# ================================================================================================ pull
def _clear_not_found(exc, repo_id: str, revision: str | None):
    """Re-raise huggingface_hub's not-found errors as the same type with a message naming the repo."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError):
        msg = (f"Hub repo {repo_id!r} was not found: the id may be misspelt, or the repo is private or gated (log in "
               "with `hf auth login` or pass `token=`). It is not a local directory either.")
    elif isinstance(exc, RevisionNotFoundError):
        msg = f"Hub repo {repo_id!r} has no revision {revision!r} (no such branch, tag or commit)."
    else:
        return None
    return type(exc)(msg, response=exc.response, server_message=getattr(exc, "server_message", None))


def download_subnetwork(repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                        include_weights: bool = True, token: str | None = None) -> str:
    """The local directory of a subnetwork: a local directory is returned as is (`revision` is ignored); a Hub repo
    id is downloaded into the Hugging Face cache with `snapshot_download` and the snapshot directory returned.

    Downloaded: `config.json`, `preprocessor_config.json`, `results.json` and, with `include_weights=True` (the
    default), `model.safetensors` (or its shards). `include_weights=False` is a metadata-only pull (the card's
    numbers, the config); use `download_tensors` to fetch only some tensors (the mask, the prompt).

    huggingface_hub downloads each file to a temporary `.incomplete` blob and moves it into the snapshot only when
    it is complete, so an interrupted download never leaves a half-written file where `from_pretrained` would load
    it: the next call resumes or re-fetches. Errors: a missing repo raises `RepositoryNotFoundError` and a missing
    revision `RevisionNotFoundError`, both naming the repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError

    if os.path.isdir(repo_id_or_path):
        return str(repo_id_or_path)
    repo_id = str(repo_id_or_path)
    patterns = list(_METADATA_FILES) + (list(_WEIGHT_FILES) if include_weights else [])
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .integrity import missing_source_error

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    except HFValidationError as exc:
        raise ValueError(f"{repo_id!r} is neither an existing local directory nor a valid Hub repo id "
                         "('org/name'); check the path.") from exc
    except LocalEntryNotFoundError as exc:  # offline and not cached: say it is no folder either
        raise missing_source_error(repo_id, revision, exc) from exc
    except HfHubHTTPError as exc:
        clear = _clear_not_found(exc, repo_id, revision)
        if clear is None:
            raise
        raise clear from exc
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no config.json: it is not a "
                                "saved subnetwork.")
    return path


def _get(session, url: str, headers: dict, start: int, end: int, size: int | None, timeout: float) -> bytes:
    """Bytes [start, end] (inclusive) of `url` with a Range request."""
    from huggingface_hub.utils import hf_raise_for_status

    response = session.get(url, headers={**headers, "Range": f"bytes={start}-{end}"}, timeout=timeout)
    hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200:  # the server ignored Range and sent the whole file: still correct, just slower
        logger.warning("%s: the server ignored the Range header; the whole file was downloaded.", url)
        data = data[start:end + 1]
    if len(data) != end - start + 1:
        raise OSError(f"{url}: asked for bytes {start}-{end} but received {len(data)} bytes"
                      + (f" (file size {size})" if size else "") + ".")
    return data


def download_tensors(repo_id_or_path: str | os.PathLike, names: str | Iterable[str], *, revision: str | None = None,
                     token: str | None = None, filename: str = _SAFETENSORS, timeout: float = 30,
                     max_gap: int = 4096) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Only the named tensors of a subnetwork's `model.safetensors`, as `{name: torch.Tensor}`.

    `names` are exact tensor names or glob patterns (`"sparsity.mask_packed"`, `"prompt.*"`); each must match at
    least one tensor. For a Hub repo, only these bytes travel: a safetensors file is an 8-byte little-endian header
    length, a JSON header with each tensor's dtype, shape and byte offsets, then the raw data. So this reads the
    8-byte length and the header with two HTTP range requests, then one range request per run of wanted tensors
    (runs closer than `max_gap` bytes are merged) — e.g. the 1-bit mask and the prompt without the dense weights.
    All requests are pinned to the commit the revision pointed at when the call started (a push in between cannot
    mix two versions). Nothing is written to the cache. A local directory is read with `safetensors.safe_open`.

    Why not `HfFileSystem` or `get_safetensors_metadata`: `safetensors.safe_open` needs a local file (it memory-maps
    it), and `HfFileSystem` file objects read ahead in large blocks, so both would move far more than the wanted
    bytes; `get_safetensors_metadata` first reads a fixed 100 kB (larger than a whole tiny checkpoint). Explicit
    ranges move the header plus exactly the selected tensors.
    """
    import torch  # noqa: F401  (the returned tensors)
    from safetensors import safe_open
    from safetensors.torch import load as load_safetensors

    patterns = [names] if isinstance(names, str) else list(names)
    if not patterns:
        raise ValueError("download_tensors: give at least one tensor name or pattern.")

    def select(available: list[str]) -> list[str]:
        chosen = []
        for pattern in patterns:
            hits = [n for n in available if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                shown = ", ".join(sorted(n for n in available if not n.startswith("model."))[:20])
                raise KeyError(f"{repo_id_or_path}: no tensor matches {pattern!r} in {filename}. Tensors outside the "
                               f"base model: {shown or '(none)'}; base weights are named model.*.")
            chosen += [h for h in hits if h not in chosen]
        return chosen

    if os.path.isdir(repo_id_or_path):
        path = os.path.join(repo_id_or_path, filename)
        with safe_open(path, framework="pt") as f:
            return {n: f.get_tensor(n) for n in select(list(f.keys()))}

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session

    repo_id = str(repo_id_or_path)
    try:
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=constants.ENDPOINT)
        meta = get_hf_file_metadata(url, token=token)
    except HFValidationError as exc:
        raise ValueError(f"{repo_id!r} is neither an existing local directory nor a valid Hub repo id.") from exc
    except HfHubHTTPError as exc:
        from huggingface_hub.errors import EntryNotFoundError

        if isinstance(exc, EntryNotFoundError):
            raise FileNotFoundError(f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no {filename} "
                                    "(a sharded checkpoint? use download_subnetwork).") from exc
        clear = _clear_not_found(exc, repo_id, revision)
        if clear is None:
            raise
        raise clear from exc
    pinned = hf_hub_url(repo_id, filename, revision=meta.commit_hash or revision, endpoint=constants.ENDPOINT)
    headers = build_hf_headers(token=token)
    session = get_session()
    size = meta.size

    (header_len,) = struct.unpack("<Q", _get(session, pinned, headers, 0, 7, size, timeout))
    if (size is not None and header_len + 8 > size) or header_len > 100_000_000:
        raise OSError(f"{repo_id}/{filename}: not a safetensors file (header length {header_len}).")
    header = json.loads(_get(session, pinned, headers, 8, 7 + header_len, size, timeout))
    header.pop("__metadata__", None)
    wanted = sorted(select(list(header)), key=lambda n: header[n]["data_offsets"][0])

    # Merge neighbouring tensors into few requests, then cut each tensor out of its run.
    base = 8 + header_len
    runs: list[list] = []  # [start, end_exclusive, [names]]
    for n in wanted:
        begin, end = header[n]["data_offsets"]
        if runs and begin - runs[-1][1] <= max_gap:
            runs[-1][1] = max(runs[-1][1], end)
            runs[-1][2].append(n)
        else:
            runs.append([begin, end, [n]])
    new_header, chunks, offset = {}, [], 0
    for begin, end, members in runs:
        data = _get(session, pinned, headers, base + begin, base + end - 1, size, timeout) if end > begin else b""
        for n in members:
            b, e = header[n]["data_offsets"]
            chunks.append(data[b - begin:e - begin])
            new_header[n] = {"dtype": header[n]["dtype"], "shape": header[n]["shape"],
                             "data_offsets": [offset, offset + (e - b)]}
            offset += e - b
    fetched = 8 + header_len + sum(e - b for b, e, _ in runs)
    logger.info("download_tensors %s: %d tensors, %d of %s bytes fetched", repo_id, len(wanted), fetched, size)
    # Rebuild a small safetensors blob and let safetensors decode it (every dtype, little-endian, exact shapes).
    head = json.dumps(new_header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tensors = load_safetensors(struct.pack("<Q", len(head)) + head + b"".join(chunks))
    return {n: tensors[n] for n in wanted}
