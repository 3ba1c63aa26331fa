"""N:M (2:4) semi-structured masks: the exact pattern for the VPNs/HYDRA score search and every one-shot
criterion, the dense-layer rule, config/argument validation, save/load, merge_and_unload, the GEMM layout of
the conv export and the CPU refusal of `export_semi_structured`."""

import dataclasses

import pytest
import torch
from tiny_models import IMAGE_SIZE, recipe_args, tiny_model
from torch import nn

from prompt_sparsity import (
    PromptedSparseConfig,
    PromptedSparseModel,
    export_semi_structured,
    prepare_semi_structured,
    semi_structured_matrices,
)
from prompt_sparsity.arguments import PruningArguments
from prompt_sparsity.methods.pruners import PRUNERS, magnitude_importance, prune_once
from prompt_sparsity.semi_structured_export import SemiStructuredConv2d
from prompt_sparsity.sparsity.semi_structured import (
    check_nm,
    from_gemm_matrix,
    gemm_matrix,
    nm_eligible,
    nm_keep_schedule,
    parse_nm,
)

S = IMAGE_SIZE


def wrap(arch="resnet_basic", nm_pattern="2:4", **kwargs):
    kwargs.setdefault("input_size", S)
    kwargs.setdefault("output_size", S)
    kwargs.setdefault("pad_size", 4)
    return PromptedSparseModel.from_base(tiny_model(arch), nm_pattern=nm_pattern, **kwargs)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(n, 3, S, S, generator=g), "labels": torch.randint(0, 10, (n,), generator=g)}


def assert_pattern(model, n=2, m=4):
    """Every eligible pruned layer keeps exactly n of every m along its input dimension; the others keep all."""
    masks = model.sparsity.layer_masks()
    eligible = 0
    for layer in model.sparsity.layers:
        mask = masks[layer.param_name]
        if nm_eligible(layer.shape, m):
            eligible += 1
            assert layer.name not in model.sparsity.nm_dense_layers
            assert check_nm(mask, n, m), layer.name
            assert int(mask.sum()) == layer.numel * n // m
        else:
            assert layer.name in model.sparsity.nm_dense_layers
            assert bool(mask.eq(1).all()), f"{layer.name} should be dense"
    assert eligible > 0
    return masks


