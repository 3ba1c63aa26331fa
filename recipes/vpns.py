#!/usr/bin/env python
"""VPNs and the unstructured baselines, end to end:

    accelerate launch recipes/vpns.py                                   # embedded default (offline, CPU)
    accelerate launch recipes/vpns.py recipes/configs/vpns_resnet18_cifar100_s90.yaml
    accelerate launch recipes/vpns.py --method hydra --sparsity 0.9 --dataset_name digits

A YAML file (first argument) sets defaults; command-line flags override it. The loop lives in
`prompt_sparsity.training`; this script only parses arguments.
"""

from common import main_of, parse

from prompt_sparsity.methods import get_method
from prompt_sparsity.training import run_pruning


def _main(argv):
    args = parse(argv, recipe="vpns")
    if get_method(args[2].method).structured:
        raise SystemExit(f"--method {args[2].method} is a structured method: use recipes/pass.py.")
    return run_pruning(*args)


main = main_of("vpns", _main)


if __name__ == "__main__":
    main()
