"""Top-5 accuracy as an offline `evaluate` metric (load with `evaluate.load(<this folder>)`)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-5 accuracy is the proportion of examples whose true class is among the 5 highest-scoring
classes. With C < 5 classes, k = C (so the value is 1.0). Ties are broken towards the lower class
id (a network that outputs constant logits does not get credit for every class at once), and NaN
scores rank last. Works offline: this module ships with prompt_sparsity and is loaded by path.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-example class scores (logits or
        probabilities), all rows of the same length C (the number of classes).
    references (`list` of `int`): true class ids in [0, C).
    normalize (`bool`, defaults to `True`): if `False`, return the number of examples whose
        reference is in the top 5 (weighted by `sample_weight`) instead of the fraction.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    top5_accuracy (`float` or `int`).
Examples:
    >>> metric = evaluate.load("prompt_sparsity/metrics/top5_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]], references=[2, 1])
    {'top5_accuracy': 1.0}
"""

_CITATION = """
@inproceedings{krizhevsky2012imagenet,
  title={ImageNet Classification with Deep Convolutional Neural Networks},
  author={Krizhevsky, Alex and Sutskever, Ilya and Hinton, Geoffrey E.},
  booktitle={NeurIPS},
  year={2012}
}
"""

_K = 5


def _as_score_matrix(predictions):
    try:
        rows = [np.asarray(row, dtype=np.float64).reshape(-1) for row in predictions]
    except (TypeError, ValueError) as err:
        raise ValueError(f"top5_accuracy: predictions must be lists of class scores ({err}).") from err
    if not rows:
        return np.zeros((0, 0))
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"top5_accuracy: every prediction must hold one score per class, but rows have lengths {sorted(lengths)}."
        )
    scores = np.stack(rows)
    if scores.shape[1] == 0:
        raise ValueError("top5_accuracy: predictions have no class scores (empty rows).")
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Top5Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        scores = _as_score_matrix(predictions)
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        n = references.shape[0]
        if scores.shape[0] != n:
            raise ValueError(
                f"top5_accuracy: got {scores.shape[0]} predictions and {n} references; "
                "pass one row of class scores per reference."
            )
        if n == 0:
            raise ValueError("top5_accuracy: no examples.")
        num_classes = scores.shape[1]
        if references.min() < 0 or references.max() >= num_classes:
            raise ValueError(
                f"top5_accuracy: references must be class ids in [0, {num_classes}) for {num_classes} scores per row, "
                f"got values in [{references.min()}, {references.max()}]."
            )
        k = min(_K, num_classes)
        scores = np.where(np.isnan(scores), -np.inf, scores)
        rows = np.arange(n)
        ref_scores = scores[rows, references][:, None]
        # rank of the reference = classes scoring higher + equal-scoring classes with a lower id
        lower_id = np.arange(num_classes)[None, :] < references[:, None]
        rank = (scores > ref_scores).sum(axis=1) + ((scores == ref_scores) & lower_id).sum(axis=1)
        correct = (rank < k).astype(np.float64)
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
            if weights.shape != correct.shape:
                raise ValueError(f"top5_accuracy: sample_weight has {weights.shape[0]} entries for {n} examples.")
        else:
            weights = np.ones_like(correct)
        total = float(np.dot(correct, weights))
        if not normalize:
            return {"top5_accuracy": total if sample_weight is not None else int(round(total))}
        denominator = float(weights.sum())
        if denominator == 0.0:
            raise ValueError("top5_accuracy: all sample weights are zero.")
        return {"top5_accuracy": total / denominator}
