"""Command-line helpers for the recipes (the library itself never parses a command line): the embedded demo's own
defaults."""

from __future__ import annotations

import os
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
