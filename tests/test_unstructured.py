"""Thresholds, straight-through gradients, bit packing, prompts."""

import pytest
import torch
from tiny_models import tiny_model

from prompt_sparsity import PromptedSparseConfig, PromptedSparseModel
from prompt_sparsity.prompts import VisualPrompt
from prompt_sparsity.sparsity.unstructured import (
    StraightThroughMask,
    ThresholdFinder,
    layout,
    mask_from_scores_,
    num_pruned,
    pack_mask,
    scaled_scores,
    unpack_mask,
)


def test_threshold_finder_matches_kthvalue_while_scores_drift():
    torch.manual_seed(0)
    scores = torch.randn(50_000)
    finder = ThresholdFinder()
    for step in range(30):
        scores += 1e-3 * torch.randn_like(scores)  # an optimiser step moves scores a little
        k = num_pruned(0.9, scores.numel())
        tau, _ = finder.kth_smallest_abs(scores, k)
        assert float(tau) == float(torch.kthvalue(scores.abs(), k).values), step
    assert finder.stats["fast"] >= 25  # the incremental path, not a fresh selection, did the work


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_exact_count_even_with_ties(sparsity):
    scores = torch.tensor([0.0] * 40 + [0.5] * 30 + list(torch.linspace(1, 2, 30).tolist()))
    layers = layout({"a": (100,)})
    mask = torch.empty(100)
    mask_from_scores_(scores, mask, layers, sparsity)
    assert int((mask == 0).sum()) == num_pruned(sparsity, 100)
    assert set(mask.tolist()) <= {0.0, 1.0}
    # Never keeps a smaller |score| while pruning a larger one.
    if 0 < sparsity:
        assert scores[mask == 1].abs().min() >= scores[mask == 0].abs().max()


def test_scaled_init():
    w = torch.randn(8, 4, 3, 3)
    s = scaled_scores(w)
    assert torch.allclose(s.abs().max(), torch.tensor((6 / 36) ** 0.5))
    assert torch.equal(s.sign(), w.sign())


def test_straight_through_gradient():
    scores = torch.randn(10, requires_grad=True)
    mask = (scores.detach().abs() > 0.5).float()
    out = StraightThroughMask.apply(scores, mask)
    assert torch.equal(out, mask)
    weights = torch.randn(10)
    (out * weights).sum().backward()
    assert torch.equal(scores.grad, weights * scores.detach().sign())


def test_pack_roundtrip():
    mask = (torch.rand(1001) > 0.9).float()
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_mask(packed, 1001), mask)


def test_mask_recomputed_after_optimizer_step():
    model = PromptedSparseModel.from_base(
        tiny_model("resnet_basic"), sparsity=0.5, input_size=32, output_size=32, pad_size=4
    )
    model.start_mask_search()
    before = model.sparsity.mask().clone()
    opt = torch.optim.SGD([model.sparsity.scores], lr=10.0)
    model(torch.rand(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    opt.step()
    after = model.sparsity.mask()
    assert not torch.equal(before, after)
    assert int((after == 0).sum()) == num_pruned(0.5, after.numel())


def test_search_freezes_weights_and_finetune_freezes_mask():
    model = PromptedSparseModel.from_base(
        tiny_model("resnet_basic"), sparsity=0.5, input_size=32, output_size=32, pad_size=4
    )
    model.start_mask_search()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sparsity.scores", "prompt.pad_up", "prompt.pad_down", "prompt.pad_left", "prompt.pad_right"}
    mask = model.sparsity.mask().clone()
    model.start_finetuning()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "sparsity.scores" not in trainable and "model.classifier.1.weight" in trainable
    assert model.config.mask_format == "packed"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.rand(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    opt.step()
    assert torch.equal(model.sparsity.mask(), mask)


@pytest.mark.parametrize("method", ["pad", "fix", "random", "expand", "none"])
def test_prompt_methods(method):
    config = PromptedSparseConfig(prompt_method=method, input_size=24 if method == "expand" else 32,
                                  output_size=32, pad_size=4, mask_size=8)
    prompt = VisualPrompt(config)
    with torch.no_grad():
        for p in prompt.parameters():
            p.fill_(0.3)
    x = torch.rand(2, 3, config.input_size, config.input_size)
    img = prompt.prompt_image(x.clone()) if method != "none" else x
    assert img.shape[-1] == (32 if method != "none" else config.input_size)
    assert img.min() >= 0 and img.max() <= 1
    if method == "pad":
        assert prompt.num_effective_values == 3 * (32 * 32 - 24 * 24)
        assert torch.equal(img[..., 4:28, 4:28], x[..., 4:28, 4:28])  # inside the frame untouched
        assert not torch.equal(img[..., :4, :], x[..., :4, :])
    if method == "expand":
        assert torch.equal(img[..., 4:28, 4:28], x)  # the image sits in the middle, untouched
    normalised = prompt(x, use_prompt=False)
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, (x - mean) / std)
