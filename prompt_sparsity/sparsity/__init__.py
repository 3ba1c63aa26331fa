"""Sparsity patterns: unstructured weight masks (`unstructured`), channel units and compaction (`channels`),
FLOPs and parameter counts (`flops`)."""
