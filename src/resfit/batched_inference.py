"""Running a model over batches: the in-order loader, the device transfer, the logits and their softmax.

The one way every inference pass batches (head-stage features, validation, evaluate, the ensemble's
weights, predict and the service), below evaluation and training, which both use it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .hardware import Runtime

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
