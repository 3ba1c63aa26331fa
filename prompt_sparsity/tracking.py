"""Experiment trackers through accelerate (`--report_to`, `--with_tracking`): a missing tracker package is an
error before training, and every optimizer step logs its loss and each parameter group's learning rate."""

from __future__ import annotations

#: The package to install for each tracker accelerate supports (`accelerate.utils.LoggerType`).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def check_trackers(report_to: str | None) -> None:
    """Raise (naming the package to install) when the tracker asked for is not installed; 'all' needs one."""
    if report_to in (None, "none"):
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t.value) if hasattr(t, "value") else str(t) for t in get_available_trackers()}
    if report_to == "all":
        if not available:
            raise ImportError("--report_to all (or --with_tracking) found no tracker installed. Fix: pip install "
                              "\"prompt-sparsity[tracking]\" (TensorBoard), or another tracker accelerate supports, "
                              "or drop --with_tracking.")
        return
    if report_to not in available:
        package = TRACKER_PACKAGES.get(report_to, report_to)
        extra = ' (or pip install "prompt-sparsity[tracking]")' if report_to == "tensorboard" else ""
        raise ImportError(f"--report_to {report_to}: the package {package!r} is not installed, so nothing would be "
                          f"logged. Fix: pip install {package}{extra}, or --report_to none.")


def log_step(accelerator, stage_kind: str, loss, optimizer, group_names) -> None:
    """One optimizer step: its loss and every parameter group's current learning rate (no-op without trackers)."""
    if not accelerator.trackers:
        return
    values = {f"{stage_kind}/step_loss": float(loss.detach())}
    for name, group in zip(group_names, optimizer.param_groups):
        values[f"{stage_kind}/lr/{name}"] = float(group["lr"])
    step = getattr(accelerator, "_prompt_sparsity_step", 0) + 1
    accelerator._prompt_sparsity_step = step  # one step axis across the stages
    accelerator.log(values, step=step)


def log_epoch(accelerator, values: dict) -> None:
    """Per-epoch scalars (validation metrics, sparsity/FLOPs) on the same step axis as `log_step`."""
    if accelerator.trackers:
        accelerator.log({k: float(v) for k, v in values.items()}, step=getattr(accelerator, "_prompt_sparsity_step", 0))


def subnetwork_scalars(model) -> dict:
    """The subnetwork as scalars: global sparsity (unstructured) or the kept fraction of dense FLOPs (channels)."""
    if getattr(model, "sparsity", None) is not None:
        return {"subnetwork/sparsity": model.sparsity_report()["global"]}
    if getattr(model, "structure", None) is not None:
        return {"subnetwork/flops_ratio": model.flops_report()["flops_ratio"]}
    return {}
