"""The optional parts of the fine-tuning recipe: progressive multi-scale training, EMA, mixup/cutmix, balancing.

Each is a small pure function or object the training loop calls; whether it is on by default follows the
measurements in the README ("Recipe extras, measured").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..errors import ConfigError, RunFolderError
from ..torchvision_import import torchvision  # noqa: F401 - registers the import shim before transforms.v2

BALANCE_MODES = ("auto", "none", "sampler", "loss")
# Classes this unequal (largest / smallest training class) get balanced under --balance auto (the
# default), and a warning under --balance none.
IMBALANCE_WARNING_RATIO = 3.0
# What --balance auto turns on for unequal classes: measured best on a thinned ants/bees set (README).
AUTO_BALANCE = "sampler"
# Which validated model a run keeps (TrainConfig.keep; replaces_kept_model).
KEEP_RULES = ("best", "one-se")
# What an EMA run validates each epoch (TrainConfig.ema_keep; ema_or_network).
EMA_KEEP_RULES = ("average", "better")
# The EMA's shortest half-life, in steps: one epoch of all of flowers5 (2,302 photos, batch 32), where a
# one-epoch half-life kept the average at the probe's accuracy while the network dipped. On a few hundred
# photos an epoch is 7 steps, and a one-epoch half-life let the average follow the network into its dip
# (benchmarks/results/ema-better-hl72-fixed-rule.md).
EMA_MIN_HALF_LIFE_STEPS = 72
# Multi-scale sizes, as fractions of the training size, when --multi-scale is given without --train-sizes.
PROGRESSIVE_FRACTIONS = (0.75, 0.875, 1.0)


def default_train_sizes(img_size: int) -> list[int]:
    """Small to large, multiples of 8 (friendly to conv kernels), ending at the evaluation size."""
    sizes = {max(32, 8 * round(img_size * f / 8)) for f in PROGRESSIVE_FRACTIONS[:-1]} | {img_size}
    return sorted(sizes)


def epoch_sizes(train_sizes: list[int], epochs: int) -> list[int]:
    """Progressive resizing: the fine-tuning epochs split into len(sizes) runs, smallest size first.

    Small images early are cheap and teach coarse features; the last epochs at the full size match the
    evaluation size, so there is no train/test resolution gap at the end (fastai progressive resizing,
    FixRes). Returns the size of each epoch 1..epochs.
    """
    sizes = sorted(train_sizes)
    if epochs <= 1:
        return [sizes[-1]] * epochs
    # Evenly spread, first epoch at the smallest size and the last at the largest.
    return [sizes[round(epoch * (len(sizes) - 1) / (epochs - 1))] for epoch in range(epochs)]


def batch_for_size(batch_size: int, img_size: int, size: int, world_size: int = 1) -> int:
    """Keep memory bounded: above the base size the batch shrinks with the pixel count; below it stays."""
    if size <= img_size:
        return batch_size
    scaled = int(batch_size * (img_size / size) ** 2)
    return max(world_size, scaled - scaled % world_size)


def class_counts(labels: list[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def imbalance_ratio(counts: np.ndarray) -> float:
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def balanced_class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency loss weights, mean 1 over the classes present, so the loss scale stays comparable."""
    counts = counts.astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sample_weights(labels: list[int], counts: np.ndarray) -> np.ndarray:
    """Per-image sampling weights 1/count(class): every class drawn equally often in expectation."""
    return 1.0 / counts[np.asarray(labels, dtype=np.int64)].astype(np.float64)


def batch_mixing(mixup: float, cutmix: float, num_classes: int):
    """torchvision's MixUp and/or CutMix (one chosen per batch when both are on), or None when both are 0."""
    if mixup < 0 or cutmix < 0:
        raise ConfigError(f"mixup and cutmix are Beta alphas >= 0, got {mixup} and {cutmix}")
    from torchvision.transforms import v2

    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def ema_decay_for(steps_per_epoch: int, decay: float | None) -> float:
    """The given decay, or one whose half-life is the longer of one epoch and EMA_MIN_HALF_LIFE_STEPS.

    Fine-tuning runs are short, so a fixed 0.9998 (ImageNet-length runs) would keep the EMA at its starting
    point; a half-life of a few steps would follow the network's every move, its first epoch's dip included.
    """
    if decay is not None:
        if not 0 < decay < 1:
            raise ConfigError(f"ema-decay must be in (0, 1), got {decay}")
        return decay
    return 0.5 ** (1 / max(steps_per_epoch, EMA_MIN_HALF_LIFE_STEPS))


def replaces_kept_model(
    val_acc: float, kept_val_acc: float, head_stage_val_acc: float | None, n_val: int, rule: str
) -> bool:
    """Whether an epoch with ``val_acc`` replaces the kept model (``kept_val_acc``).

    ``head_stage_val_acc``: the head stage's, where its model is still the kept one and this is a fine-tuned
    epoch (else None). "best" keeps the highest val accuracy. "one-se" is the one-standard-error rule
    (Hastie, Tibshirani & Friedman, ESL 7.10) with the head stage as the simpler model: a fine-tuned epoch
    replaces it only by beating it by more than sqrt(p (1 - p) / n_val), since on a few dozen photos a lead
    of one or two is as likely luck as learning; once a fine-tuned epoch is kept, the best one is.
    """
    if rule not in KEEP_RULES:
        raise ConfigError(f"keep must be one of {', '.join(KEEP_RULES)}, got {rule!r}")
    if val_acc <= kept_val_acc:
        return False
    if rule == "one-se" and head_stage_val_acc is not None:
        return val_acc - head_stage_val_acc > math.sqrt(val_acc * (1 - val_acc) / max(1, n_val))
    return True


def ema_or_network(average_val_acc: float, network_val_acc: float) -> str:
    """--ema-keep better: which of the epoch's two models stands for it, "average" or "network".

    The average starts as the head stage's weights and trails the network: early on it keeps the probe's
    accuracy while the network's first steps at peak lr lose it (the dip), and at the end of the schedule it
    lags the network by about an epoch. The one with the higher val accuracy stands for the epoch (and may be
    kept, by the keep rule); a tie goes to the average, whose answers are the steadier.
    """
    return "network" if network_val_acc > average_val_acc else "average"


def interpolate_weights(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al., 2022): ``share`` of the fine-tuned weights plus the rest of the start's.

    Fine-tuning on a few hundred photos fits them at the cost of what the source knew; the point between the
    head stage and the end of fine-tuning keeps some of both, with no extra training and no choice made on
    the small validation split. Integer buffers (BatchNorm's batch counter) are the fine-tuned ones.
    """
    if not 0 <= share <= 1:
        raise ConfigError(f"wise-ft must be in [0, 1], got {share}")
    if start.keys() != end.keys():
        raise RunFolderError("wise-ft: the head-stage and fine-tuned weights have different tensors")
    mismatched = [name for name, value in end.items() if start[name].shape != value.shape]
    if mismatched:
        raise RunFolderError(
            f"wise-ft: the head-stage and fine-tuned weights differ in shape at {', '.join(mismatched[:3])}"
        )
    return {
        name: torch.lerp(start[name].to(value), value, share) if value.is_floating_point() else value.clone()
        for name, value in end.items()
    }


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights (and BatchNorm buffers), updated after every step.

    It starts from ``model``'s weights as they are now (the head stage's). AveragedModel's first update
    copies the network instead of averaging it, so without the update here the average would start from the
    network after its first step: one AdamW step moves every weight by about the lr whatever its gradient,
    and that network scored 3 points below the head stage on ants/bees' val.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)
    return ema
