#!/usr/bin/env python
"""Transfer a searched subnetwork to another dataset:

    accelerate launch recipes/transfer.py --subnetwork org/vpns-r18-c100-s90 --dataset_name tanganke/dtd
    accelerate launch recipes/transfer.py --subnetwork outputs/pass-effl0-fmnist-f50 --dataset_name mnist
    accelerate launch recipes/transfer.py --subnetwork org/pass-... --adapt_hypernetwork --search_epochs 2

The base model, prompt settings and sparsity come from the subnetwork's config; its mask (or compact structure,
or hypernetwork) and prompt are applied to the pretrained base, the label mapping is recomputed for the new
dataset, and the weights are fine-tuned (finetune_epochs) with the structure fixed.
"""

from common import ARGUMENT_GROUPS, main_of, parse

from prompt_sparsity.training import run_transfer
from prompt_sparsity.transfer import TransferArguments


def _main(argv):
    return run_transfer(*parse(argv, ARGUMENT_GROUPS + (TransferArguments,), recipe="transfer"))


main = main_of("transfer", _main)


if __name__ == "__main__":
    main()