def reference_nm_mask(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A loop-by-hand N:M mask of a Linear [out, in] or Conv2d [out, c, kh, kw] tensor (channels along taps)."""
    mask = torch.zeros_like(values)
    v4 = values if values.dim() == 4 else values[:, :, None, None]
    m4 = mask if mask.dim() == 4 else mask[:, :, None, None]
    for o in range(v4.shape[0]):
        for i in range(v4.shape[2]):
            for j in range(v4.shape[3]):
                for c in range(0, v4.shape[1], m):
                    group = v4[o, c:c + m, i, j]
                    top = torch.argsort(group, descending=True, stable=True)[:n]
                    m4[o, c + top, i, j] = 1
    return mask


# ----------------------------------------------------------------------------------------------- pattern basics
def test_parse_and_check_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ("2-4", "4:4", "0:4", "5:4", "a:b", "", None):
        with pytest.raises(ValueError, match="nm_pattern"):
            parse_nm(bad)
    w = torch.tensor([[1.0, 0, 2, 0, 0, 3, 4, 0]])
    assert check_nm(w, 2, 4) and check_nm(w, 2, 4, exact=False)
    w[0, 1] = 5
    assert not check_nm(w, 2, 4) and not check_nm(w, 2, 4, exact=False)
    assert check_nm(torch.tensor([[1.0, 0, 0, 0]]), 2, 4, exact=False)
    assert not check_nm(torch.tensor([[1.0, 0, 0, 0]]), 2, 4)
    with pytest.raises(ValueError, match="no groups of 4"):
        check_nm(torch.ones(2, 6), 2, 4)


def test_group_selection_is_exact_with_ties_and_any_n_m():
    from prompt_sparsity.sparsity.semi_structured import nm_group_mask

    v = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 3.0, -2.0, 3.0]])
    assert nm_group_mask(v, 2, 4).tolist() == [[1, 1, 0, 0, 0, 1, 0, 1]]  # ties: the earlier ones are kept
    g = torch.Generator().manual_seed(0)
    for n, m in ((1, 4), (2, 4), (3, 4), (4, 8), (1, 2)):
        values = torch.randint(0, 3, (6, 4 * m), generator=g).float()  # many ties
        mask = nm_group_mask(values, n, m)
        assert torch.equal(mask, reference_nm_mask(values, n, m)) and check_nm(mask, n, m)
    with pytest.raises(ValueError, match="NaN"):
        nm_group_mask(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]]), 2, 4)


def test_conv_gemm_layout_groups_channels_at_each_tap():
    """Conv groups are 4 consecutive input channels at one kernel tap (channels-last im2col)."""
    w = torch.randn(3, 8, 3, 3)
    matrix = gemm_matrix(w)
    assert matrix.shape == (3, 72)
    assert torch.equal(matrix[1, 4:8], w[1, 4:8, 0, 0])  # the second group of tap (0, 0)
    assert torch.equal(matrix[1, 8:12], w[1, 0:4, 0, 1])  # the first group of tap (0, 1)
    assert torch.equal(from_gemm_matrix(matrix, w.shape), w)
    assert nm_eligible((16, 8, 3, 3), 4) and not nm_eligible((16, 1, 3, 3), 4)  # depthwise: 1 input per tap
    assert not nm_eligible((16, 3, 3, 3), 4) and nm_eligible((10, 64), 4) and not nm_eligible((10, 6), 4)


def test_synflow_schedule_ends_at_n_and_never_grows():
    kept = [nm_keep_schedule(2, 4, i, 100) for i in range(1, 101)]
    assert kept[-1] == 2 and kept[0] == 4 and set(kept) == {2, 3, 4}
    assert all(a >= b for a, b in zip(kept, kept[1:]))


# ----------------------------------------------------------------------------------------------- configuration
def test_config_defaults_sparsity_from_the_pattern_and_refuses_conflicts():
    model = wrap()
    assert model.config.nm_pattern == "2:4" and model.config.sparsity == 0.5
    base = tiny_model("resnet_basic").config.to_dict()
    with pytest.raises(ValueError, match=r"sparsity=0.9 conflicts with nm_pattern='2:4'.*0.5"):
        PromptedSparseConfig(base_config=base, nm_pattern="2:4", sparsity=0.9)
    with pytest.raises(ValueError, match="is not of the form 'N:M'"):
        PromptedSparseConfig(base_config=base, nm_pattern="2/4")
    with pytest.raises(ValueError, match="min_layer_density=0.6 is above"):
        PromptedSparseConfig(base_config=base, nm_pattern="2:4", min_layer_density=0.6)
    with pytest.raises(ValueError, match="sparsity_type='unstructured'"):
        PromptedSparseConfig(base_config=base, nm_pattern="2:4", sparsity_type="structured")
    assert PromptedSparseConfig(base_config=base, nm_pattern="1:4").sparsity == 0.75


def test_pruning_arguments_take_the_pattern():
    assert PruningArguments(nm_pattern="2:4").sparsity == 0.5  # the default --sparsity gives way
    assert PruningArguments(nm_pattern="2:4", sparsity=0.5).sparsity == 0.5
    with pytest.raises(ValueError, match=r"--sparsity=0.7 conflicts with --nm_pattern 2:4"):
        PruningArguments(nm_pattern="2:4", sparsity=0.7)
    with pytest.raises(ValueError, match="--nm_pattern"):
        PruningArguments(nm_pattern="3:2")
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(["--nm_pattern", "2:4",
                                                                                "--method", "snip"])
    assert parsed.nm_pattern == "2:4" and parsed.sparsity == 0.5


# ----------------------------------------------------------------------------------------------- score search
@pytest.mark.parametrize("prompt_method", ["pad", "none"])  # VPNs, HYDRA
def test_score_search_keeps_exactly_two_of_four(prompt_method):
    model = wrap(prompt_method=prompt_method)
    initial = assert_pattern(model)
    # The initial mask is the 2 largest |scaled scores| = |W| of each group (a hand-written reference).
    params = dict(model.model.named_parameters())
    for layer in model.sparsity.layers[:3]:
        if nm_eligible(layer.shape, 4):
            ref = reference_nm_mask(params[layer.param_name].detach().abs(), 2, 4)
            assert torch.equal(initial[layer.param_name], ref), layer.name
    before = model.sparsity.mask().clone()
    model.start_mask_search()
    opt = torch.optim.Adam([model.sparsity.scores, *model.prompt.parameters()], lr=0.05)
    for step in range(4):
        out = model(**batch(seed=step), use_prompt=prompt_method != "none")
        opt.zero_grad()
        out.loss.backward()
        assert model.sparsity.scores.grad is not None and model.sparsity.scores.grad.abs().sum() > 0
        opt.step()
    model.update_mask()
    assert not torch.equal(model.sparsity.mask(), before)  # the scores moved the mask
    assert_pattern(model)
    model.freeze_mask()
    assert_pattern(model)


def test_straight_through_gradient_is_unchanged_by_the_pattern():
    """The gradient of the scores is the gradient w.r.t. the mask times sign(s), as without the pattern."""
    model = wrap(prompt_method="none")
    model.start_mask_search()
    model(**batch()).loss.backward()
    grad_scores = model.sparsity.scores.grad.clone()
    # The same loss as a function of the hard mask directly.
    flat = model.sparsity.mask().clone().requires_grad_(True)
    params = dict(model.model.named_parameters())
    masked = {layer.param_name: params[layer.param_name] * flat[layer.offset:layer.offset + layer.numel]
              .view(layer.shape) for layer in model.sparsity.layers}
    from torch.func import functional_call

    b = batch()
    logits = functional_call(model.model, masked, (model.prompt(b["pixel_values"], use_prompt=False),),
                             strict=False).logits
    torch.nn.functional.cross_entropy(logits, b["labels"]).backward()
    torch.testing.assert_close(grad_scores, flat.grad * torch.sign(model.sparsity.scores.detach()))


# ----------------------------------------------------------------------------------------------- one-shot criteria
@pytest.mark.parametrize("criterion", sorted(PRUNERS))
def test_every_one_shot_criterion_gives_the_pattern(criterion):
    model = wrap("mobilenet_v2")  # depthwise convs: ineligible layers in the mix
    mask = prune_once(model, criterion, 0.5, batches=[batch()], generator=torch.Generator().manual_seed(0),
                      synflow_iterations=5)
    assert int(mask.numel() - mask.sum()) == sum(l.numel // 2 for l in model.sparsity.layers
                                                 if nm_eligible(l.shape, 4))
    assert_pattern(model)
    assert model.config.mask_format == "packed"


def test_magnitude_pattern_matches_a_hand_written_reference():
    model = wrap("resnet_bottleneck")
    prune_once(model, "magnitude", 0.5)
    masks = model.sparsity.layer_masks()
    importance = magnitude_importance(model)
    for layer in model.sparsity.layers:
        if nm_eligible(layer.shape, 4):
            values = importance[layer.offset:layer.offset + layer.numel].view(layer.shape)
            assert torch.equal(masks[layer.param_name], reference_nm_mask(values, 2, 4)), layer.name


def test_one_shot_refuses_a_sparsity_the_pattern_does_not_give():
    with pytest.raises(ValueError, match=r"sparsity=0.9 conflicts with the model's nm_pattern='2:4'"):
        prune_once(wrap(), "magnitude", 0.9)


def test_ineligible_layers_are_left_dense_and_recorded():
    model = wrap("mobilenet_v2")
    dense = model.sparsity.nm_dense_layers
    shapes = {layer.name: layer.shape for layer in model.sparsity.layers}
    assert dense and all(shapes[name][1] % 4 for name in dense)  # the rule: inputs per tap not a multiple of 4
    assert any(len(shapes[name]) == 4 and shapes[name][1] == 1 for name in dense)  # depthwise convs among them
    assert_pattern(model)
    report = model.sparsity_report()
    assert all(report["layers"][name] == 0.0 for name in dense)
    assert 0 < report["global"] < 0.5


def test_without_the_pattern_nothing_changes():
    """nm_pattern=None: the threshold path, bit-identical to a model built without the setting."""
    torch.manual_seed(0)
    a = PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity=0.5, input_size=S, output_size=S,
                                      pad_size=4)
    b = PromptedSparseModel.from_base(tiny_model("resnet_basic"), sparsity=0.5, input_size=S, output_size=S,
                                      pad_size=4, nm_pattern=None)
    assert a.config.nm_pattern is None and not a.sparsity.nm_dense_layers
    assert torch.equal(a.sparsity.mask(), b.sparsity.mask())
    flat = a.sparsity.layer_masks()
    assert not all(check_nm(flat[l.param_name], 2, 4) for l in a.sparsity.layers if nm_eligible(l.shape, 4))


# ----------------------------------------------------------------------------------------------- save / load / merge
def test_save_load_round_trip_is_exact(tmp_path):
    model = wrap("resnet_basic", prompt_method="pad")
    model.set_label_mapping(list(range(10)))
    prune_once(model, "snip", 0.5, batches=[batch()])
    model.save_pretrained(tmp_path)
    loaded, info = PromptedSparseModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.nm_pattern == "2:4" and loaded.config.sparsity == 0.5
    assert loaded.sparsity.nm_pattern == "2:4" and loaded.sparsity.nm_dense_layers == model.sparsity.nm_dense_layers
    assert torch.equal(loaded.sparsity.mask_packed, model.sparsity.mask_packed)
    assert_pattern(loaded)
    x = batch()["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_merge_and_unload_weights_follow_the_pattern():
    model = wrap("vit")
    prune_once(model, "magnitude", 0.5)
    plain = model.merge_and_unload()
    modules = dict(plain.named_modules())
    for layer in model.sparsity.layers:
        w = modules[layer.name].weight
        if nm_eligible(layer.shape, 4):
            assert check_nm(w, 2, 4, exact=False), layer.name
            assert int(w.ne(0).sum()) == w.numel() // 2  # random weights: no kept weight is exactly 0
        else:
            assert bool(w.ne(0).all())  # left dense


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1),
                                                            (3, 2, 1, 1), (3, 1, 2, 2), (5, 2, 2, 1)])
def test_conv_as_channels_last_gemm_equals_the_conv(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 8, 9, 11)
    gemm = SemiStructuredConv2d(conv)
    assert gemm.weight.shape == (6, kernel * kernel * 8)
    torch.testing.assert_close(gemm(x), conv(x), rtol=1e-5, atol=1e-5)


def test_prepare_semi_structured_matches_the_merged_model_and_reports():
    model = PromptedSparseModel.from_base(tiny_model("resnet_basic"), nm_pattern="2:4", input_size=S, output_size=S,
                                          prompt_method="none")
    prune_once(model, "magnitude", 0.5)
    plain = model.merge_and_unload()
    prepared, report = prepare_semi_structured(model, output_report=True)
    convs = [n for n, m in prepared.named_modules() if isinstance(m, SemiStructuredConv2d)]
    assert convs and set(convs) <= set(report.converted)
    for name, (rows, cols) in report.converted.items():
        assert rows % 32 == 0 and cols % 64 == 0
    # Every pruned layer is either converted or listed with its reason.
    assert set(report.converted) | set(report.dense) == {layer.name for layer in model.sparsity.layers}
    stem = model.sparsity.nm_dense_layers[0]
    assert "N:M rule" in report.dense[stem]
    assert any("multiple of (32, 64)" in why for why in report.dense.values())
    assert 0 < report.fraction_of_pruned < 1 and report.converted_weights == sum(
        rows * cols for rows, cols in report.converted.values())
    x = torch.rand(3, 3, S, S)
    mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
    x = (x - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(prepared(x).logits, plain(x).logits, rtol=1e-4, atol=1e-4)
    matrices, _ = semi_structured_matrices(model)
    assert set(matrices) == set(report.converted)
    assert all(m.dim() == 2 and m.is_contiguous() and check_nm(m, 2, 4, exact=False) for m in matrices.values())


def test_semi_structured_matrices_refuse_a_broken_pattern():
    model = wrap()
    model.set_mask(torch.ones(model.sparsity.numel))  # a dense mask: 4 of 4 kept
    with pytest.raises(ValueError, match="does not follow nm_pattern='2:4'"):
        semi_structured_matrices(model)


def test_export_needs_a_2_4_model_and_cuda(monkeypatch):
    with pytest.raises(ValueError, match="needs a model with an N:M mask"):
        export_semi_structured(wrap(nm_pattern=None, sparsity=0.5))
    with pytest.raises(ValueError, match="accelerates 2:4 only"):
        export_semi_structured(wrap(nm_pattern="1:4"))
    model = wrap()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*prepare_semi_structured"):
        export_semi_structured(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU present, the model still on the CPU
    with pytest.raises(ValueError, match=r"on CUDA in float16 or bfloat16.*model.to\('cuda', torch.float16\)"):
        export_semi_structured(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="to_sparse_semi_structured needs CUDA")
def test_export_on_cuda_matches_the_dense_model():
    model = PromptedSparseModel.from_base(tiny_model("resnet_basic"), nm_pattern="2:4", input_size=S, output_size=S,
                                          prompt_method="none")
    prune_once(model, "magnitude", 0.5)
    model.to("cuda", torch.float16)
    dense = prepare_semi_structured(model)
    sparse, report = export_semi_structured(model, output_report=True)
    assert report.converted
    x = torch.rand(8, 3, S, S, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).logits, dense(x).logits, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------- recipe
def test_recipe_run_with_nm_pattern(tmp_path):
    from prompt_sparsity.training import run_pruning

    base = tmp_path / "base"
    tiny_model("resnet_basic", num_labels=20).save_pretrained(base)
    model_args, data_args, prune_args, run_args = recipe_args(str(base), tmp_path / "run", method="hydra")
    prune_args = dataclasses.replace(prune_args, nm_pattern="2:4", sparsity=0.5)
    results = run_pruning(model_args, data_args, prune_args, run_args)
    saved = PromptedSparseModel.from_pretrained(tmp_path / "run")
    assert saved.config.nm_pattern == "2:4" and saved.config.mask_format == "packed"
    assert_pattern(saved)
    assert 0.4 < results["sparsity"] < 0.5  # the 3-channel stem stays dense
