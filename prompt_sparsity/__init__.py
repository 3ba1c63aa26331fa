"""prompt_sparsity: sparse subnetworks of pretrained image classifiers, found with a learned visual prompt.

Importing the package registers `PromptedSparseConfig`/`PromptedSparseModel` with the transformers Auto classes,
so `AutoModelForImageClassification.from_pretrained(saved_dir)` returns a `PromptedSparseModel`.
"""

from .configuration import PromptedSparseConfig
from .label_mapping import frequency_label_mapping
from .export import export_onnx
from .modeling import PromptedClassifier, PromptedSparseModel
from .modeling_merged import MergedClassifier, MergedClassifierConfig
from .semi_structured_export import export_semi_structured, prepare_semi_structured, semi_structured_matrices

__version__ = "0.1.0"

__all__ = [
    "MergedClassifier",
    "MergedClassifierConfig",
    "PromptedClassifier",
    "PromptedSparseConfig",
    "PromptedSparseModel",
    "export_onnx",
    "export_semi_structured",
    "frequency_label_mapping",
    "prepare_semi_structured",
    "semi_structured_matrices",
    "__version__",
]
