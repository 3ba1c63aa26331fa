"""The effective settings of a run: what the user's data and model decided where an option was left unset (the
input size, "all samples"), logged once at the start and stored in results.json."""

from __future__ import annotations

from typing import Any


def effective_settings(run) -> dict[str, Any]:
    """The settings a `PruningRun` actually uses, after the model and the data are built."""
    margs, dargs, acc = run.model_args, run.data_args, run.accelerator
    config = run.model.config
    accumulation = getattr(acc, "gradient_accumulation_steps", 1)
    return {
        "method": run.method.name,
        "model": margs.model_name_or_path,
        "dataset": run.data.name,
        "input_size": config.input_size,
        "input_size_from": input_size_source(margs, transferred=getattr(run, "transfer_args", None) is not None),
        "output_size": config.output_size,
        "max_train_samples": dargs.max_train_samples if dargs.max_train_samples is not None else "all",
        "max_eval_samples": dargs.max_eval_samples if dargs.max_eval_samples is not None else "all",
        "samples": {"train": len(run.data.train), "validation": len(run.data.validation), "test": len(run.data.test)},
        "num_labels": run.data.num_labels,
        "per_device_train_batch_size": dargs.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "total_train_batch_size": dargs.per_device_train_batch_size * acc.num_processes * accumulation,
        "num_processes": acc.num_processes,
        "device": str(acc.device),
        "epochs": {s.kind: int(getattr(run.prune_args, s.epochs_field))
                   for s in run.method.plan if hasattr(s, "epochs_field")},
        "seed": run.run_args.seed,
        "framework_versions": framework_versions(),
    }


def input_size_source(model_args, *, transferred: bool = False) -> str:
    """Where the input size came from: the subnetwork a transfer reuses, the model (unset), or what set it (the
    recipes record `option_sources`: a flag, the YAML file, the embedded demo's defaults)."""
    if transferred:
        return "the subnetwork (--subnetwork)"
    if not model_args.input_size:
        return "the model (its image processor, else its config)"
    return getattr(model_args, "option_sources", {}).get("input_size", "ModelArguments.input_size")


def framework_versions() -> dict[str, str]:
    """The versions a run trained with (for results.json and the model card)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("prompt-sparsity", "torch", "transformers", "accelerate", "datasets", "timm"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def format_settings(s: dict[str, Any]) -> str:
    """One line for the log."""
    n = s["samples"]
    epochs = " + ".join(f"{k} {v}" for k, v in s["epochs"].items()) or "none"
    return (f"settings: {s['method']} on {s['model']}; data {s['dataset']}: train/validation/test = "
            f"{n['train']}/{n['validation']}/{n['test']} (max_train_samples {s['max_train_samples']}, "
            f"max_eval_samples {s['max_eval_samples']}); input {s['input_size']} px from {s['input_size_from']}, "
            f"canvas {s['output_size']} px; batch {s['per_device_train_batch_size']} x {s['num_processes']} process(es)"
            f" x {s['gradient_accumulation_steps']} accumulation = {s['total_train_batch_size']}; epochs {epochs}; "
            f"seed {s['seed']}; {s['device']}")
