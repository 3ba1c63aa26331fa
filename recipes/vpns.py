#!/usr/bin/env python
"""VPNs and the unstructured baselines, end to end:

    accelerate launch recipes/vpns.py                                   # embedded default (offline, ~5 min CPU)
    accelerate launch recipes/vpns.py recipes/configs/vpns_resnet18_cifar100_s90.yaml
    accelerate launch recipes/vpns.py --method hydra --sparsity 0.9 --dataset_name digits

A YAML file (first argument) sets defaults; command-line flags override it. The loop lives in
`prompt_sparsity.training`; this script only parses arguments.
"""

import logging
import sys

import yaml
from transformers import HfArgumentParser

from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments
from prompt_sparsity.training import run_pruning


def parse(argv):
    parser = HfArgumentParser((ModelArguments, DataArguments, PruningArguments, RunArguments))
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0]) as f:
            defaults = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise SystemExit(f"{argv[0]}: unknown settings {unknown}; see `python {sys.argv[0]} --help`.")
        parser.set_defaults(**defaults)
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    run_pruning(*parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
