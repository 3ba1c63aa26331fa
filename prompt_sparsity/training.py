"""The accelerate training loop shared by every method: stages of two-step (prompted + augmented) iterations,
one-shot pruning steps, evaluation with and without the prompt, per-epoch checkpoints that resume exactly, and a
`results.json` at the end. Recipes parse arguments and call `run_pruning`."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import re
import time
import warnings
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from .arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from .checkpointing import (
    check_launch,
    check_output_dir,
    check_shared_output_dir,
    load_training_checkpoint,
    publish_output,
    read_checkpoint_state,
    resolve_resume_checkpoint,
    run_settings,
    save_training_checkpoint,
    write_json_atomic,
)
from .data import EpochShuffleSampler, load_image_dataset, make_dataloader
from .label_mapping import distinct_predictions, frequency_label_mapping, is_degenerate
from .methods import Method, Prune, Stage, display_name, expand_plan, get_method, with_tuning
from .metrics import load_metric
from .modeling import PromptedSparseModel
from .optim import (
    HYPERNET_LR_RULE,
    SCORE_LR_RULE,
    SEARCH_PROMPT_LR_RULE,
    STRUCTURE_PROMPT_LR_RULE,
    auto_score_lr,
    build_optimizer,
    resolve_lr,
    schedule_fn,
)
from .plots import write_training_curves
from .settings import effective_settings, format_settings
from .tracking import check_trackers, log_epoch, log_step, subnetwork_scalars

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- helpers
def short_name(name_or_path: str) -> str:
    base = os.path.basename(os.path.normpath(name_or_path)).lower()
    aliases = {"efficientnet-lite0": "effl0", "resnet-18": "r18", "resnet-50": "r50", "fashion_mnist": "fmnist",
               "cifar100": "c100", "cifar10": "c10"}
    return aliases.get(base, re.sub(r"[^a-z0-9]+", "", base)[:12] or "model")


def run_name(method: str, model_name: str, dataset: str, sparsity: float) -> str:
    return f"{method}-{short_name(model_name)}-{short_name(dataset)}-s{round(sparsity * 100)}"


def mask_digest(model: PromptedSparseModel) -> str:
    """A fingerprint of the subnetwork (the 0/1 mask, or the kept channel indices) to compare across processes."""
    if model.sparsity is not None:
        data = (model.sparsity.mask() > 0).to(torch.uint8)
    elif model.structure is not None:
        data = model.structure.kept_indices
    else:
        return ""
    return hashlib.sha256(data.cpu().numpy().tobytes()).hexdigest()


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, *, use_prompt: bool, desc: str = "eval") -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) over a prepared dataloader, gathered across processes."""
    accuracy, top5 = load_metric("accuracy"), load_metric("top5_accuracy")
    model.eval()
    for batch in tqdm(dataloader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(pixel_values=batch["pixel_values"], use_prompt=use_prompt).logits
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        accuracy.add_batch(predictions=logits.argmax(-1).cpu(), references=labels.cpu())
        top5.add_batch(predictions=logits.float().cpu().tolist(), references=labels.cpu())
    return {
        "accuracy": 100.0 * accuracy.compute()["accuracy"],
        "top5_accuracy": 100.0 * top5.compute()["top5_accuracy"],
    }


# --------------------------------------------------------------------------------------------------- runner
class PruningRun:
    """One run of one method: the model, the data, the plan, and the state needed to resume."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, prune_args: PruningArguments,
                 run_args: RunArguments, method: Method | None = None):
        self.model_args, self.data_args, self.prune_args, self.run_args = model_args, data_args, prune_args, run_args
        # The tuning recipe ("X w. two-step", "X w. prompt") is a variant of the registered method.
        self.method: Method = method or with_tuning(get_method(prune_args.method),
                                                    finetune_steps=prune_args.finetune_steps,
                                                    prompt_method=model_args.prompt_method)
        check_combination(self.method, model_args, prune_args)
        self.prompt_method = model_args.prompt_method or self.method.prompt_method
        self.prompt_on = self.prompt_method != "none"
        self.steps = prune_args.steps or self.method.steps
        if self.steps not in ("two", "prompted", "augmented"):
            raise ValueError(f"steps={self.steps!r}: use 'two', 'prompted' or 'augmented'.")
        self.sparsity = prune_args.sparsity if self.method.sparse and not self.method.structured else 0.0
        self.name = run_name(self.method.name, model_args.model_name_or_path, data_args.dataset_name, self.sparsity)
        if prune_args.nm_pattern and self.method.sparse:  # apart from an unstructured run at the same sparsity
            self.name += "-nm" + prune_args.nm_pattern.replace(":", "of")
        if self.method.structured:
            self.name = self.name.rsplit("-s", 1)[0] + f"-f{round(prune_args.flops_ratio * 100)}"
        self.output_dir = run_args.output_dir or os.path.join("outputs", self.name)
        check_trackers(run_args.report_to)  # a missing tracker package: an error now, not a warning and no logs
        self.accelerator = Accelerator(
            cpu=run_args.cpu,
            log_with=None if run_args.report_to == "none" else run_args.report_to,
            project_dir=self.output_dir,
            gradient_accumulation_steps=run_args.gradient_accumulation_steps,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if self.accelerator.device.type == "cpu":
            # `accelerate launch` sets OMP_NUM_THREADS=1; on CPU give each process its share of the cores.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(run_args.torch_threads or max(1, cores // self.accelerator.num_processes))
        # One process where several were asked for, several single-process runs, FSDP asked for but not active.
        check_launch(self.accelerator.num_processes, distributed_type=self.accelerator.distributed_type)
        self.state: dict[str, Any] = {"stage": 0, "epoch": -1, "history": [], "timings": {}, "label_mapping": None}
        self._dense_flm = None  # FLM on the dense network, when a mapping needs it (dense_label_mapping)

    # ------------------------------------------------------------------ setup
    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            logger.info(msg)
            print(msg, flush=True)

    def build(self) -> None:
        acc, margs, dargs, pargs = self.accelerator, self.model_args, self.data_args, self.prune_args
        set_seed(self.run_args.seed)
        with acc.main_process_first():
            self.data = load_image_dataset(
                dargs.dataset_name, validation_fraction=dargs.validation_fraction, seed=self.run_args.seed,
                max_train_samples=dargs.max_train_samples, max_eval_samples=dargs.max_eval_samples,
                image_column=dargs.image_column, label_column=dargs.label_column,
                config_name=dargs.dataset_config_name, validation_dir=dargs.validation_dir, cache_dir=margs.cache_dir,
            )
            self.model = PromptedSparseModel.from_base(
                margs.model_name_or_path, revision=margs.revision, head=margs.head,
                id2label=self.data.id2label if margs.head == "new" else None,
                sparsity=self.sparsity, threshold=pargs.threshold or self.method.threshold,
                sparsity_type="structured" if self.method.structured else "unstructured",
                flops_ratio=pargs.flops_ratio, channel_selection=pargs.channel_selection,
                min_channels=pargs.min_channels, hypernet_hidden_size=pargs.hypernet_hidden_size,
                flops_penalty=pargs.flops_penalty, channel_discovery=pargs.channel_discovery,
                structure_search=self.structure_search(),
                target_modules=pargs.target_modules, exclude_modules=pargs.exclude_modules,
                min_layer_density=pargs.min_layer_density, prompt_method=self.prompt_method, input_size=margs.input_size,
                nm_pattern=pargs.nm_pattern if self.method.sparse else None,
                output_size=margs.output_size or margs.input_size, pad_size=margs.pad_size,
                mask_size=margs.mask_size, prompt_at_inference=margs.prompt_at_inference and self.prompt_on,
                cache_dir=margs.cache_dir, trust_remote_code=margs.trust_remote_code or None,
            )
        what = (f"{len(self.model.structure.units)} channel units" if self.model.structure is not None
                else f"{self.model.sparsity.numel if self.model.sparsity else 0:,} prunable weights")
        self.log(f"{self.name}: {self.data.name} train/val/test = {len(self.data.train)}/"
                 f"{len(self.data.validation)}/{len(self.data.test)}, {self.data.num_labels} classes; {what}")
        if any(getattr(step, "rewind", False) for step in self.method.plan):  # OMP, IMP (`Rounds`)
            self._pretrained_state = {k: v.detach().clone() for k, v in self.model.model.state_dict().items()}
        s, bs = self.model.config.input_size, dargs.per_device_train_batch_size  # resolved from the model if unset
        workers = dargs.dataloader_num_workers
        train = self.data.train
        # Two independently shuffled views of the training split (VPNS.md §6).
        self.loader_a = make_dataloader(train, input_size=s, train_transform=False, batch_size=bs, shuffle=False,
                                        num_workers=workers, sampler=EpochShuffleSampler(len(train), self.run_args.seed))
        self.loader_b = make_dataloader(train, input_size=s, train_transform=True, batch_size=bs, shuffle=False,
                                        num_workers=workers,
                                        sampler=EpochShuffleSampler(len(train), self.run_args.seed + 1))
        ebs = dargs.per_device_eval_batch_size
        self.eval_loaders = {
            split: self.accelerator.prepare_data_loader(
                make_dataloader(getattr(self.data, split), input_size=s, train_transform=False, batch_size=ebs,
                                shuffle=False, num_workers=workers))
            for split in ("validation", "test")
        }

    def structure_search(self) -> str:
        """A structured method that prunes by `Prune("channel_scores")` searches per-channel scores (VPNs with
        channel scores); the others carry PASS's hypernetwork."""
        by_scores = any(isinstance(s, Prune) and s.criterion == "channel_scores" for s in self.method.plan)
        return "scores" if by_scores else "hypernetwork"

    def checkpoint_dir(self, stage: int, epoch: int) -> str:
        return os.path.join(self.output_dir, "checkpoints", f"stage{stage}-epoch{epoch}")

    def settings(self) -> dict[str, Any]:
        """The settings that define this run's result, recorded in every checkpoint (`checkpointing.run_settings`)."""
        return run_settings(self.all_args(), world_size=self.accelerator.num_processes)

    def settings_defaults(self) -> dict[str, Any]:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for args in self._argument_groups() for f in dataclasses.fields(args)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    def find_resume_checkpoint(self) -> str | None:
        """The checkpoint to resume from: only one of this run (same settings), with every file intact (a damaged
        one is refused there, naming the file, not deep inside the load), see `resolve_resume_checkpoint`."""
        return resolve_resume_checkpoint(self.run_args.resume_from_checkpoint, self.output_dir, self.settings(),
                                         self.settings_defaults())

    # ------------------------------------------------------------------ stages
    def _param_groups(self, kind: str, total_steps: int):
        """The stage's optimiser (one per group: `*_optimizer`) and each group's schedule (`*_schedule`); 'auto'
        learning rates follow the stage's number of optimiser steps (`prompt_sparsity.optim`)."""
        pargs, model = self.prune_args, self.model
        prompt_params = [p for p in model.prompt.parameters()] if self.prompt_on else []

        names = []

        def group(params, lr_field, rule, optimizer, schedule, weight_decay=0.0):
            names.append(lr_field)
            lr = resolve_lr(getattr(pargs, lr_field), rule, total_steps, lr_field) * pargs.lr_scale
            self.state.setdefault("learning_rates", {})[f"{kind}/{lr_field}"] = lr
            return ({"params": params, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer}, schedule)

        if kind == "bilevel":  # BiP: weights (lower level, ridge = bip_gamma) + scores (+ prompt), one optimiser
            weights = [p for n, p in model.named_parameters()
                       if p.requires_grad and not n.startswith("prompt.") and p is not model.sparsity.scores]
            spec = [group(weights, "finetune_lr", None, pargs.finetune_optimizer, pargs.finetune_schedule,
                          pargs.bip_gamma),
                    group([model.sparsity.scores], "score_lr", self.score_lr_rule(kind), pargs.score_optimizer,
                          pargs.score_schedule, pargs.score_weight_decay)]
            if prompt_params:
                spec.append(group(prompt_params, "search_prompt_lr", SEARCH_PROMPT_LR_RULE,
                                  pargs.search_prompt_optimizer, pargs.search_prompt_schedule,
                                  pargs.score_weight_decay))
        elif kind == "search":  # the mask scores: of the weights, or of the channels (structure_search="scores")
            scores = model.sparsity.scores if model.sparsity is not None else model.structure.channel_scores.scores
            rule = self.score_lr_rule(kind) if model.sparsity is not None else SCORE_LR_RULE
            spec = [group([scores], "score_lr", rule, pargs.score_optimizer,
                          pargs.score_schedule, pargs.score_weight_decay)]
            if prompt_params:
                spec.append(group(prompt_params, "search_prompt_lr", SEARCH_PROMPT_LR_RULE,
                                  pargs.search_prompt_optimizer, pargs.search_prompt_schedule,
                                  pargs.score_weight_decay))
        elif kind == "structure_search":
            spec = [group(list(model.structure.hypernetwork.parameters()), "hypernet_lr", HYPERNET_LR_RULE,
                          "adam", "cosine")]
            if prompt_params:
                spec.append(group(prompt_params, "structure_prompt_lr", STRUCTURE_PROMPT_LR_RULE, "adam", "cosine"))
        else:
            weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prompt.")]
            spec = [group(weights, "finetune_lr", None, pargs.finetune_optimizer, pargs.finetune_schedule,
                          pargs.finetune_weight_decay)]
            if prompt_params:
                spec.append(group(prompt_params, "finetune_prompt_lr", None, pargs.finetune_prompt_optimizer,
                                  pargs.finetune_prompt_schedule, pargs.finetune_weight_decay))
        groups, schedules = [g for g, _ in spec], [s for _, s in spec]
        self._param_group_names = names  # for the trackers' lr per group
        return build_optimizer(groups, momentum=pargs.momentum), schedules

    def _prepare_structure(self, kind: str) -> None:
        """Put the model in the state a stage starts from (before a checkpoint of that stage is loaded)."""
        model = self.model
        if kind == "search":
            model.start_mask_search()
        elif kind == "bilevel":  # BiP: scores and weights both train (the prompt when the run has one)
            model.start_mask_search()
            model.requires_grad_(True)
            model.prompt.requires_grad_(self.prompt_on)
        elif kind == "structure_search":
            model.start_structure_search()
        else:
            if model.structure is not None and not model.structure.compact:
                # Resuming after the compaction: rebuild the compact architecture, the checkpoint fills it in.
                model.structure.restore_widths_(model.model, self.state["channel_widths"])
            if kind == "dense" and model.sparsity is not None and model.config.mask_format == "scores":
                model.set_mask(torch.ones(model.sparsity.numel))
            model.start_finetuning(train_prompt=self.prompt_on)

    def score_lr_rule(self, kind: str):
        """`auto` for weight-mask scores: tied to the scores' scale at the threshold when the stage first started
        (kept in the state, so a resumed run resolves the same rate; `optim.auto_score_lr`)."""
        from .methods.pruners import score_threshold

        thresholds = self.state.setdefault("score_threshold_at_start", {})
        if kind not in thresholds:
            thresholds[kind] = score_threshold(self.model)
        return lambda steps: auto_score_lr(steps, thresholds[kind])

    def iterations_per_epoch(self, steps: str) -> int:
        iters = len(self.loader_a if steps != "augmented" else self.loader_b)
        iters = math.ceil(iters / self.accelerator.num_processes)
        if self.run_args.max_steps_per_epoch:
            iters = min(iters, self.run_args.max_steps_per_epoch)
        return iters

    def train_stage(self, stage_idx: int, stage: Stage, resume_from: str | None) -> None:
        acc, pargs = self.accelerator, self.prune_args
        epochs = int(getattr(pargs, stage.epochs_field))
        steps = stage.steps or self.steps
        iters = self.iterations_per_epoch(steps)
        max_steps = self.run_args.max_train_steps if epochs > 0 else None  # HF: the steps decide the epochs
        if stage.iterations is not None:  # an IMP phase: its share of the epochs, in iterations
            epochs = math.ceil(stage.iterations / iters)
        elif max_steps:
            epochs = math.ceil(max_steps / iters)
        self._prepare_structure(stage.kind)
        if epochs <= 0:
            return
        budget = stage.iterations if stage.iterations is not None else (max_steps or epochs * iters)
        # A bilevel iteration steps each group once (weights on one view, scores on the other).
        per_iter = 2 if steps == "two" and stage.kind != "bilevel" else 1
        accumulation = self.run_args.gradient_accumulation_steps
        if accumulation > 1 and stage.kind == "bilevel":
            raise ValueError("--gradient_accumulation_steps does not apply to BiP's bi-level steps (a weight step "
                             "and a score step per iteration): drop it, or raise --per_device_train_batch_size.")
        total = max(1, math.ceil(budget * per_iter / accumulation))  # optimizer steps, which the schedules count
        optimizer, schedules = self._param_groups(stage.kind, total)
        warmup = int(pargs.warmup_ratio * total)
        fns = [schedule_fn(s, total, warmup) for s in schedules]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fns[: len(optimizer.param_groups)])
        acc.free_memory()  # drop the previous stage's prepared objects
        model, optimizer, loader_a, loader_b = acc.prepare(self.model, optimizer, self.loader_a, self.loader_b)
        # The LR scheduler is stepped by us once per optimiser step (not prepared: accelerate would step it once per
        # process); its state goes into trainer_state.json, never into a pickle.
        self._optimizer, self._scheduler = optimizer, scheduler
        start_epoch = 0
        if resume_from is not None:
            load_training_checkpoint(acc, resume_from, self._resume_meta, model=model, optimizer=optimizer,
                                     scheduler=scheduler)
            start_epoch = self.state["epoch"] + 1
            self.log(f"resumed {stage.kind} at epoch {start_epoch} from {resume_from}")
        # A search's mask dynamics: the fraction of the mask that flips per epoch and the overlap with its start
        # (the start mask rides in the run state, 1 bit per entry, so a resumed search reports the same numbers).
        searching = stage.kind in ("search", "bilevel", "structure_search")
        start_bits = previous_bits = self.mask_bits() if searching else None
        if searching:
            if resume_from is not None and self.state.get("mask_at_start"):
                start_bits = decode_bits(self.state["mask_at_start"], start_bits.numel())
            else:
                self.state["mask_at_start"] = encode_bits(start_bits)
        images, t0 = 0, time.perf_counter()
        if stage.kind == "bilevel":
            from .methods.bilevel import bilevel_iteration

            scores = self.model.sparsity.scores
            params = dict(self.model.model.named_parameters())
            pruned_weights = [params[layer.param_name] for layer in self.model.sparsity.layers]
            upper_only = [scores] + (list(self.model.prompt.parameters()) if self.prompt_on else [])
            ids = {id(p) for p in upper_only}
            lower = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in ids]
        for epoch in range(start_epoch, epochs):
            loader_a.set_epoch(stage.shuffle_offset + epoch)
            loader_b.set_epoch(stage.shuffle_offset + epoch)
            model.train()
            views = {"two": (loader_a, loader_b), "prompted": (loader_a,), "augmented": (loader_b,)}[steps]
            n_iters = min(iters, budget - epoch * iters)
            bar = tqdm(total=n_iters, desc=f"{stage.kind} {epoch + 1}/{epochs}", disable=not acc.is_local_main_process)
            running = 0.0
            for i, batches in enumerate(zip(*views)):
                if i >= n_iters:
                    break
                if stage.kind == "bilevel":  # BiP: weight step on the augmented view, score step on the other
                    losses = bilevel_iteration(
                        model, optimizer, acc, batches[0], batches[1], scores=scores, weights=lower,
                        pruned_weights=pruned_weights, upper_only=upper_only, form=pargs.bip_implicit_gradient,
                        scale=pargs.bip_ig_scale, use_prompt=self.prompt_on)
                    scheduler.step()
                    running += sum(losses)
                    images += sum(b["labels"].shape[0] for b in batches) * acc.num_processes
                    bar.update(1)
                    bar.set_postfix(loss=f"{running / ((i + 1) * len(views)):.3f}")
                    continue
                for view, batch in zip(views, batches):
                    use_prompt = self.prompt_on and view is loader_a
                    with acc.accumulate(model):  # --gradient_accumulation_steps: the optimizer steps on every N-th
                        out = model(pixel_values=batch["pixel_values"], labels=batch["labels"], use_prompt=use_prompt)
                        acc.backward(out.loss)
                        optimizer.step()
                        if acc.sync_gradients:
                            scheduler.step()
                            log_step(acc, stage.kind, out.loss, optimizer, self._param_group_names)
                        optimizer.zero_grad(set_to_none=True)
                    running += float(out.loss.detach())
                    images += batch["labels"].shape[0] * acc.num_processes
                bar.update(1)
                bar.set_postfix(loss=f"{running / ((i + 1) * len(views)):.3f}")
            bar.close()
            metrics = self.evaluate_split("validation")
            record = {"stage": stage_idx, "kind": stage.kind, "epoch": epoch,
                      "train_loss": running / max(1, n_iters * len(views)), **metrics}
            if searching:
                bits = self.mask_bits()
                record["mask_flip_fraction"] = float((bits != previous_bits).float().mean())
                record["mask_overlap_with_start"] = jaccard(bits, start_bits) if start_bits is not None else None
                previous_bits = bits
            self.state["history"].append(record)
            log_epoch(acc, {**{f"{stage.kind}/{k}": v for k, v in record.items() if isinstance(v, float)},
                            **subnetwork_scalars(self.model)})
            self.log(f"[{stage.kind} epoch {epoch + 1}/{epochs}] " +
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
            self.state.update(stage=stage_idx, epoch=epoch)
            if self.run_args.checkpointing:
                self.save_checkpoint(stage_idx, epoch)
        self.state.pop("mask_at_start", None)
        elapsed = time.perf_counter() - t0
        timings = self.state["timings"]
        timings[f"stage{stage_idx}_{stage.kind}_s"] = timings.get(f"stage{stage_idx}_{stage.kind}_s", 0.0) + elapsed
        timings["train_images"] = timings.get("train_images", 0) + images
        timings["train_s"] = timings.get("train_s", 0.0) + elapsed

    @torch.no_grad()
    def mask_bits(self) -> torch.Tensor:
        """The current hard mask as booleans (kept = True): of the weights, or of the channels of every unit."""
        model = self.accelerator.unwrap_model(self.model)
        if model.sparsity is not None:
            return model.sparsity.mask().detach().cpu() > 0
        return torch.cat([m.detach().flatten().cpu() for m in model.channel_masks()]) > 0

    def save_checkpoint(self, stage: int, epoch: int) -> None:
        save_training_checkpoint(self.accelerator, self.checkpoint_dir(stage, epoch), model=self.model,
                                 optimizer=self._optimizer, scheduler=self._scheduler,
                                 state={**self.state, "mask_format": self.model.config.mask_format},
                                 settings=self.settings())

    def evaluate_split(self, split: str) -> dict[str, float]:
        """Accuracy with and without the prompt (just once when there is no prompt)."""
        out = {}
        modes = (True, False) if self.prompt_on else (False,)
        for use_prompt in modes:
            res = evaluate(self.model, self.eval_loaders[split], self.accelerator, use_prompt=use_prompt,
                           desc=f"{split}{' +prompt' if use_prompt else ''}")
            tag = "prompt" if use_prompt else "no_prompt"
            out.update({f"{split}_{k}_{tag}": v for k, v in res.items()})
        return out

    def label_mapping(self) -> None:
        """FLM once, right after the initial mask is set (VPNS.md §5); restored from the state on resume."""
        if self.model_args.head != "pretrained" or self.model.config.label_mapping is not None:
            return
        if not self.state.get("label_mapping"):
            # FLM on the masked network (paper). When its predictions have collapsed (fewer distinct source classes
            # than target classes, e.g. one class for every image), the mapping would be arbitrary: it is computed
            # on the dense pretrained network instead, and results.json says so.
            pruned = self.method.sparse and (self.model.sparsity is not None or self.model.structure is not None)
            wanted = self.prune_args.flm_network
            if wanted == "dense" and pruned:
                mapping, counts = self.dense_label_mapping()
                info = {"network": "dense", "distinct_predictions": distinct_predictions(counts)}
            else:
                mapping, counts = self.compute_label_mapping(self.model, return_counts=True)
                info = {"network": "masked" if pruned else "dense", "distinct_predictions": distinct_predictions(counts)}
            info["flm_network"] = wanted
            if wanted == "auto" and is_degenerate(counts) and pruned:
                dense_mapping, dense_counts = self.dense_label_mapping()
                info = {"network": "dense", "flm_network": wanted,
                        "distinct_predictions": distinct_predictions(dense_counts),
                        "masked_distinct_predictions": info["distinct_predictions"],
                        "reason": f"the masked network predicts {info['distinct_predictions']} distinct source "
                                  f"classes on the training set, fewer than the {self.data.num_labels} targets"}
                self.log(f"label mapping: {info['reason']}; FLM computed on the dense pretrained network instead")
                mapping = dense_mapping
            self.state["label_mapping"] = mapping
            self.state["label_mapping_info"] = info
        self.model.set_label_mapping(self.state["label_mapping"], self.data.id2label)

    def needs_label_mapping(self) -> bool:
        return (self.model_args.head == "pretrained" and self.model.config.label_mapping is None
                and not self.state.get("label_mapping") and self.prune_args.flm_network != "masked")

    def dense_label_mapping(self):
        """(mapping, counts) of FLM on the dense pretrained network; kept from before a compaction (a compacted
        model has no dense copy left)."""
        if self._dense_flm is None:
            self._dense_flm = self.compute_label_mapping(self.dense_copy(), return_counts=True)
        return self._dense_flm

    def compute_label_mapping(self, model, return_counts: bool = False):
        """Frequency label mapping over the training split, counts summed over processes."""
        loader = self.accelerator.prepare_data_loader(self.loader_a)
        loader.set_epoch(0)
        bar = lambda it: tqdm(it, desc="label mapping (FLM)", leave=False,  # noqa: E731
                              disable=not self.accelerator.is_local_main_process)
        return frequency_label_mapping(model, loader, self.data.num_labels, return_counts=return_counts,
                                       reduce_fn=lambda t: self.accelerator.reduce(t, "sum"), progress=bar)

    def dense_copy(self) -> PromptedSparseModel:
        """A copy of the model with every weight / channel kept (the run's model is untouched)."""
        dense = copy.deepcopy(self.model)
        if dense.sparsity is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dense.set_mask(torch.ones(dense.sparsity.numel))
        elif dense.structure is not None:
            dense.structure.enabled = False
        return dense

    def prune(self, step: Prune) -> None:
        if self.model.structure is not None:
            return self.prune_channels(step)
        from .methods.pruners import prune_once

        pargs = self.prune_args
        batches = self._first_batches(pargs.pruner_batches) if step.criterion in ("snip", "grasp") else []
        generator = torch.Generator().manual_seed(self.run_args.seed)
        target = self.sparsity if step.sparsity is None else step.sparsity
        mask = prune_once(self.model, step.criterion, target, batches=batches,
                          threshold=self.prune_args.threshold or self.method.threshold, generator=generator,
                          synflow_iterations=pargs.synflow_iterations)
        if step.criterion == "kept_magnitude":  # an IMP round: recorded (restored with the state on resume)
            rounds = self.state.setdefault("imp_rounds", [])
            rounds.append({"round": len(rounds) + 1, "sparsity_target": target,
                           "pruned_weights": int(mask.numel() - mask.sum())})
            self.log(f"IMP round {len(rounds)}: {rounds[-1]['pruned_weights']:,} of {mask.numel():,} weights pruned "
                     f"({100 * target:.2f}% target)")
        if step.rewind:  # OMP: the mask comes from the fine-tuned weights, training restarts from pretrained
            self.model.model.load_state_dict(self._pretrained_state)

    def prune_channels(self, step: Prune) -> None:
        """Structured: channel masks at the FLOPs target (from the PASS hypernetwork, the channel scores or a
        baseline criterion), then physical compaction."""
        from .methods.channel_pruners import channel_importance, normalise_per_unit
        from .sparsity.flops import count_parameters
        from .sparsity.selection import select_global, select_uniform

        model, pargs = self.model, self.prune_args
        self.state["dense_params"] = count_parameters(model.model)
        if step.criterion == "transferred_structure":
            self.apply_transfer()
            masks = None
        elif step.criterion in ("hypernetwork", "channel_scores"):  # the masks the search found (PASS, VPNs)
            masks = model.channel_masks()
        else:
            units, criterion = model.structure.units, step.criterion.replace("random_channels", "random")
            batches = self._first_batches(pargs.pruner_batches) if criterion == "taylor" else None
            size = model.config.output_size
            with model.structure.disabled():
                scores = channel_importance(
                    criterion, model.model, units, batches=batches,
                    forward_fn=lambda b: model(pixel_values=b["pixel_values"], labels=b["labels"],
                                               use_prompt=self.prompt_on).loss,
                    example_inputs=torch.randn(1, 3, size, size),
                    generator=torch.Generator().manual_seed(self.run_args.seed),
                )
            global_ = pargs.channel_selection == "global"
            select = select_global if global_ else select_uniform
            masks = select(normalise_per_unit(scores) if global_ else scores,
                           model.structure.flops_model(model.model), pargs.flops_ratio, min_channels=pargs.min_channels)
        widths = model.compact(masks) if masks is not None else model.config.channel_widths
        self.state["channel_widths"] = widths
        report = model.flops_report()
        self.log(f"compacted: {report['flops'] / 1e6:.1f} MFLOPs = {100 * report['flops_ratio']:.1f}% of dense "
                 f"(target {100 * pargs.flops_ratio:.0f}%), {report['params']:,} parameters")

    def apply_transfer(self) -> None:
        """Hook for TransferRun: install the pulled subnetwork's parts."""

    def _first_batches(self, n: int) -> list:
        loader = self.accelerator.prepare_data_loader(self.loader_a)
        loader.set_epoch(0)
        batches = []
        for i, batch in enumerate(loader):
            if i >= n:
                break
            batches.append(batch)
        return batches

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        acc = self.accelerator
        t_start = time.perf_counter()
        # Before anything is built or written: refuse a folder holding another run, and a checkpoint of other
        # settings (every process checks the same files, so all of them stop).
        check_output_dir(self.output_dir, overwrite=self.run_args.overwrite_output_dir,
                         resume=self.run_args.resume_from_checkpoint)
        resume = self.find_resume_checkpoint()
        if resume:
            self.state, self._resume_meta = read_checkpoint_state(resume)
        if acc.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
        check_shared_output_dir(acc, self.output_dir)  # machines with their own disks: refused before training
        self.build()
        self.log(format_settings(effective_settings(self)))  # once: what the data and the model decided
        acc.init_trackers(self.name, config={k: str(v) for k, v in self.all_args().items()})
        if "dense_pretrained" not in self.state:  # before any pruning step touches the model
            wanted = self.model_args.head == "pretrained" and self.run_args.dense_reference and self.run_args.eval_test
            self.state["dense_pretrained"] = self.dense_reference() if wanted else None
        # Iterative methods (IMP) unroll into plain steps here, so every round has its own index: a checkpoint's
        # `stage` then names the round, and resume neither redoes nor skips one.
        self.plan = expand_plan(self.method.plan, self.prune_args, self.sparsity, self.iterations_per_epoch(self.steps))
        if not resume:
            self.init_scores()
        for idx, step in enumerate(self.plan):
            if resume and idx < self.state["stage"]:
                continue
            if isinstance(step, Prune):
                if self.model.structure is not None and self.needs_label_mapping():
                    self.dense_label_mapping()  # channels are about to be removed: map on the dense network now
                self.prune(step)
                continue
            self.label_mapping()  # once, before the first training stage; restored from the state on resume
            resume_here = resume if (resume and idx == self.state["stage"]) else None
            self.train_stage(idx, step, resume_here)
            resume = None if resume_here else resume
        self.model.freeze_mask()
        final = {split: self.evaluate_split(split)
                 for split in ("validation", "test") if split == "validation" or self.run_args.eval_test}
        results = self.results(final, time.perf_counter() - t_start)
        log_epoch(acc, {f"final/{k}": v for split in final.values() for k, v in split.items()})
        self.save(results)
        acc.end_training()
        return results

    @torch.no_grad()
    def dense_reference(self) -> dict[str, float] | None:
        """Test accuracy of the pretrained dense model with its own FLM and no training: a floor, not the
        fine-tuned dense reference (run --method dense for that). Computed on a copy: the run is untouched."""
        if self.model.sparsity is None and self.model.structure is None:
            return None
        # Its own FLM and evaluation, RNG state restored: iterating a loader draws from the global generator, and
        # the floor must not change the run it is measured beside.
        with torch.random.fork_rng(devices=[]):
            dense = self.dense_copy()
            dense.set_label_mapping(self.compute_label_mapping(dense), self.data.id2label)
            return evaluate(dense, self.eval_loaders["test"], self.accelerator, use_prompt=False, desc="dense")

    def _argument_groups(self) -> tuple:
        return (self.model_args, self.data_args, self.prune_args, self.run_args)

    def tuning_steps(self) -> str | None:
        """The steps per iteration of the tuning stage (the method's last training stage)."""
        from .methods import tuning_stage_index

        idx = tuning_stage_index(self.method.plan)
        return None if idx is None else (self.method.plan[idx].steps or self.steps)

    def init_scores(self) -> None:
        """--score_init: start the score search at a one-shot criterion's mask (before the label mapping, which
        is computed on the first mask)."""
        from .methods.pruners import init_scores_from_criterion

        criterion = self.prune_args.score_init or self.method.score_init
        if criterion == "scaled" or self.model.sparsity is None or self.model.sparsity.frozen:
            return
        batches = self._first_batches(self.prune_args.pruner_batches) if criterion in ("snip", "grasp") else None
        info = init_scores_from_criterion(self.model, criterion, batches=batches,
                                          generator=torch.Generator().manual_seed(self.run_args.seed),
                                          synflow_iterations=self.prune_args.synflow_iterations)
        self.state["score_init"] = info
        self.log(f"scores initialised at the {criterion} mask (threshold {info['threshold']:.4g}, "
                 f"scale {info['scale']:.4g})")

    def all_args(self) -> dict[str, Any]:
        out = {}
        for args in self._argument_groups():
            out.update(dataclasses.asdict(args))
        return out

    def results(self, final: dict, wall: float) -> dict[str, Any]:
        acc, model = self.accelerator, self.model
        report = model.sparsity_report()
        digests = gather_object([mask_digest(model)])
        timings = self.state["timings"]
        train_s = timings.get("train_s", 0.0)
        structured = self.structured_results() if model.structure is not None else {}
        return {
            "name": self.name,
            "method": self.method.name,
            "method_display": self.method.display_name,
            "tuning": {"finetune_steps": self.tuning_steps(), "prompt_method": self.prompt_method},
            "score_init": self.state.get("score_init"),
            "score_threshold_at_start": self.state.get("score_threshold_at_start"),
            "mask_dynamics": mask_dynamics(self.state["history"]),
            "model": self.model_args.model_name_or_path,
            "dataset": self.data.name,
            "num_labels": self.data.num_labels,
            "samples": {"train": len(self.data.train), "validation": len(self.data.validation),
                        "test": len(self.data.test)},
            "prompt_method": self.prompt_method,
            "steps": self.steps,
            "input_size": self.model.config.input_size,
            "sparsity_target": self.sparsity,
            "sparsity": report["global"],
            "pruned_weights": report["pruned"],
            "prunable_weights": report["total"],
            "layer_sparsity": report["layers"],
            "accuracy": final,
            "dense_pretrained_flm": self.state.get("dense_pretrained"),
            "epochs": {s.kind: int(getattr(self.prune_args, s.epochs_field))
                       for s in self.method.plan if hasattr(s, "epochs_field")},
            **({"imp_rounds": self.state["imp_rounds"]} if self.state.get("imp_rounds") else {}),
            "history": self.state["history"],
            "timings_s": timings,
            "wall_time_s": wall,
            "train_images_per_s": (timings.get("train_images", 0) / train_s) if train_s else None,
            "label_mapping": model.config.label_mapping,
            "label_mapping_source": self.state.get("label_mapping_info"),
            "learning_rates": self.state.get("learning_rates"),
            "world_size": acc.num_processes,
            "device": str(acc.device),
            "torch_threads": torch.get_num_threads(),
            "mask_sha256": digests[0],
            "masks_identical_across_ranks": len(set(digests)) == 1,
            "seed": self.run_args.seed,
            "args": self.all_args(),
            "effective_settings": effective_settings(self),
            **structured,
        }

    def structured_results(self) -> dict[str, Any]:
        """FLOPs (FlopCounterMode), parameters and measured latency of the compact model vs the dense one."""
        from .latency import compare_latency
        from .sparsity.flops import count_parameters

        model, margs = self.model, self.model_args
        report = model.flops_report()
        dense = PromptedSparseModel.from_base(
            margs.model_name_or_path, revision=margs.revision, head=margs.head,
            id2label=self.data.id2label if margs.head == "new" else None, sparsity_type="none",
            cache_dir=margs.cache_dir, trust_remote_code=margs.trust_remote_code or None,
        ).model
        latency = None
        if self.accelerator.is_main_process:
            compact = copy.deepcopy(model.model).cpu()
            latency = compare_latency({"dense": dense, "compact": compact}, model.config.output_size,
                                      tuple(self.prune_args.latency_batch_sizes))
        return {
            "flops": report["flops"], "dense_flops": report["dense_flops"], "flops_ratio": report["flops_ratio"],
            "flops_target": self.prune_args.flops_ratio, "params": report["params"],
            "dense_params": count_parameters(dense), "channel_selection": self.prune_args.channel_selection,
            "channel_widths": model.config.channel_widths, "latency": latency,
        }

    def save(self, results: dict[str, Any]) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        if acc.is_main_process:
            # Staged and renamed into place (`publish_output`): a crash never leaves new config beside old weights.
            def write(staging: str) -> None:
                from .hub import write_model_card

                model.save_pretrained(staging, save_function=acc.save)
                write_json_atomic(os.path.join(staging, "results.json"), results)
                write_training_curves(staging, results)  # before the card, which links it
                write_model_card(staging)  # the card save_pretrained wrote, now with the run's results

            publish_output(self.output_dir, write)
            print_summary(results)
        acc.wait_for_everyone()
        if self.run_args.push_to_hub:  # only once the local save is complete
            from .hub import push_subnetwork

            if acc.is_main_process:
                push_subnetwork(self.output_dir, self.run_args.hub_model_id or self.name,
                                private=self.run_args.hub_private)
            acc.wait_for_everyone()


def encode_bits(bits: torch.Tensor) -> str:
    """A boolean mask as text for the JSON run state: bit-packed, zlib, base64."""
    import base64
    import zlib

    from .sparsity.unstructured import pack_mask

    return base64.b64encode(zlib.compress(pack_mask(bits).numpy().tobytes(), 6)).decode("ascii")


def decode_bits(text: str, n: int) -> torch.Tensor:
    import base64
    import zlib

    from .sparsity.unstructured import unpack_mask

    packed = torch.frombuffer(bytearray(zlib.decompress(base64.b64decode(text))), dtype=torch.uint8)
    return unpack_mask(packed, n, dtype=torch.bool)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two boolean masks (the kept sets); 1 for two empty ones."""
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else 1.0


def mask_dynamics(history: list[dict]) -> dict[str, Any]:
    """Per search stage: the overlap of its final mask with its start and the fraction flipped per epoch."""
    out: dict[str, Any] = {}
    for rec in history:
        if "mask_flip_fraction" in rec:
            entry = out.setdefault(f"stage{rec['stage']}_{rec['kind']}", {"flip_fraction_per_epoch": []})
            entry["flip_fraction_per_epoch"].append(rec["mask_flip_fraction"])
            entry["overlap_with_start"] = rec["mask_overlap_with_start"]
    return out


def check_combination(method: Method, model_args: ModelArguments, prune_args: PruningArguments) -> None:
    """Refuse settings that cannot apply to this method or head, naming the fix."""
    searches_scores = method.sparse and not method.structured and any(
        isinstance(s, Stage) and s.kind in ("search", "bilevel") for s in method.plan)
    if prune_args.score_init not in (None, "scaled") and not searches_scores:
        raise ValueError(f"--score_init {prune_args.score_init} initialises the scores of a weight-score search, "
                         f"but --method {method.name} has none; drop --score_init, or use --method vpns, hydra or "
                         f"bip (for {method.name} the mask is the criterion's own: --method {prune_args.score_init} "
                         "if it is a registered method).")
    if prune_args.flm_network != "auto" and model_args.head != "pretrained":
        raise ValueError(f"--flm_network {prune_args.flm_network} chooses the network frequency label mapping "
                         f"counts on, but --head {model_args.head} trains a new head and maps no labels; drop "
                         "--flm_network or use --head pretrained.")
    if prune_args.flm_network == "masked" and not method.sparse:
        raise ValueError(f"--flm_network masked: --method {method.name} prunes nothing, so there is no masked "
                         "network to map labels on; drop --flm_network (dense and masked are the same network here).")


def print_summary(results: dict[str, Any]) -> None:
    split = "test" if "test" in results["accuracy"] else "validation"  # eval_test=False: validation only
    test = {k.replace(f"{split}_", "test_", 1): v for k, v in results["accuracy"][split].items()}
    rows = []
    dense = results.get("dense_pretrained_flm")
    if dense:
        rows.append(("dense pretrained + FLM (no training)", f"{dense['accuracy']:.2f}",
                     "100% FLOPs" if results.get("flops_ratio") else "0.0%"))
    sp = f"{100 * results['sparsity']:.1f}%"
    if results.get("flops_ratio"):  # structured: the budget is FLOPs
        sp = f"{100 * results['flops_ratio']:.1f}% FLOPs"
    name = results.get("method_display") or display_name(results["method"])
    if "test_accuracy_prompt" in test:
        rows.append((f"{name} with prompt", f"{test['test_accuracy_prompt']:.2f}", sp))
    rows.append((f"{name} without prompt", f"{test['test_accuracy_no_prompt']:.2f}", sp))
    width = max(len(r[0]) for r in rows)
    lines = [f"\n{results['name']}  ({results['dataset']}, {results['samples'][split]} {split} images, "
             f"input {results['input_size']}px)",
             f"{'model':<{width}}  {split[:4] + ' acc %':>10}  {'sparsity':>12}",
             f"{'-' * width}  {'-' * 10}  {'-' * 12}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>12}" for r in rows]
    for key, entry in (results.get("latency") or {}).items():
        if key.startswith("batch_"):
            lines.append(f"CPU latency {key.replace('_', ' ')}: dense {entry['dense']['median_ms']:.1f} ms, compact "
                         f"{entry['compact']['median_ms']:.1f} ms ({entry['speedup']:.2f}x; {results['latency']['threads']}"
                         " threads, median)")
    lines.append(f"wall time {results['wall_time_s']:.0f} s, training {results['train_images_per_s'] or 0:.0f} "
                 f"images/s, {results['world_size']} process(es) on {results['device']}")
    print("\n".join(lines), flush=True)


class TransferRun(PruningRun):
    """Fine-tune a subnetwork searched elsewhere on a new dataset (see `prompt_sparsity.transfer`)."""

    def __init__(self, model_args, data_args, prune_args, run_args, transfer_args):
        from .transfer import load_subnetwork_config, transfer_plan

        self.transfer_args = transfer_args
        if not transfer_args.subnetwork:
            raise ValueError("--subnetwork is required: a repo id or a local directory of a saved subnetwork.")
        c = self.source = load_subnetwork_config(transfer_args.subnetwork, transfer_args.subnetwork_revision)
        if not c.base_model_name_or_path:
            raise ValueError(f"{transfer_args.subnetwork}: its config names no base_model_name_or_path, so the "
                             "pretrained weights to apply the mask to are unknown.")
        model_args = dataclasses.replace(
            model_args, model_name_or_path=c.base_model_name_or_path, head=c.head, prompt_method=c.prompt_method,
            input_size=c.input_size, output_size=c.output_size, pad_size=c.pad_size, mask_size=c.mask_size,
        )
        prune_args = dataclasses.replace(
            prune_args, sparsity=c.sparsity, threshold=c.threshold, target_modules=c.target_modules,
            exclude_modules=c.exclude_modules, min_layer_density=c.min_layer_density, flops_ratio=c.flops_ratio, channel_selection=c.channel_selection,
            nm_pattern=getattr(c, "nm_pattern", None),
            min_channels=c.min_channels, hypernet_hidden_size=c.hypernet_hidden_size,
            channel_discovery=c.channel_discovery,
        )
        super().__init__(model_args, data_args, prune_args, run_args, method=transfer_plan(c, transfer_args))
        self.name = f"transfer-{short_name(transfer_args.subnetwork)}-{short_name(data_args.dataset_name)}"
        self.output_dir = run_args.output_dir or os.path.join("outputs", self.name)

    def build(self) -> None:
        from .transfer import fetch_tensors

        with self.accelerator.main_process_first():
            self.tensors = fetch_tensors(self.transfer_args.subnetwork, self.source, self.transfer_args)
        super().build()
        if self.model.structure is None or self.transfer_args.adapt_hypernetwork:
            self.apply_transfer()

    def _argument_groups(self) -> tuple:
        return (*super()._argument_groups(), self.transfer_args)  # the source subnetwork is a setting of the run

    def apply_transfer(self) -> None:
        from .transfer import apply_subnetwork

        apply_subnetwork(self.model, self.source, self.tensors, num_labels=self.data.num_labels)

    def results(self, final, wall):
        out = super().results(final, wall)
        out["transferred_from"] = {"subnetwork": self.transfer_args.subnetwork,
                                   "revision": self.transfer_args.subnetwork_revision,
                                   "prompt": self.transfer_args.transfer_prompt,
                                   "adapt_hypernetwork": self.transfer_args.adapt_hypernetwork}
        return out


def run_transfer(model_args: ModelArguments, data_args: DataArguments, prune_args: PruningArguments,
                 run_args: RunArguments, transfer_args) -> dict[str, Any]:
    """Transfer a subnetwork (repo id or directory) to a new dataset and fine-tune it; returns the results."""
    return TransferRun(model_args, data_args, prune_args, run_args, transfer_args).run()


def run_pruning(model_args: ModelArguments, data_args: DataArguments, prune_args: PruningArguments,
                run_args: RunArguments) -> dict[str, Any]:
    """Run one method end to end and return its results (also written to `<output_dir>/results.json`)."""
    return PruningRun(model_args, data_args, prune_args, run_args).run()
