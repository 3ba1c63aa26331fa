"""Offline `evaluate` metric modules shipped with prompt_sparsity.

`evaluate.load("accuracy")` fetches its script from the Hub; these folders hold equivalent
scripts that `evaluate.load(<folder>)` reads from disk (no network, ~0.01 s):

    from prompt_sparsity.metrics import load_metric
    accuracy = load_metric("accuracy")          # {"accuracy": ...}
    top5 = load_metric("top5_accuracy")         # predictions: per-class scores; {"top5_accuracy": ...}
"""

from __future__ import annotations

import os
from typing import Any, Tuple

__all__ = ["AVAILABLE_METRICS", "load_metric", "metric_path"]

#: Names accepted by :func:`load_metric`.
AVAILABLE_METRICS: Tuple[str, ...] = ("accuracy", "top5_accuracy")

_ALIASES = {
    "accuracy": "accuracy",
    "acc": "accuracy",
    "top1": "accuracy",
    "top1_accuracy": "accuracy",
    "top5_accuracy": "top5_accuracy",
    "top5": "top5_accuracy",
    "top_5_accuracy": "top5_accuracy",
}

_HERE = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """The folder of the metric module ``name`` (to pass to ``evaluate.load``)."""
    if not isinstance(name, str):
        raise TypeError(f"metric name must be a string, got {type(name).__name__}.")
    key = _ALIASES.get(name.strip().lower().replace("-", "_"))
    if key is None:
        raise ValueError(
            f"Unknown metric {name!r}. prompt_sparsity ships the offline metrics {list(AVAILABLE_METRICS)}. "
            "Fix: use one of those names, or call evaluate.load(<path to your own metric folder>)."
        )
    path = os.path.join(_HERE, key)
    if not os.path.isfile(os.path.join(path, f"{key}.py")):
        raise FileNotFoundError(
            f"The metric script {os.path.join(path, key + '.py')} is missing from the installed package. "
            "Fix: reinstall prompt_sparsity (the metric scripts must be included as package data)."
        )
    return path


def load_metric(name: str, **kwargs: Any):
    """Load one of the shipped metrics (``"accuracy"``, ``"top5_accuracy"``) by path, offline.

    ``kwargs`` go to ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``cache_dir=...``,
    ``num_process``/``process_id`` for distributed evaluation).
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
