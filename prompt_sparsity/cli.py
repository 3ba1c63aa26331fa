"""Command-line helpers for the recipes (the library itself never parses a command line): the embedded demo's own
defaults; one-line errors; grouped --help with defaults; HF example-script option names; "did you mean"."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Iterable, Sequence

#: The embedded demo (`accelerate launch recipes/vpns.py` with neither a model nor data given) is sized for a few
#: minutes on 2 CPU cores. These are its own defaults: a run on the user's model or data never inherits them (it
#: uses all samples at the size the model's image processor gives, unless set).
EMBEDDED_DEMO = {"max_train_samples": 2000, "max_eval_samples": 1000, "input_size": 48}
#: Any of these, on the command line or in the YAML file, makes a run the user's own rather than the demo.
USER_INPUT_OPTIONS = ("model_name_or_path", "dataset_name", "train_dir", "validation_dir", "subnetwork")


def given_options(argv: Sequence[str]) -> set[str]:
    """The option names (without dashes, '-' read as '_') on a command line: `--name value` and `--name=value`."""
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--") and len(arg) > 2}


def is_embedded_demo(argv: Sequence[str], from_file: Iterable[str] = ()) -> bool:
    """True when neither the command line nor the YAML file names a model or data."""
    named = given_options(argv) | set(from_file)
    return not named.intersection(USER_INPUT_OPTIONS)


def is_main_process() -> bool:
    """Rank 0 of a launch (or no launch): print once, not once per process."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


# --------------------------------------------------------------------------------------------------- errors
class UserError(RuntimeError):
    """Bad input or a bad launch, found by the library: the recipes print its message on one line, exit 2."""


#: Library keywords whose recipe flags have other names: an error raised deep in the library speaks the flag's.
_API_TO_FLAG = {"target_ratio": "--flops_ratio", "min_channels": "--min_channels"}


def is_user_error(err: BaseException) -> bool:
    """Errors that name the problem and the fix (bad values, missing files or packages, a refused launch), as
    opposed to bugs: those keep their traceback."""
    if isinstance(err, (ValueError, OSError, UserError)):
        return True
    return isinstance(err, ImportError) and "pip install" in str(err)


def one_line(message: str) -> str:
    """The message on one line, in the recipe's flag names."""
    text = " ".join(str(message).split())
    for name, flag in _API_TO_FLAG.items():
        text = re.sub(rf"(?<![-\w]){name}\b", flag, text)
    return text


def run_recipe(main, argv: Sequence[str], prog: str):
    """Run a recipe's `main(argv)`: a user error prints `<prog>: error: <message>` on one line and exits 2 (as
    argparse does), without a traceback; `--debug` keeps the traceback."""
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except SystemExit as exit_:
        if isinstance(exit_.code, str) and not debug:  # `raise SystemExit("message")` in a recipe
            _fail(prog, exit_.code)
        raise
    except Exception as err:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback)
        if debug or not is_user_error(err):
            raise
        _fail(prog, f"{err} (--debug shows the traceback)")


def _fail(prog: str, message: str) -> None:
    if is_main_process():  # every process of a launch fails alike; one line, not one per process
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# --------------------------------------------------------------------------------------------------- parser
#: `--help` sections, one per argument dataclass.
GROUP_TITLES = {
    "ModelArguments": "model (the pretrained classifier and the visual prompt)",
    "DataArguments": "data",
    "PruningArguments": "pruning and training",
    "RunArguments": "run (output, checkpoints, trackers, Hub)",
    "TransferArguments": "transfer (the subnetwork to reuse)",
}
#: Help for the fields whose dataclass gives none (so that --help shows every option with its default).
MISSING_HELP = {
    "per_device_train_batch_size": "Training batch size per process.",
    "per_device_eval_batch_size": "Evaluation batch size per process.",
    "dataloader_num_workers": "Data-loading worker processes (0: load in the main process).",
    "score_weight_decay": "Weight decay of the mask scores and of the search-stage prompt.",
    "finetune_lr": "Learning rate of the weights while tuning the subnetwork (and of BiP's weight step).",
    "finetune_prompt_lr": "Learning rate of the prompt while tuning the subnetwork.",
    "finetune_weight_decay": "Weight decay of the weights and the prompt while tuning.",
    "momentum": "SGD momentum (every group whose optimizer is sgd).",
    "warmup_ratio": "Fraction of each stage's optimizer steps with a linear learning-rate warm-up.",
    "hypernet_hidden_size": "PASS: hidden size of the LSTM hypernetwork.",
    "latency_batch_sizes": "Structured methods: batch sizes at which the compact and the dense model are timed.",
    "synflow_iterations": "SynFlow: pruning iterations.",
    "seed": "Random seed (data subsets, shuffles, initialisation).",
    "push_to_hub": "Push the saved subnetwork to the Hub at the end (saved locally first).",
    "hub_private": "Create the Hub repository as private.",
}

