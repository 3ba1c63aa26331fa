"""Export of a 2:4 subnetwork for `torch.sparse.to_sparse_semi_structured` (NVIDIA sparse tensor cores).

`export_semi_structured(model)` returns the merged base model (`merge_and_unload()`) with every eligible layer's
weight converted to a `SparseSemiStructuredTensor`: `Linear` layers keep their module (the weight parameter is
swapped, as in torch's own tutorial), `Conv2d` layers (groups=1) become `SemiStructuredConv2d`, which runs the
conv as one GEMM on channels-last im2col patches with the 2-D matrix `[out, kh*kw*in]` whose rows carry the 2:4
groups (`sparsity.semi_structured.gemm_matrix`). It needs CUDA and fp16/bf16 weights.

`prepare_semi_structured(model)` does the same on any device but keeps the weights dense: the exact model that
would be converted (its logits equal `merge_and_unload()`'s), for checking on a CPU.
`semi_structured_matrices(model)` gives the validated 2-D 2:4 matrices and a `SemiStructuredReport` of what
is converted and why every other layer stays dense.

Rules (torch 2.14 `torch/sparse/semi_structured.py`): 2-D, contiguous, CUDA, fp16/bf16, and both dimensions a
multiple of the backend's block: CUTLASS (32, 64), cuSPARSELt (16, 16) for fp16/bf16. The stricter (32 rows,
64 columns) is required here so the export works on either backend; a 1000-class head (1000 rows) stays dense.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .label_mapping import replace_module
from .sparsity.semi_structured import check_nm, gemm_matrix, group_inputs, nm_eligible, parse_nm

logger = logging.getLogger(__name__)

#: Both dimensions of a converted matrix must be a multiple of these (fp16/bf16; CUTLASS's, the stricter backend).
MIN_ROWS, MIN_COLS = 32, 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class SemiStructuredReport:
    """What an export converts: `converted` {module: [rows, cols] of its 2-D GEMM matrix}, `dense` {module: why
    it stays dense} for every pruned layer that is not converted, and the weight counts."""

    pattern: str
    converted: dict[str, list[int]] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    converted_weights: int = 0
    pruned_weights: int = 0  # every weight of the pruned layers (the merged model's shapes)
    model_parameters: int = 0  # every parameter of the merged model

    @property
    def fraction_of_pruned(self) -> float:
        return self.converted_weights / self.pruned_weights if self.pruned_weights else 0.0

    @property
    def fraction_of_parameters(self) -> float:
        return self.converted_weights / self.model_parameters if self.model_parameters else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(fraction_of_pruned=self.fraction_of_pruned, fraction_of_parameters=self.fraction_of_parameters)
        return out


class SemiStructuredConv2d(nn.Module):
    """A `Conv2d` (groups=1, zero padding) run as one GEMM: channels-last im2col patches `[B*L, kh*kw*in]` times
    the 2-D weight `[out, kh*kw*in]` (`gemm_matrix` of the conv weight), so the weight can be a
    `SparseSemiStructuredTensor` (`F.linear` dispatches to the sparse kernel). A 1x1 stride-1 conv skips the
    unfold. Same outputs as the conv it replaces (up to float rounding)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.weight = nn.Parameter(gemm_matrix(conv.weight.detach()).contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            y = F.linear(x.permute(0, 2, 3, 1).reshape(b * h * w, c), self.weight, self.bias)
            return y.view(b, h, w, -1).permute(0, 3, 1, 2)
        h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        # unfold orders a patch (c, kh, kw); the 2:4 groups run along c at each tap: reorder to (kh, kw, c).
        patches = patches.view(b, c, kh * kw, -1).permute(0, 3, 2, 1).reshape(-1, kh * kw * c)
        y = F.linear(patches, self.weight, self.bias)
        return y.view(b, h_out, w_out, -1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, weight={type(self.weight).__name__}"
                f"{list(self.weight.shape)}")


def _two_four(model) -> tuple[int, int]:
    pattern = getattr(model.config, "nm_pattern", None)
    if getattr(model, "sparsity", None) is None or pattern is None:
        raise ValueError("semi-structured export needs a model with an N:M mask: build it with nm_pattern='2:4' "
                         "(PromptedSparseModel.from_base(..., nm_pattern='2:4'), or --nm_pattern 2:4 in a recipe).")
    n, m = parse_nm(pattern)
    if (n, m) != (2, 4):
        raise ValueError(f"nm_pattern={pattern!r}: torch.sparse.to_sparse_semi_structured accelerates 2:4 only (for "
                         "fp16/bf16); search the mask with nm_pattern='2:4'.")
    return n, m


def _why_dense(module: nn.Module, matrix_shape, mask_shape, m: int, convs: bool) -> str | None:
    if not nm_eligible(mask_shape, m):
        return (f"left dense by the N:M rule: {group_inputs(mask_shape)} inputs per tap is not a multiple of {m}")
    if isinstance(module, nn.Conv2d):
        if not convs:
            return "conv (convs=False)"
        if type(module) is not nn.Conv2d:
            return f"{type(module).__name__} is a Conv2d subclass with its own forward; not converted"
        if module.groups != 1:
            return f"grouped conv (groups={module.groups}): not one GEMM"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} / padding_mode {module.padding_mode!r}: only explicit zero padding"
    rows, cols = matrix_shape
    if rows % MIN_ROWS or cols % MIN_COLS:
        return (f"GEMM matrix [{rows}, {cols}] is not a multiple of ({MIN_ROWS}, {MIN_COLS}) (torch's semi-structured "
                "shape rule for fp16/bf16)")
    return None


