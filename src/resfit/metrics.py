"""Turn predicted probabilities into the numbers and the table a user reads after a run.

Everything here works on plain arrays (labels, softmax probabilities, class names), so training-time
evaluation, ``resfit evaluate`` and the tests all share one definition of every metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

# Probabilities are clipped here before the log so a confidently wrong prediction costs a large,
# finite loss (about 27.6) instead of infinity.
_PROB_FLOOR = 1e-12
# Rows of a softmax may drift from 1 under float16/bfloat16; beyond this they are probably logits.
_ROW_SUM_TOLERANCE = 1e-2
_TOP_K = 5


def _round(value: float) -> float:
    """A plain Python float with 6 digits: JSON-friendly and stable to compare across runs."""
    return round(float(value), 6)


def _checked_arrays(
    labels: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the inputs once, so every metric below can trust their shapes and ranges."""
    label_array = np.asarray(labels)
    prob_array = np.asarray(probs, dtype=np.float64)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence of class indices, got shape {label_array.shape}")
    if label_array.size == 0:
        raise ValueError("no images to evaluate: labels is empty")
    if prob_array.ndim != 2:
        raise ValueError(f"probs must be a 2-D (num_images, num_classes) array, got shape {prob_array.shape}")
    if prob_array.shape[0] != label_array.shape[0]:
        raise ValueError(f"probs has {prob_array.shape[0]} rows but there are {label_array.shape[0]} labels")
    num_classes = len(class_names)
    if prob_array.shape[1] != num_classes:
        raise ValueError(f"probs has {prob_array.shape[1]} columns but there are {num_classes} class names")
    if len(set(class_names)) != num_classes:
        raise ValueError(f"class names must be unique, got {list(class_names)}")
    if label_array.dtype.kind == "f" and np.all(np.mod(label_array, 1) == 0):
        label_array = label_array.astype(np.int64)
    if label_array.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {label_array.dtype}")
    out_of_range = label_array[(label_array < 0) | (label_array >= num_classes)]
    if out_of_range.size:
        raise ValueError(
            f"label {int(out_of_range[0])} is out of range for {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )
    if not np.all(np.isfinite(prob_array)) or np.any(prob_array < 0):
        raise ValueError("probs must be finite and non-negative (softmax probabilities)")
    row_sums = prob_array.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"probs row {worst} sums to {row_sums[worst]:.4f}, not 1: pass softmax probabilities, not logits"
        )
    return label_array.astype(np.int64), prob_array


def _top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k most probable; ties go to the lower index."""
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(ranked == labels[:, None], axis=1)))


def classification_metrics(
    labels: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str], split: str
) -> dict:
    """Every number reported for one split, as plain JSON-able types.

    Macro averages cover the classes that occur in the labels or the predictions (scikit-learn's
    default): a class absent from both has nothing to score and would only drag the mean to zero,
    while a class that is predicted but never true still counts, with its false positives.
    """
    labels, probs = _checked_arrays(labels, probs, class_names)
    num_images, num_classes = probs.shape
    class_ids = list(range(num_classes))
    predicted = np.argmax(probs, axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=class_ids, zero_division=0
    )
    predicted_counts = np.bincount(predicted, minlength=num_classes)
    scored = (support > 0) | (predicted_counts > 0)
    true_probability = np.clip(probs[np.arange(num_images), labels], _PROB_FLOOR, 1.0)

    metrics: dict[str, Any] = {
        "split": split,
        "num_images": int(num_images),
        "num_classes": int(num_classes),
        "class_names": [str(name) for name in class_names],
        "accuracy": _round(np.mean(predicted == labels)),
    }
    if num_classes >= _TOP_K:
        metrics["top5_accuracy"] = _round(_top_k_accuracy(labels, probs, _TOP_K))
    metrics.update(
        {
            "loss": _round(-np.mean(np.log(true_probability))),
            "precision_macro": _round(np.mean(precision[scored])),
            "recall_macro": _round(np.mean(recall[scored])),
            "f1_macro": _round(np.mean(f1[scored])),
            "f1_weighted": _round(np.sum(f1 * support) / np.sum(support)),
            "per_class": {
                str(name): {
                    "precision": _round(precision[index]),
                    "recall": _round(recall[index]),
                    "f1": _round(f1[index]),
                    "support": int(support[index]),
                }
                for index, name in enumerate(class_names)
            },
            "confusion_matrix": confusion_matrix(labels, predicted, labels=class_ids).tolist(),
        }
    )
    return metrics


def misclassified_examples(
    labels: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    items: Sequence[str],
    class_names: Sequence[str],
    limit: int = 50,
) -> list[dict]:
    """The wrong predictions, most confident first: the ones most worth looking at (often label errors)."""
    labels, probs = _checked_arrays(labels, probs, class_names)
    if len(items) != len(labels):
        raise ValueError(f"got {len(items)} items but {len(labels)} labels")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    predicted = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(labels)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    # Stable sort keeps the original order among equally confident mistakes, so reports are reproducible.
    ordered = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return [
        {
            "path": str(items[index]),
            "true": str(class_names[labels[index]]),
            "predicted": str(class_names[predicted[index]]),
            "confidence": _round(confidence[index]),
            "true_probability": _round(probs[index, labels[index]]),
        }
        for index in ordered
    ]


def format_metrics_table(metrics: dict) -> str:
    """A fixed-width table like scikit-learn's classification report, for printing after evaluation."""
    missing = [key for key in ("split", "num_images", "per_class", "accuracy") if key not in metrics]
    if missing:
        raise ValueError(f"metrics dict is missing {missing}; build it with classification_metrics")
    per_class = metrics["per_class"]
    name_width = max([len("top-5 accuracy"), *(len(name) for name in per_class)])
    header = f"{'class':<{name_width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"

    def row(name: str, precision: Any, recall: Any, f1: Any, support: Any) -> str:
        cells = [
            f"{value:>9.3f}" if isinstance(value, float | int) else f"{'':>9}"
            for value in (precision, recall, f1)
        ]
        support_text = f"{support:>8d}" if isinstance(support, int) else f"{'':>8}"
        return f"{name:<{name_width}}  {'  '.join(cells)}  {support_text}".rstrip()

    num_images = int(metrics["num_images"])
    num_classes = metrics.get("num_classes", len(per_class))
    lines = [
        f"split: {metrics['split']}   images: {num_images}   classes: {num_classes}",
        header,
        "-" * len(header),
    ]
    for name, scores in per_class.items():
        lines.append(row(name, scores["precision"], scores["recall"], scores["f1"], int(scores["support"])))
    lines.append("-" * len(header))
    if "precision_macro" in metrics:
        lines.append(
            row(
                "macro avg",
                metrics["precision_macro"],
                metrics["recall_macro"],
                metrics["f1_macro"],
                num_images,
            )
        )
    lines.append(row("accuracy", None, None, metrics["accuracy"], num_images))
    if "top5_accuracy" in metrics:
        lines.append(row("top-5 accuracy", None, None, metrics["top5_accuracy"], num_images))
    if "loss" in metrics:
        lines.append(row("loss", None, None, metrics["loss"], None))
    return "\n".join(lines)
