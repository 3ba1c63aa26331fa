"""Argument parsing shared by the recipes (the library itself never parses command lines)."""

import logging
import sys

from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.cli import parse_recipe_args, run_recipe

ARGUMENT_GROUPS = (ModelArguments, DataArguments, PruningArguments, RunArguments)


def parse(argv, groups=ARGUMENT_GROUPS, recipe=None, **recipe_defaults):
    """`[config.yaml] [--flag value ...]`: the YAML file sets defaults, flags override them. `recipe` ('vpns',
    'pass', 'transfer') keeps only the options that recipe uses (`prompt_sparsity.cli`)."""
    return parse_recipe_args(argv, groups, recipe, **recipe_defaults)


def main_of(recipe: str, recipe_main):
    """The recipe's entry point: `recipe_main(argv)` with one-line errors (exit 2), `--debug` for the traceback."""
    def main(argv=None):
        setup_logging()
        return run_recipe(recipe_main, sys.argv[1:] if argv is None else argv, f"recipes/{recipe}.py")
    return main


def setup_logging():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
