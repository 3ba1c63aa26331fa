"""The tiny models the tests rely on are sensitive: their logits change with the input, with the mask, with every
single pruned layer and with the BatchNorm statistics. Otherwise a test comparing logits (save/load round trips,
merge_and_unload, compaction) passes whatever the code does."""

import pytest
import torch
from tiny_models import ARCHITECTURES, IMAGE_SIZE, tiny_model

from prompt_sparsity import PromptedSparseModel

S = IMAGE_SIZE
# Round-trip tests compare logits to ~1e-5; a real change must be far above that.
CHANGED = 1e-3


def wrap(arch):
    model = PromptedSparseModel.from_base(tiny_model(arch), sparsity=0.5, input_size=S, output_size=S, pad_size=4)
    return model.eval()


def images(seed):
    return torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_depend_on_input_mask_and_every_layer(arch):
    model = wrap(arch)
    x = images(1)
    with torch.no_grad():
        masked = model(x).logits
        assert (masked[0] - masked[1]).abs().max() > CHANGED * 100, "two images give the same logits"
        assert (model(images(2)).logits - masked).abs().max() > CHANGED * 100
        n = model.sparsity.numel
        model.set_mask(torch.ones(n))
        dense = model(x).logits
        assert (dense - masked).abs().max() > CHANGED * 100, "the 50% mask does not change the logits"
        # Each pruned layer on its own matters (ConvNeXt's 1e-6 layer scale used to hide whole blocks).
        quiet = []
        for layer in model.sparsity.layers:
            mask = torch.ones(n)
            mask[layer.offset : layer.offset + layer.numel : 2] = 0
            model.set_mask(mask)
            if (model(x).logits - dense).abs().max() <= CHANGED:
                quiet.append(layer.name)
        assert not quiet, f"pruning half of these layers leaves the logits unchanged: {quiet}"


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ("vit", "convnext")])  # LayerNorm nets
def test_batchnorm_statistics_matter(arch):
    model = tiny_model(arch)
    x = images(3) * 2 - 1
    with torch.no_grad():
        before = model(x).logits
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
        assert (model(x).logits - before).abs().max() > CHANGED * 100
