"""Output label mapping (VPNS.md §5): frequency label mapping (FLM) and folding a mapping into the head."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def greedy_assignment(counts: torch.Tensor) -> list[int]:
    """One-to-one source->target assignment: repeatedly take the largest entry of the (source x target) count
    matrix, assign, and remove its row and column. Returns, for each target class, its source class."""
    counts = counts.clone().to(torch.float64)
    num_source, num_target = counts.shape
    if num_target > num_source:
        raise ValueError(
            f"FLM needs at least as many source classes as target classes ({num_source} < {num_target}); use a "
            "new head instead (head='new')."
        )
    mapping = [-1] * num_target
    for _ in range(num_target):
        flat = int(torch.argmax(counts))
        source, target = divmod(flat, num_target)
        mapping[target] = source
        counts[source, :] = -1
        counts[:, target] = -1
    return mapping


def distinct_predictions(counts: torch.Tensor) -> int:
    """How many source classes the network predicted at least once (rows of the count matrix with any count)."""
    return int(torch.count_nonzero(counts.sum(dim=1)))


def is_degenerate(counts: torch.Tensor) -> bool:
    """A mapping from these counts is degenerate when the network predicted fewer distinct source classes than
    there are target classes: the greedy assignment then gives some targets a source class it never predicted,
    i.e. an arbitrary one (a collapsed network that predicts one class for every image maps [c, 0, 1, 2, ...])."""
    return distinct_predictions(counts) < counts.shape[1]


@torch.no_grad()
def frequency_label_mapping(
    model,
    dataloader: Iterable,
    num_labels: int,
    *,
    use_prompt: bool = False,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    return_counts: bool = False,
) -> list[int] | tuple[list[int], torch.Tensor]:
    """Frequency label mapping over a dataloader of `{"pixel_values", "labels"}` batches.

    `model` is a `PromptedSparseModel` (its masked network, without the label mapping, is used; un-prompted by
    default as in the paper). `reduce_fn` sums the count matrix across processes (e.g. `accelerator.reduce`), so
    every rank gets the same mapping. `return_counts` also returns the (source x target) count matrix (see
    `is_degenerate`).
    """
    was_training = model.training
    model.eval()
    counts = None
    try:
        for batch in progress(dataloader) if progress else dataloader:
            logits = model.source_logits(batch["pixel_values"], use_prompt=use_prompt)
            labels = batch["labels"].to(logits.device)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
                raise ValueError(f"labels must be in [0, {num_labels}); got {labels.min()}..{labels.max()}.")
            if counts is None:
                counts = torch.zeros(logits.shape[-1], num_labels, dtype=torch.long, device=logits.device)
            counts.index_put_((logits.argmax(-1), labels), torch.ones_like(labels), accumulate=True)
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("FLM got an empty dataloader; it needs the training set to count predictions.")
    if reduce_fn is not None:
        counts = reduce_fn(counts)
    mapping = greedy_assignment(counts.cpu())
    return (mapping, counts.cpu()) if return_counts else mapping


def find_classifier(model: nn.Module, num_outputs: int | None = None) -> tuple[str, nn.Linear]:
    """The Linear layer that produces the logits: the last Linear whose width is the model's number of labels."""
    if num_outputs is None:
        num_outputs = model.config.num_labels
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_outputs:
            found = (name, module)
    if found is None:
        raise ValueError(
            f"could not find the classifier of {type(model).__name__}: no Linear layer with {num_outputs} outputs."
        )
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fold_label_mapping(model: nn.Module, mapping: list[int], id2label: dict[int, str]) -> None:
    """Make `model` output only the mapped logits, in target order, by slicing its classifier (in place)."""
    name, head = find_classifier(model)
    index = torch.tensor(mapping, dtype=torch.long, device=head.weight.device)
    new = nn.Linear(head.in_features, len(mapping), bias=head.bias is not None).to(head.weight)
    new.weight.copy_(head.weight.index_select(0, index))
    if head.bias is not None:
        new.bias.copy_(head.bias.index_select(0, index))
    replace_module(model, name, new)
    set_labels(model.config, id2label)
    if hasattr(model, "num_labels"):
        model.num_labels = len(mapping)


def set_labels(config, id2label: dict[int, str]) -> None:
    config.id2label = {int(k): v for k, v in id2label.items()}
    config.label2id = {v: int(k) for k, v in config.id2label.items()}
    config.num_labels = len(config.id2label)
    if hasattr(config, "num_classes"):  # TimmWrapperConfig keeps both
        config.num_classes = len(config.id2label)