_STRUCTURED_ONLY = ("flops_ratio", "channel_selection", "min_channels", "channel_discovery", "hypernet_lr",
                    "structure_prompt_lr", "hypernet_hidden_size", "flops_penalty", "latency_batch_sizes")
_UNSTRUCTURED_ONLY = ("sparsity", "threshold", "target_modules", "exclude_modules", "min_layer_density",
                      "nm_pattern", "dense_epochs", "synflow_iterations", "imp_prune_rate", "imp_epochs",
                      "bip_implicit_gradient", "bip_ig_scale", "bip_gamma", "score_init")
_FROM_SUBNETWORK = ("model_name_or_path", "head", "prompt_method", "input_size", "output_size", "pad_size",
                    "mask_size", "method", "sparsity", "threshold", "target_modules", "exclude_modules",
                    "min_layer_density", "nm_pattern", "flops_ratio", "channel_selection", "min_channels",
                    "channel_discovery", "hypernet_hidden_size")
_NOT_IN_TRANSFER = ("dense_epochs", "score_lr", "score_weight_decay", "score_optimizer", "score_schedule",
                    "search_prompt_lr", "search_prompt_optimizer", "search_prompt_schedule", "pruner_batches",
                    "synflow_iterations", "imp_prune_rate", "imp_epochs", "bip_implicit_gradient", "bip_ig_scale",
                    "bip_gamma", "score_init", "finetune_steps")
#: The options each recipe ignores, and why: they are left out of its --help and refused when given.
IGNORED_OPTIONS = {
    "vpns": {n: "a structured (channel) option: use recipes/pass.py" for n in _STRUCTURED_ONLY},
    "pass": {n: "an unstructured (weight-mask) option: use recipes/vpns.py (pass.py prunes channels at "
                "--flops_ratio)" for n in _UNSTRUCTURED_ONLY},
    "transfer": {**{n: "a transfer takes it from the subnetwork's config (--subnetwork)" for n in _FROM_SUBNETWORK},
                 **{n: "a transfer has no such stage (it fine-tunes the transferred structure; --adapt_hypernetwork "
                       "re-runs the PASS search)" for n in _NOT_IN_TRANSFER}},
}
#: Options of the transformers example scripts that have no one-to-one counterpart here: what to use instead.
HF_HINTS = {
    "learning_rate": "--finetune_lr (tuning) or --score_lr / --hypernet_lr (search)",
    "num_train_epochs": "--search_epochs and --finetune_epochs (one per stage)",
    "weight_decay": "--finetune_weight_decay or --score_weight_decay",
    "lr_scheduler_type": "--finetune_schedule / --score_schedule (cosine|multistep)",
    "num_warmup_steps": "--warmup_ratio",
    "ignore_mismatched_sizes": "--head new (a fresh classifier for your labels)",
    "mixed_precision": "`accelerate launch --mixed_precision ...` (a launcher option, before the recipe)",
}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default, unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or re.search(r"\bdefault:", text, re.I) or not action.option_strings:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".strip()


class RecipeParser:
    """`HfArgumentParser` for one recipe: one --help section per argument dataclass, every option with its
    default, only the options the recipe uses (the others are refused, saying why), HF example-script names as
    aliases, one-line errors with a "did you mean" for unknown options. `recipe=None`: every option."""

    def __new__(cls, groups, recipe: str | None = None, prog: str | None = None):
        from transformers import HfArgumentParser

        ignored = IGNORED_OPTIONS.get(recipe, {})

        class _Parser(HfArgumentParser):
            def _add_dataclass_arguments(self, dtype):
                group = self.add_argument_group(GROUP_TITLES.get(dtype.__name__, dtype.__name__))
                hints = __import__("typing").get_type_hints(dtype)
                for f in dataclasses.fields(dtype):
                    if not f.init or f.name in ignored:
                        continue
                    f = _with_cli_metadata(f)
                    f.type = hints[f.name]
                    self._parse_dataclass_field(group, f)

            def error(self, message):
                self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

        parser = _Parser(groups, prog=prog or (f"recipes/{recipe}.py" if recipe else None),
                         formatter_class=_DefaultsFormatter, allow_abbrev=False)
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="Show the full traceback of an error (default: one line naming the fix, exit code 2).")
        parser.add_argument("--token", "--hub_token", default=argparse.SUPPRESS,
                            help="A Hugging Face token for private models, data sets and pushes; the recipes put it "
                                 "in HF_TOKEN, so it is never written to results.json or a checkpoint (default: the "
                                 "token of `hf auth login`).")
        parser.recipe, parser.ignored, parser.all_groups = recipe, ignored, groups
        return parser


