"""Argument parsing shared by the recipes (the library itself never parses command lines)."""

import logging
import sys

import yaml
from transformers import HfArgumentParser

from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments

ARGUMENT_GROUPS = (ModelArguments, DataArguments, PruningArguments, RunArguments)


def parse(argv, groups=ARGUMENT_GROUPS, **recipe_defaults):
    """`[config.yaml] [--flag value ...]`: the YAML file sets defaults, flags override them."""
    parser = HfArgumentParser(groups)
    defaults = dict(recipe_defaults)
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0]) as f:
            from_file = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise SystemExit(f"{argv[0]}: unknown settings {unknown}; see `python {sys.argv[0]} --help`.")
        defaults.update(from_file)
        argv = argv[1:]
    parser.set_defaults(**defaults)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a value check of the argument dataclasses: show it like a usage error
        parser.error(str(err))


def setup_logging():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
