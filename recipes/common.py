"""Argument parsing shared by the recipes (the library itself never parses command lines)."""

import logging
import sys

import yaml
from transformers import HfArgumentParser

from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.cli import EMBEDDED_DEMO, is_embedded_demo, is_main_process

ARGUMENT_GROUPS = (ModelArguments, DataArguments, PruningArguments, RunArguments)


def parse(argv, groups=ARGUMENT_GROUPS, **recipe_defaults):
    """`[config.yaml] [--flag value ...]`: the YAML file sets defaults, flags override them."""
    parser = HfArgumentParser(groups)
    defaults = dict(recipe_defaults)
    from_file = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0]) as f:
            from_file = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise SystemExit(f"{argv[0]}: unknown settings {unknown}; see `python {sys.argv[0]} --help`.")
        argv = argv[1:]
    asks_help = "-h" in argv or "--help" in argv
    if is_embedded_demo(argv, from_file) and not asks_help:  # the demo's small sizes: never a user run's defaults
        defaults.update(EMBEDDED_DEMO)
        if is_main_process():
            print("The embedded demo (no --model_name_or_path or --dataset_name given): "
                  + ", ".join(f"--{k} {v}" for k, v in EMBEDDED_DEMO.items())
                  + " unless set; with your own model or data, all samples at the model's size.", flush=True)
    defaults.update(from_file)
    parser.set_defaults(**defaults)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a value check of the argument dataclasses: show it like a usage error
        parser.error(str(err))


def setup_logging():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
