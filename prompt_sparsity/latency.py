"""Honest CPU/GPU latency: warm-up, median of repeats, stated threads and batch size, and the dense and compact
models measured interleaved in one process (so drift and noise hit both alike)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def compare_latency(models: dict, input_size: int, batch_sizes=(1, 64), *, warmup: int = 3, repeats: int = 15,
                    threads: int | None = None, device: str = "cpu") -> dict:
    """Median forward latency (ms) of each model in `models` ({name: nn.Module}) for each batch size, measured
    round-robin. Returns {"threads", "device", "warmup", "repeats", "batch_<b>": {name: {...}, "speedup": ...}}."""
    out = {"device": str(device), "warmup": warmup, "repeats": repeats}
    with torch_threads(threads) as n:
        out["threads"] = n
        for model in models.values():
            model.eval().to(device)
        for b in batch_sizes:
            x = torch.randn(b, 3, input_size, input_size, device=device)
            times = {name: [] for name in models}
            for _ in range(warmup):
                for model in models.values():
                    model(x)
            for _ in range(repeats):
                for name, model in models.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                    times[name].append(1000 * (time.perf_counter() - t0))
            entry = {name: {"median_ms": statistics.median(t), "min_ms": min(t),
                            "images_per_s": 1000 * b / statistics.median(t)} for name, t in times.items()}
            names = list(models)
            if len(names) == 2:
                entry["speedup"] = entry[names[0]]["median_ms"] / entry[names[1]]["median_ms"]
            out[f"batch_{b}"] = entry
    return out
