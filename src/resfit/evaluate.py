"""Running a model over a split and the metrics of the result (run_folder.py writes them into a run folder)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data.dataset import ImageDataset
from .data.splits import DatasetSource
from .data.transforms import Preprocessing
from .hardware import Runtime
from .rejection import RejectRule, answered_metrics, split_output
from .reports import classification_metrics

EVAL_BATCH_SIZE = 64


def eval_loader(dataset, num_workers: int) -> torch.utils.data.DataLoader:
    """In order, fixed batches: every inference pass (features, validation, evaluate) batches alike."""
    return torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, num_workers=num_workers)


def to_device(images: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    images = images.to(runtime.device, non_blocking=True)
    # channels_last helps oneDNN (fp32 and bf16) and cuDNN tensor cores alike.
    return images.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader, runtime: Runtime, progress: bool = False, desc: str = "eval"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels for every batch of ``loader``, in order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        with runtime.autocast():
            logits = model(to_device(images, runtime))
        all_logits.append(logits.float().cpu())
        all_labels.append(torch.as_tensor(labels))
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def evaluate_split(
    model: nn.Module,
    source: DatasetSource,
    split: str,
    preprocessing: Preprocessing,
    runtime: Runtime,
    num_workers: int = 0,
    progress: bool = False,
    reject: RejectRule | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on one split, with the same transform and batching everywhere (train, evaluate).

    ``reject`` (the run's "unknown" rule) adds what it does on this split; a knn rule needs a model whose
    output carries the features after the logits (``load_model(..., features=True)``).
    """
    dataset = ImageDataset(source, split, preprocessing.eval_transform())
    loader = eval_loader(dataset, num_workers)
    output, labels = predict_logits(model, loader, runtime, progress, desc=f"evaluate {split}")
    logits, features = split_output(output, len(source.class_names))
    probs = softmax(logits)
    metrics = classification_metrics(labels, probs, source.class_names, split)
    if reject is not None:
        metrics["rejection"] = answered_metrics(logits, labels, reject, features)
    return metrics, probs
