"""Transfer a searched subnetwork to another dataset (VPNS.md §8 transfer, PASS.md §4).

VPNs (unstructured): the mask (and optionally the prompt) is applied to the *pretrained* base named in the
subnetwork's config, the label mapping is recomputed for the new dataset, and the weights are fine-tuned with
the mask fixed. Only the mask and prompt tensors are downloaded, not the fine-tuned weights.
PASS (structured): (a) the compact structure (kept channel indices) is cut out of the pretrained base and
fine-tuned; or (b) the pulled hypernetwork is adapted for a few epochs on the new data and prunes anew.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .configuration import PromptedSparseConfig
from .methods import FINETUNE, STRUCTURE_SEARCH, Method, Prune, Stage
from .sparsity.unstructured import mask_from_scores_, unpack_mask


@dataclass
class TransferArguments:
    subnetwork: str | None = field(default=None, metadata={"help": "Repo id or local directory of a saved subnetwork."})
    subnetwork_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the repo."})
    transfer_prompt: bool = field(default=True, metadata={"help": "Start from the subnetwork's prompt too."})
    adapt_hypernetwork: bool = field(
        default=False,
        metadata={"help": "PASS: adapt the pulled hypernetwork (search_epochs) and prune anew, instead of reusing "
                          "the compact structure."},
    )


def load_subnetwork_config(source: str, revision: str | None = None) -> PromptedSparseConfig:
    from .hub import download_subnetwork

    path = download_subnetwork(source, revision=revision, include_weights=False)
    with open(os.path.join(path, "config.json")) as f:
        data = json.load(f)
    if data.get("model_type") != "prompted_sparse":
        raise ValueError(f"{source} is not a prompt_sparsity subnetwork (config model_type "
                         f"{data.get('model_type')!r}); give a directory or repo saved by PromptedSparseModel.")
    return PromptedSparseConfig.from_dict(data)


def transfer_plan(config: PromptedSparseConfig, args: TransferArguments) -> Method:
    prompt = config.prompt_method
    steps = "two" if prompt != "none" else "augmented"
    if config.sparsity_type == "structured":
        if args.adapt_hypernetwork:
            if getattr(config, "structure_search", "hypernetwork") != "hypernetwork":
                raise ValueError("this subnetwork's channels were searched with per-channel scores "
                                 "(structure_search='scores'), it has no hypernetwork to adapt: transfer its compact "
                                 "structure (adapt_hypernetwork=False).")
            plan = (STRUCTURE_SEARCH, Prune("hypernetwork"), FINETUNE)
        else:
            if not config.channel_widths:
                raise ValueError("this PASS subnetwork was never compacted: transfer it with adapt_hypernetwork=True.")
            plan = (Prune("transferred_structure"), FINETUNE)
        return Method("transfer", plan, prompt_method=prompt, steps=steps, structured=True)
    if config.sparsity_type != "unstructured":
        raise ValueError("this subnetwork has no sparsity to transfer (sparsity_type='none').")
    return Method("transfer", (Stage("finetune", "finetune_epochs"),), prompt_method=prompt, steps=steps,
                  threshold=config.threshold)


def fetch_tensors(source: str, config: PromptedSparseConfig, args: TransferArguments) -> dict[str, torch.Tensor]:
    """Only the tensors the transfer needs (mask or structure, prompt, hypernetwork) — never the fine-tuned weights."""
    from .hub import download_tensors

    if config.sparsity_type == "unstructured":
        names = ["sparsity.mask_packed"] if config.mask_format == "packed" else ["sparsity.scores"]
    elif args.adapt_hypernetwork:
        names = ["structure.hypernetwork.*"]
    else:
        names = ["structure.kept_indices"]
    if args.transfer_prompt and config.prompt_method != "none":
        names.append("prompt.*")
    return download_tensors(source, names, revision=args.subnetwork_revision)


def _refuse_other_class_count(model, config: PromptedSparseConfig) -> None:
    """A mask that covers a new head cannot fit a head for another number of classes: say that, not 'another base'."""
    searched, wanted = len(config.id2label or {}), model.config.num_labels
    recorded = {name: list(shape) for name, shape in config.pruned_layers}
    current = {name: list(shape) for name, shape in model.config.pruned_layers}
    differing = [n for n in set(recorded) | set(current) if recorded.get(n) != current.get(n)]
    head_only = all(n in recorded and n in current and recorded[n][0] == searched and current[n][0] == wanted
                    and recorded[n][1:] == current[n][1:] for n in differing)
    if config.head == "new" and searched != wanted and head_only:
        raise ValueError(
            f"the subnetwork was searched with a new {searched}-class head (head='new') whose weights are part of its "
            f"mask ({', '.join(sorted(differing))}); this dataset has {wanted} classes, so that part of the mask has "
            f"nothing to apply to. Fix: transfer to a dataset with {searched} classes, or search the subnetwork with "
            f"head='pretrained' (the label mapping is recomputed for the new classes) or with the head kept out of "
            f"the mask (--exclude_modules {sorted(differing)[0]!r}), then transfer that one."
        )


@torch.no_grad()
def apply_subnetwork(model, config: PromptedSparseConfig, tensors: dict[str, torch.Tensor],
                     num_labels: int | None = None) -> None:
    """Install the transferred mask / structure / hypernetwork / prompt into a freshly wrapped pretrained model
    (`num_labels`: the new dataset's class count, checked against what the subnetwork's head can serve)."""
    source = model.model.config.num_labels
    if num_labels is not None and config.head == "pretrained" and num_labels > source:
        raise ValueError(
            f"the subnetwork keeps the pretrained {source}-class head (head='pretrained') and reads the new classes "
            f"from its outputs (label mapping), which needs at least as many outputs as this dataset's {num_labels} "
            f"classes. Fix: transfer to a dataset with at most {source} classes, or search a subnetwork with a new "
            "head kept out of the mask (--head new --exclude_modules <classifier>), which transfers to any class count."
        )
    if model.sparsity is not None:
        if [list(x) for x in model.config.pruned_layers] != [list(x) for x in config.pruned_layers]:
            _refuse_other_class_count(model, config)
            raise ValueError("the subnetwork's mask does not fit this base model (different prunable layers or "
                             "shapes); transfer onto the base it was searched on, with the same head setting.")
        n = model.sparsity.numel
        if "sparsity.mask_packed" in tensors:
            mask = unpack_mask(tensors["sparsity.mask_packed"], n)
        else:
            mask = torch.empty(n)
            mask_from_scores_(tensors["sparsity.scores"], mask, model.sparsity.layers, config.sparsity,
                              config.threshold, nm_pattern=getattr(config, "nm_pattern", None))
        model.set_mask(mask)
    elif "structure.kept_indices" in tensors:
        if [list(x) for x in model.config.channel_units] != [list(x) for x in config.channel_units]:
            raise ValueError("the subnetwork's channel units do not fit this base model; transfer onto the base it "
                             "was searched on.")
        indices, offset, masks = tensors["structure.kept_indices"].long(), 0, []
        for name, channels in config.channel_units:
            k = config.channel_widths[name]
            mask = torch.zeros(channels)
            mask[indices[offset : offset + k]] = 1
            masks.append(mask)
            offset += k
        model.compact(masks)
    else:
        hyper = {k[len("structure.hypernetwork."):]: v for k, v in tensors.items()
                 if k.startswith("structure.hypernetwork.")}
        model.structure.hypernetwork.load_state_dict(hyper)
    prompt = {k[len("prompt."):]: v for k, v in tensors.items() if k.startswith("prompt.")}
    if prompt:
        model.prompt.load_state_dict(prompt)
