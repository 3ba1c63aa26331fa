"""Top-1 accuracy as an offline `evaluate` metric (load with `evaluate.load(<this folder>)`)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples:
    accuracy = (number of predictions equal to the reference) / (number of examples)
Works offline: this module ships with prompt_sparsity and is loaded by path.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids (e.g. `logits.argmax(-1)`).
    references (`list` of `int`): true class ids.
    normalize (`bool`, defaults to `True`): if `False`, return the number of correct predictions
        (weighted by `sample_weight`) instead of the fraction.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float` or `int`): in [0, 1] if `normalize`, else the (weighted) count of correct
        predictions.
Examples:
    >>> metric = evaluate.load("prompt_sparsity/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        if predictions.shape != references.shape:
            raise ValueError(
                f"accuracy: got {predictions.shape[0]} predictions and {references.shape[0]} references; "
                "pass one predicted class id per reference."
            )
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
            if weights.shape != correct.shape:
                raise ValueError(
                    f"accuracy: sample_weight has {weights.shape[0]} entries for {correct.shape[0]} examples."
                )
        else:
            weights = np.ones_like(correct)
        total = float(np.dot(correct, weights))
        if not normalize:
            return {"accuracy": total if sample_weight is not None else int(round(total))}
        denominator = float(weights.sum())
        if denominator == 0.0:
            raise ValueError("accuracy: no examples (or all sample weights are zero).")
        return {"accuracy": total / denominator}
