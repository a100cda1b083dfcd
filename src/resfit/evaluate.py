"""The metrics of a model on a split (run_folder.py writes them into a run folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from .batched_inference import eval_loader, predict_logits, softmax
from .data.dataset import ImageDataset
from .data.splits import DatasetSource
from .data.transforms import Preprocessing
from .hardware import Runtime
from .metrics import classification_metrics
from .rejection import RejectRule, answered_metrics, split_output

if TYPE_CHECKING:
    from .data.decoded_cache import DecodedImages


def evaluate_split(
    model: nn.Module,
    source: DatasetSource,
    split: str,
    preprocessing: Preprocessing,
    runtime: Runtime,
    num_workers: int = 0,
    progress: bool = False,
    reject: RejectRule | None = None,
    decoded: DecodedImages | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on one split, with the same transform and batching everywhere (train, evaluate).

    ``reject`` (the run's "unknown" rule) adds what it does on this split; a knn rule needs a model whose
    output carries the features after the logits (``load_model(..., features=True)``). ``decoded``: the
    split pre-resized to ``preprocessing.resize_size`` (data/decoded_cache.py), read instead of the files.
    """
    dataset = ImageDataset(source, split, preprocessing.eval_transform(), decoded=decoded)
    loader = eval_loader(dataset, num_workers)
    output, labels = predict_logits(model, loader, runtime, progress, desc=f"evaluate {split}")
    return metrics_of_output(output, labels, source.class_names, split, reject)


def metrics_of_output(
    output: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    split: str,
    reject: RejectRule | None = None,
) -> tuple[dict, np.ndarray]:
    """evaluate_split's metrics and probabilities from a model's output already computed (its logits, then
    the features a knn rule needs)."""
    logits, features = split_output(output, len(class_names))
    probs = softmax(logits)
    metrics = classification_metrics(labels, probs, class_names, split)
    if reject is not None:
        metrics["rejection"] = answered_metrics(logits, labels, reject, features)
    return metrics, probs
