"""What a model costs: time per image on this machine, parameters, FLOPs, bytes on disk, training time.

Every timing is of the model alone on an already preprocessed float32 batch (decoding and resizing
are the same for every model, so they would only blur the comparison), taken with
``time.perf_counter`` around the backend call after warm-up, and summarised by the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..run_folder import RunFolder


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one batch size, from ``repeats`` timed calls after ``warmup`` untimed ones."""

    batch_size: int
    warmup: int
    repeats: int
    median_s: float
    min_s: float
    max_s: float

    @property
    def median_ms(self) -> float:
        return self.median_s * 1000.0

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_s

    def to_dict(self) -> dict:
        return asdict(self) | {
            "median_ms": round(self.median_ms, 4),
            "images_per_s": round(self.images_per_s, 3),
        }


def time_calls(run: Callable[[np.ndarray], object], batch: np.ndarray, warmup: int, repeats: int) -> Timing:
    """Median wall time of ``run(batch)``: warm-up first (lazy init, caches, thread pools), then one timing per call."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        run(batch)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - start)
    return Timing(len(batch), warmup, repeats, statistics.median(seconds), min(seconds), max(seconds))


def batch_of(images: np.ndarray, size: int) -> np.ndarray:
    """``size`` preprocessed images, cycling through ``images`` when there are fewer of them."""
    if len(images) == 0:
        raise ValueError("no images to build a batch from")
    return np.ascontiguousarray(images[np.arange(size) % len(images)], dtype=np.float32)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def count_flops(model: nn.Module, image: np.ndarray) -> int:
    """FLOPs of one forward pass on one image, as FlopCounterMode counts them.

    It counts convolutions and matrix products at 2 FLOPs per multiply-add; BatchNorm, ReLU, pooling
    and additions are not counted. Half of it is the multiply-add count (torchvision's "GFLOPS").
    """
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)))
    return int(counter.get_total_flops())


def weights_files(run_dir: Path, meta: dict) -> list[Path]:
    """The weight files a run needs on disk: model.safetensors, or an ensemble's member copies where it keeps them."""
    folder = RunFolder(run_dir)
    if meta.get("architecture") == "ensemble":
        files = sorted(folder.members_dir.glob(f"*/{RunFolder.MODEL_WEIGHTS}"))
        if files:
            return files
    return [folder.weights_file]


def file_size(files: list[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def history_seconds(run_dir: Path) -> float | None:
    """The run's training time as its history.csv recorded it (last row's ``elapsed``), if any."""
    return RunFolder(run_dir).training_seconds()
