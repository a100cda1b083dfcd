"""Every "chosen for you" setting of a run, decided once by a pure function and stored with the run.

``resolve_settings(config, runtime, pretrained, data)`` returns a new TrainConfig with image size, batch size,
frozen blocks, workers, lr, patience and class balance filled in, the one ``Preprocessing`` the run trains
and is served with, and the lines that say what was decided. The caller's config is left as it was, so the
Python API can reuse one config for several runs, and a resumed run reads the resolved values back from
train_config.json instead of deciding again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..data.transforms import Preprocessing
from ..errors import ConfigError
from ..hardware import Runtime, default_num_workers
from ..models import PretrainedSource
from .config import TrainConfig
from .recipe import AUTO_BALANCE, IMBALANCE_WARNING_RATIO, imbalance_ratio


@dataclass(frozen=True)
class DataFacts:
    """What the decisions need to know of the dataset."""

    train_counts: np.ndarray  # images per class in the train split
    sharded: bool = False  # streamed from shards: no sampling by position


@dataclass(frozen=True)
class Resolved:
    config: TrainConfig  # no "auto" and no None left where a default is decided
    preprocessing: Preprocessing
    notes: tuple[str, ...] = ()  # what was decided and why, for the run's log


def default_img_size(pretrained: PretrainedSource) -> int:
    """The resolution the weights were trained at (224 for torchvision's ImageNet weights)."""
    return pretrained.crop_size or 224


def default_frozen_blocks(pretrained: PretrainedSource) -> int:
    """Stem + layer1 left as a pretrained source made them, every block trained from scratch.

    In the accuracy suite (ResNet-50, 9 fold-runs on each of ants/bees and flowers5, benchmarks/RESULTS.md
    section 7) freezing them was level with training every block (+0.1 points, 95% CI [-1.2, +1.3] on
    flowers5) and flowers5's runs were 1.11x [1.09, 1.14] faster, paired per fold (ants/bees' times were too
    noisy to say): no backward pass through the blocks with the largest activations, the step's biggest gain
    on a CPU without native bf16 (issue #17).
    """
    return 0 if pretrained.kind == "none" else 2


def default_patience(ema: bool) -> int:
    """With the EMA (the default) fine-tuning never ends early (0); with --no-ema after 3 epochs without a
    lower val loss.

    An EMA's validated weights start as the head stage's and trail the network, so their loss can stay
    flat for epochs while the network beneath climbs out of its first epochs' dip. On all of flowers5
    (benchmarks/RESULTS.md section 7, "an EMA of the weights") early stopping ended 2 of 9 EMA runs after
    epoch 4, keeping the head stage or epoch 1; run to the end, they scored 34 and 41 more of 1,439 test
    photos.
    """
    return 0 if ema else 3


def default_batch_size(runtime: Runtime, img_size: int) -> int:
    if runtime.device_type == "cuda":
        return 64
    return 32 if img_size <= 192 else 16


def preprocessing_for(img_size: int, pretrained: PretrainedSource) -> Preprocessing:
    """The source's own resize and crop at its training size (torchvision's weights say theirs), else the
    usual 0.875 crop ratio with the source's normalisation."""
    if pretrained.kind == "imagenet" and img_size == pretrained.crop_size:
        return Preprocessing(img_size, pretrained.resize_size, pretrained.mean, pretrained.std)
    return Preprocessing.for_size(img_size, pretrained.mean, pretrained.std)


def resolve_balance(balance: str, train_counts: np.ndarray, sharded: bool) -> tuple[str, list[str]]:
    """--balance auto decided by the class counts; a stream cannot sample by position (sampler -> loss)."""
    notes = []
    ratio = imbalance_ratio(train_counts)
    unequal = (
        f"training classes are unequal (largest {train_counts.max()} images, smallest "
        f"{train_counts[train_counts > 0].min()}: {ratio:.1f}x)"
    )
    if balance == "auto":
        balance = AUTO_BALANCE if ratio >= IMBALANCE_WARNING_RATIO else "none"
        if balance != "none":
            notes.append(f"{unequal}: --balance {balance} (auto; --balance none to turn it off)")
    elif ratio >= IMBALANCE_WARNING_RATIO and balance == "none":
        notes.append(f"warning: {unequal}; consider --balance sampler or --balance loss")
    if sharded and balance == "sampler":
        notes.append(
            "note: --balance sampler draws images by position, which a stream cannot: using --balance loss"
        )
        balance = "loss"
    return balance, notes


def resolve_settings(
    config: TrainConfig,
    runtime: Runtime,
    pretrained: PretrainedSource,
    data: DataFacts,
    *,
    processes_per_node: int = 1,
    distributed: bool = False,
) -> Resolved:
    """The run's settings with every default decided; ``config`` itself is not changed."""
    if config.lr == "auto" and distributed:
        # One process runs the range test while the others wait: SyncBatchNorm would hang on it.
        raise ConfigError(
            "--lr auto is for single-process runs: run `resfit lr-find` with the same flags, "
            "then pass the lr it suggests to torchrun as --lr"
        )
    balance, notes = resolve_balance(config.balance, data.train_counts, data.sharded)
    img_size = config.img_size or default_img_size(pretrained)
    resolved = replace(
        config,
        balance=balance,
        img_size=img_size,
        batch_size=config.batch_size or default_batch_size(runtime, img_size),
        frozen_blocks=(
            default_frozen_blocks(pretrained) if config.frozen_blocks is None else config.frozen_blocks
        ),
        num_workers=(
            default_num_workers(runtime, processes_per_node)
            if config.num_workers is None
            else config.num_workers
        ),
        lr=config.head_lr if config.lr is None else config.lr,
        patience=default_patience(config.ema) if config.patience is None else config.patience,
        log=list(config.log),
    )
    return Resolved(resolved, preprocessing_for(img_size, pretrained), tuple(notes))
