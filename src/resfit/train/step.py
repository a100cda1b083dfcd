"""One fine-tuning step: the one place where a batch of training images becomes a weight update.

Fine-tuning (``Trainer.train_epoch``) and the lr range test (``lr_find.range_test``) both step through
here, so the sweep measures the loss of exactly the steps a run takes: class-weighted, label-smoothed
cross-entropy, mixup/cutmix, autocast and the fp16 loss scaler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batched_inference import to_device
from ..hardware import Runtime
from .config import TrainConfig
from .recipe import balanced_class_weights, class_counts


@dataclass
class StepResult:
    """What a step leaves on the device (reading a number back would make the CPU wait for the GPU)."""

    summed_loss: torch.Tensor  # the batch's summed loss, detached
    loss: torch.Tensor  # the loss the gradient came from (the batch's share of the global mean)
    logits: torch.Tensor
    labels: torch.Tensor  # each image's own label, on the device (mixed batches train on soft targets)


def fine_tuning_loss(config: TrainConfig, train_labels: list[int], num_classes: int, device) -> nn.Module:
    """Summed cross-entropy with fine-tuning's label smoothing, and inverse-frequency weights under
    ``--balance loss``; summed, so a step divides by the global batch, not this process's share."""
    weights = None
    if config.balance == "loss":
        weights = balanced_class_weights(class_counts(train_labels, num_classes)).to(device)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing, reduction="sum")


def training_step(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mixing=None,
    loss_scale: float | None = None,
) -> StepResult:
    """Forward, loss, backward and optimizer step on one batch.

    ``loss_scale`` turns the summed loss into the one to differentiate: 1 / batch size for a plain mean,
    world size / global batch size under DDP (which averages gradients over processes).
    """
    targets = labels
    if mixing is not None:
        images, targets = mixing(images, labels)
    images, labels, targets = (
        to_device(images, runtime),
        labels.to(runtime.device, non_blocking=True),
        targets.to(runtime.device, non_blocking=True),
    )
    with runtime.autocast():
        logits = network(images)
    summed = criterion(logits.float(), targets)
    loss = summed * (loss_scale if loss_scale is not None else 1.0 / len(labels))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return StepResult(summed.detach(), loss.detach(), logits, labels)