def _with_cli_metadata(f: dataclasses.Field) -> dataclasses.Field:
    """A copy of a dataclass field with the help it lacks and its HF example-script aliases."""
    import copy
    import types

    f = copy.copy(f)
    meta = dict(f.metadata)
    if not meta.get("help"):
        meta["help"] = MISSING_HELP.get(f.name, "")
    aliases = [f"--{a}" for a in HF_ALIASES.get(f.name, ())]
    if aliases:
        meta["aliases"] = aliases
        meta["help"] += f" (transformers example-script name: {', '.join(aliases)})"
    f.metadata = types.MappingProxyType(meta)
    return f


#: Our option -> the names the transformers example scripts use for it.
HF_ALIASES = {
    "image_column": ("image_column_name",),
    "label_column": ("label_column_name",),
    "validation_fraction": ("train_val_split",),
}


def unknown_option_message(parser, unknown: Sequence[str]) -> str:
    """Why each unknown command-line word was refused, with the option to use instead."""
    known = [s for a in parser._actions for s in a.option_strings]
    every = _every_option(parser.all_groups)
    reasons = []
    for i, word in enumerate(unknown):
        name = word.split("=", 1)[0]
        bare = name.lstrip("-").replace("-", "_")
        hf_close = difflib.get_close_matches(bare, list(HF_HINTS), n=1, cutoff=0.85)
        if not word.startswith("-"):
            if i == 0 or not unknown[i - 1].startswith("-"):  # not the value of an option refused just before
                reasons.append(f"{word!r} is not an option (a value without its --option?)")
        elif bare in parser.ignored:
            reasons.append(f"{name} is not used by {parser.prog}: {parser.ignored[bare]}; drop it")
        elif hf_close:
            reasons.append(f"{name} (a transformers example-script option) has no one-to-one counterpart here: use "
                           f"{HF_HINTS[hf_close[0]]}")
        else:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) or [
                f"--{n}" for n in difflib.get_close_matches(bare, every, n=1, cutoff=0.75)]
            reasons.append(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else ""))
    return "; ".join(reasons)


def _every_option(groups) -> list[str]:
    return [f.name for g in groups for f in dataclasses.fields(g)]


def parse_recipe_args(argv: Sequence[str], groups, recipe: str | None = None, **recipe_defaults):
    """`[config.yaml] [--flag value ...]` -> the argument dataclasses: the YAML file sets defaults, flags override
    them; the embedded demo's defaults apply when neither names a model or data (`EMBEDDED_DEMO`)."""
    import yaml

    parser = RecipeParser(groups, recipe)
    argv = list(argv)
    known = {a.dest for a in parser._actions}
    defaults = dict(recipe_defaults)
    from_file, config_file = {}, None
    # Where each value not left to its dataclass default came from, later one winning (logged: "input 48 px from ...").
    sources = {k: f"the {recipe or 'recipe'}'s default" for k in recipe_defaults}
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0]) as f:
            from_file = yaml.safe_load(f) or {}
        unknown = sorted(set(from_file) - known)
        if unknown:
            parser.error(f"{argv[0]}: " + unknown_option_message(parser, [f"--{k}" for k in unknown]))
        config_file, argv = argv[0], argv[1:]
    asks_help = "-h" in argv or "--help" in argv
    demo = is_embedded_demo(argv, from_file) and not asks_help
    if demo:  # the demo's small sizes: never a user run's defaults
        defaults.update({k: v for k, v in EMBEDDED_DEMO.items() if k in known})
        sources.update({k: "the embedded demo's defaults" for k in EMBEDDED_DEMO})
    defaults.update(from_file)
    sources.update({k: config_file for k in from_file})
    for word in argv:
        action = parser._option_string_actions.get(word.split("=", 1)[0]) if word.startswith("--") else None
        if action is not None:  # aliases too (--image_column_name sets image_column)
            sources[action.dest] = f"--{action.dest}"
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    namespace, remaining = parser.parse_known_args(args=argv)
    if remaining:
        parser.error(unknown_option_message(parser, remaining))
    values = vars(namespace)
    if "token" in values:  # never a setting: written nowhere, read by huggingface_hub and datasets
        os.environ["HF_TOKEN"] = values.pop("token")
    try:  # the options a recipe leaves out keep their dataclass defaults
        args = tuple(g(**{f.name: values[f.name] for f in dataclasses.fields(g) if f.init and f.name in values})
                     for g in groups)
    except ValueError as err:  # a value check of the argument dataclasses: shown like a usage error
        parser.error(str(err))
    for group in args:  # not a field: neither a setting of the run nor an option
        group.option_sources = {k: v for k, v in sources.items() if k in {f.name for f in dataclasses.fields(group)}}
    if demo and is_main_process():
        print("The embedded demo (no --model_name_or_path or --dataset_name given): "
              + ", ".join(f"--{k} {v}" for k, v in EMBEDDED_DEMO.items())
              + " unless set; with your own model or data, all samples at the model's size.", flush=True)
    return args
