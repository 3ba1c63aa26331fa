"""Tiny random image classifiers, one per supported architecture, for fast tests."""

import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

ARCHITECTURES = ["resnet_basic", "resnet_bottleneck", "vit", "convnext", "mobilenet_v2", "timm_efficientnet"]
IMAGE_SIZE = 32


def tiny_model(arch: str, num_labels: int = 10, seed: int = 0):
    """A small randomly initialised classifier (eval mode) whose logits depend on the input, on every prunable
    weight and on its norm statistics (see `reinitialise`), so that tests which compare logits can fail."""
    torch.manual_seed(seed)
    if arch == "resnet_basic":
        model = ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic", num_labels=num_labels)
        )
    elif arch == "resnet_bottleneck":
        model = ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[128, 256], depths=[1, 1], layer_type="bottleneck",
                         num_labels=num_labels)
        )
    elif arch == "vit":
        model = ViTForImageClassification(
            ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_labels=num_labels)
        )
    elif arch == "convnext":
        model = ConvNextForImageClassification(
            ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE, num_labels=num_labels)
        )
    elif arch == "mobilenet_v2":
        model = MobileNetV2ForImageClassification(
            MobileNetV2Config(depth_multiplier=0.35, image_size=IMAGE_SIZE, num_labels=num_labels)
        )
    elif arch == "timm_efficientnet":
        model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_efficientnet", num_labels=num_labels))
    else:
        raise ValueError(arch)
    reinitialise(model)
    return model.eval()


@torch.no_grad()
def reinitialise(model: torch.nn.Module, calibration_batch: int = 16) -> None:
    """Make a tiny model's logits depend on its input and on every weight, so that logit comparisons can fail.

    The library inits leave these models near-constant: MobileNetV2 and timm EfficientNet give the same logits for
    every input (zero-init last BN / small heads), ConvNeXt's layer scale (1e-6) hides each residual branch. So:
    variance-preserving conv/linear weights and random biases; norm layers with random affine parameters; ConvNeXt
    layer scales around 1; BatchNorm running statistics measured on a random batch (so eval-mode activations stay
    O(1) through the depth instead of saturating), then perturbed (so losing them changes the logits)."""
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.uniform_(-0.1, 0.1)
        elif isinstance(module, norms) and getattr(module, "weight", None) is not None:
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
        for pname, param in module.named_parameters(recurse=False):
            if "layer_scale" in pname or pname in ("gamma", "lambda1", "lambda2"):
                param.uniform_(0.5, 1.5)
    bns = calibrate_norm_statistics(model, torch.randn(calibration_batch, 3, IMAGE_SIZE, IMAGE_SIZE))
    for m in bns:
        m.running_mean.add_(torch.empty_like(m.running_mean).uniform_(-0.2, 0.2) * m.running_var.sqrt())
        m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
    model.eval()


@torch.no_grad()
def calibrate_norm_statistics(model: torch.nn.Module, inputs: torch.Tensor) -> list:
    """Set every BatchNorm's running statistics to those of `inputs` through the model as it is now (e.g. with its
    mask applied), as training in train mode would. Without it a 90%-pruned random net in eval mode carries the
    dense net's statistics, its activations collapse to the norm biases, and its logits no longer depend on the
    input. Returns the BatchNorm modules; the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly the statistics of this batch
    model.train()
    model(inputs)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    return bns


def launch_two_cpu_processes(recipe: str, base_dir: str, output_dir, *extra: str):
    """`accelerate launch --multi_gpu --num_processes 2` of a recipe on CPU (gloo) with tiny data; returns the
    finished process (asserts it succeeded) and the run's results.json."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        os.path.join(root, "recipes", recipe), "--model_name_or_path", base_dir, "--dataset_name", "digits",
        "--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_train_batch_size", "8",
        "--dataloader_num_workers", "0", "--search_epochs", "1", "--finetune_epochs", "1",
        "--max_steps_per_epoch", "2", "--cpu", "--output_dir", str(output_dir), *extra,
    ]
    # This checkout's library, not whichever one is installed (another worktree's editable install, say).
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(output_dir, "results.json")) as f:
        return proc, json.load(f)


def recipe_args(base_dir: str, output_dir, **overrides):
    """The four argument groups of a tiny recipe run (a tiny base, `digits`, 2 steps per epoch, CPU); keyword
    overrides go to whichever group has the field."""
    from prompt_sparsity.arguments import DataArguments, ModelArguments, PruningArguments, RunArguments

    model = ModelArguments(model_name_or_path=base_dir, input_size=16, pad_size=2, mask_size=8)
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32,
                         per_device_train_batch_size=16, per_device_eval_batch_size=32, dataloader_num_workers=0)
    prune = PruningArguments(sparsity=0.8, search_epochs=1, finetune_epochs=1, dense_epochs=1, pruner_batches=2,
                             synflow_iterations=5)
    run = RunArguments(output_dir=str(output_dir), seed=7, cpu=True, max_steps_per_epoch=2, torch_threads=1)
    groups = (model, data, prune, run)
    for key, value in overrides.items():
        target = next(g for g in groups if hasattr(g, key))
        setattr(target, key, value)
    return groups
