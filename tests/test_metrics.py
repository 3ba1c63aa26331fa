"""Tests for the offline evaluate metric modules in prompt_sparsity/metrics."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import time  # noqa: E402

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from prompt_sparsity.metrics import AVAILABLE_METRICS, load_metric, metric_path  # noqa: E402


@pytest.fixture(autouse=True)
def _modules_cache_in_tmp(tmp_path_factory, monkeypatch):
    # evaluate copies loaded scripts into HF_MODULES_CACHE and makes folders under HF_METRICS_CACHE;
    # keep both out of ~/.cache.
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", base / "hf_modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", str(base / "hf_metrics"))


def test_load_by_path_is_fast_and_offline():
    for name in AVAILABLE_METRICS:
        load_metric(name, keep_in_memory=True)  # first load copies the script once
        start = time.perf_counter()
        metric = load_metric(name, keep_in_memory=True)
        assert time.perf_counter() - start < 1.0
        assert isinstance(metric, evaluate.Metric) and metric.name == name
    assert isinstance(evaluate.load(metric_path("accuracy"), keep_in_memory=True), evaluate.Metric)


def test_accuracy_matches_hand_computation():
    rng = np.random.default_rng(0)
    preds, refs = rng.integers(0, 4, 57), rng.integers(0, 4, 57)
    metric = load_metric("accuracy", keep_in_memory=True)
    assert metric.compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(np.mean(preds == refs))
    assert metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], normalize=False) == {"accuracy": 3}
    weighted = metric.compute(predictions=[0, 1, 2], references=[0, 0, 2], sample_weight=[1.0, 2.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.5)
    # accumulated over batches (torch tensors accepted)
    metric.add_batch(predictions=torch.tensor([1, 2]), references=torch.tensor([1, 1]))
    metric.add_batch(predictions=[3, 3], references=[3, 0])
    assert metric.compute()["accuracy"] == pytest.approx(0.5)


def _hand_topk(logits, refs, k):
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean([r in row for r, row in zip(refs, top)]))


def test_top5_matches_hand_computation():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 12)).astype(np.float32)
    refs = rng.integers(0, 12, 64)
    metric = load_metric("top5_accuracy", keep_in_memory=True)
    expected = _hand_topk(logits, refs, 5)
    assert 0.0 < expected < 1.0
    assert metric.compute(predictions=logits, references=refs)["top5_accuracy"] == pytest.approx(expected)
    via_torch = (torch.from_numpy(logits).topk(5, dim=1).indices == torch.from_numpy(refs)[:, None]).any(1)
    assert expected == pytest.approx(via_torch.float().mean().item())
    # batches of torch tensors, then lists
    metric.add_batch(predictions=torch.from_numpy(logits[:40]), references=torch.from_numpy(refs[:40]))
    metric.add_batch(predictions=logits[40:].tolist(), references=refs[40:].tolist())
    assert metric.compute()["top5_accuracy"] == pytest.approx(expected)
    out = metric.compute(predictions=logits, references=refs, normalize=False)["top5_accuracy"]
    assert out == round(expected * 64)


def test_top5_with_three_classes_and_ties():
    metric = load_metric("top5", keep_in_memory=True)
    preds = [[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.0, 0.0, 1.0]]
    assert metric.compute(predictions=preds, references=[2, 1, 0]) == {"top5_accuracy": 1.0}
    # 7 classes: rank of the reference decides; constant logits only credit the 5 lowest ids
    logits = np.tile(np.arange(7, dtype=np.float32), (2, 1))  # class 6 best, class 0 worst
    assert metric.compute(predictions=logits, references=[2, 1])["top5_accuracy"] == pytest.approx(0.5)
    const = np.zeros((7, 7), dtype=np.float32)
    assert metric.compute(predictions=const, references=list(range(7)))["top5_accuracy"] == pytest.approx(5 / 7)
    nan_ref = np.array([[np.nan, 1, 2, 3, 4, 5, 6]], dtype=np.float32)
    assert metric.compute(predictions=nan_ref, references=[0])["top5_accuracy"] == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match="Unknown metric 'f1'.*accuracy"):
        load_metric("f1")
    top5 = load_metric("top5_accuracy", keep_in_memory=True)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        top5.compute(predictions=[[0.1, 0.2, 0.3]], references=[3])
    with pytest.raises(ValueError):
        top5.compute(predictions=[[0.1, 0.2, 0.3], [0.1, 0.2]], references=[0, 1])