@torch.no_grad()
def semi_structured_matrices(model, *, convs: bool = True, plain: nn.Module | None = None):
    """The 2-D 2:4 weight matrices `{module name: [out, K] tensor}` that `export_semi_structured` converts (of the
    merged model `plain`, default `model.merge_and_unload()`), each checked to hold at most 2 non-zeros in every
    4 along its rows, and a `SemiStructuredReport`. Runs on any device. Raises a ValueError if an eligible layer
    breaks the pattern (a mask installed by hand)."""
    n, m = _two_four(model)
    if plain is None:
        plain = model.merge_and_unload()
    modules = dict(plain.named_modules())
    report = SemiStructuredReport(pattern=f"{n}:{m}", model_parameters=sum(p.numel() for p in plain.parameters()))
    matrices = {}
    for layer in model.sparsity.layers:
        module = modules[layer.name]
        weight = module.weight
        report.pruned_weights += weight.numel()
        matrix_shape = (weight.shape[0], weight[0].numel())
        reason = _why_dense(module, matrix_shape, tuple(weight.shape), m, convs)
        if reason is not None:
            report.dense[layer.name] = reason
            continue
        if not check_nm(weight, n, m, exact=False):
            raise ValueError(f"layer {layer.name!r} has more than {n} non-zeros in some group of {m}: its mask does not "
                             f"follow nm_pattern={model.config.nm_pattern!r} (installed with set_mask?). Recompute "
                             "the mask with the N:M selection (prune_once or a score search with nm_pattern set).")
        matrices[layer.name] = gemm_matrix(weight).contiguous()
        report.converted[layer.name] = list(matrix_shape)
        report.converted_weights += weight.numel()
    return matrices, report


@torch.no_grad()
def prepare_semi_structured(model, *, convs: bool = True, keep_prompt: bool = False, output_report: bool = False):
    """`model.merge_and_unload(keep_prompt=...)` with every convertible Conv2d replaced by a `SemiStructuredConv2d`
    (dense weights): the model `export_semi_structured` would convert, on any device. Its outputs equal the
    merged model's (up to float rounding). `output_report=True` also returns the `SemiStructuredReport`."""
    merged = model.merge_and_unload(keep_prompt=keep_prompt)
    plain = merged.model if keep_prompt else merged
    matrices, report = semi_structured_matrices(model, convs=convs, plain=plain)
    modules = dict(plain.named_modules())
    for name in matrices:
        if isinstance(modules[name], nn.Conv2d):
            replace_module(plain, name, SemiStructuredConv2d(modules[name]))
    return (merged, report) if output_report else merged


@torch.no_grad()
def export_semi_structured(model, *, convs: bool = True, keep_prompt: bool = False, output_report: bool = False):
    """The merged model with every convertible weight as a `torch.sparse` semi-structured (2:4) tensor (see the
    module docstring; `convs=False` converts Linear layers only). The model must be on a CUDA device in fp16 or
    bf16 (`model.to("cuda", torch.float16)`); on a CPU it raises a ValueError saying so. Every pruned layer that
    is not converted is listed with its reason in the report (`output_report=True` returns `(model, report)`;
    the counts are also logged)."""
    _two_four(model)
    if not torch.cuda.is_available():
        raise ValueError(
            "export_semi_structured needs a CUDA GPU: torch.sparse.to_sparse_semi_structured only runs on CUDA "
            "(fp16/bf16 weights, sparse tensor cores) and none is available here. On a CPU use "
            "prepare_semi_structured(model) (the same 2:4 model with dense weights) or merge_and_unload().")
    weight = dict(model.model.named_parameters())[model.sparsity.layers[0].param_name]
    if weight.device.type != "cuda" or weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"export_semi_structured needs the model on CUDA in float16 or bfloat16 (it is on "
                         f"{weight.device} in {weight.dtype}); call model.to('cuda', torch.float16) first.")
    from torch.sparse import to_sparse_semi_structured

    merged, report = prepare_semi_structured(model, convs=convs, keep_prompt=keep_prompt, output_report=True)
    plain = merged.model if keep_prompt else merged
    modules = dict(plain.named_modules())
    for name in report.converted:
        module = modules[name]
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()),
                                     requires_grad=False)
    logger.info("export_semi_structured: %d layers (%.1f%% of the pruned weights) converted to 2:4 sparse tensors; "
                "%d left dense.", len(report.converted), 100 * report.fraction_of_pruned, len(report.dense))
    return (merged, report) if output_report else merged


__all__ = [
    "MIN_COLS",
    "MIN_ROWS",
    "SemiStructuredConv2d",
    "SemiStructuredReport",
    "export_semi_structured",
    "prepare_semi_structured",
    "semi_structured_matrices",
]
