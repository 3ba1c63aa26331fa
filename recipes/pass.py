#!/usr/bin/env python
"""PASS and the structured (channel) baselines at equal FLOPs, end to end:

    accelerate launch recipes/pass.py                                   # offline EfficientNet-Lite0, 50% FLOPs
    accelerate launch recipes/pass.py --method l1 --flops_ratio 0.3     # l1, taylor, bn_scale, random_channels,
                                                                        # depgraph; --channel_selection uniform
    accelerate launch recipes/pass.py --method vpns_channels            # VPNs with one score per channel
    accelerate launch recipes/pass.py --model_name_or_path microsoft/resnet-18 --dataset_name uoft-cs/cifar100

Search (hypernetwork, or channel scores for vpns_channels, + prompt, backbone frozen) -> physical compaction -> fine-tuning with the prompt; results.json
adds FLOPs, parameters and measured latency of the compact vs the dense model.
"""

from common import main_of, parse

from prompt_sparsity.methods import get_method
from prompt_sparsity.training import run_pruning


def _main(argv):
    # 3 two-step tuning epochs after 2 prompted search epochs: the search gets a quarter of the 8 passes, the split
    # that put PASS ahead of every channel baseline at 50% and 30% FLOPs (benchmarks/README.md); an equal split
    # starved the tuning.
    args = parse(argv, recipe="pass", method="pass", finetune_epochs=3)
    if not get_method(args[2].method).structured:
        raise SystemExit(f"--method {args[2].method} is an unstructured method: use recipes/vpns.py.")
    return run_pruning(*args)


main = main_of("pass", _main)


if __name__ == "__main__":
    main()
