"""The nn.Modules wrapped around a trained network for inference: the late-fusion ensemble and test-time
augmentation (both average probabilities), the calibration temperature, and the features beside the logits.

The ensemble and TTA return log-probabilities, so every consumer that applies a softmax to "logits" (evaluate, predict,
export, the service) gets the averaged probabilities back unchanged, and both are plain nn.Modules, so
ONNX/OpenVINO export traces the whole computation: one file, the same numbers everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .models import forward_features

TTA_MODES = ("none", "flip", "multiscale", "flip+multiscale")
TTA_HELP = (
    "test-time augmentation, probabilities averaged over flips and/or sizes (multiscale: 0.875x, 1x, 1.15x "
    "the crop)"
)
# Test sizes as multiples of the training crop: FixRes (Touvron et al. 2019) shows random-resized-crop
# training makes objects look larger than at test time, so a slightly larger test size tends to help.
MULTISCALE_FACTORS = (0.875, 1.0, 1.15)
_MIN_PROBABILITY = 1e-12  # log(0) guard; far below anything a softmax in float32 distinguishes


def check_tta(mode: str) -> str:
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown --tta {mode!r}: choose one of {', '.join(TTA_MODES)}")
    return mode


def tta_sizes(mode: str, crop_size: int) -> list[int]:
    """The square test sizes a TTA mode runs at, given the model's own crop size."""
    if "multiscale" not in check_tta(mode):
        return [crop_size]
    return sorted({max(32, round(crop_size * factor)) for factor in MULTISCALE_FACTORS})


def resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) weights of PyTorch's antialiased bilinear resize along one axis (it is separable)."""
    basis = torch.eye(in_size).view(in_size, 1, 1, in_size)
    resized = nn.functional.interpolate(
        basis, size=(1, out_size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.view(in_size, out_size).t().contiguous()


class TTAWrapper(nn.Module):
    """Averages the softmax of ``model`` over horizontal flips and/or several input sizes.

    The input arrives at the largest size (same field of view, more pixels); smaller sizes are
    antialiased downsamples of it, which is what resizing the photo to that size would give.
    """

    def __init__(self, model: nn.Module, mode: str, sizes: Sequence[int]):
        super().__init__()
        self.model = model
        self.mode = check_tta(mode)
        self.flip = "flip" in mode
        self.sizes = [int(s) for s in sizes]
        largest = max(self.sizes)
        # Resizing as two matrix products: exports to ONNX/OpenVINO as MatMul, which every runtime
        # computes alike (their antialiased Resize kernels do not all agree with PyTorch's).
        for size in self.sizes:
            if size != largest:
                self.register_buffer(f"resize_{size}", resize_matrix(largest, size), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for size in self.sizes:
            view = images
            if size != images.shape[-1]:
                matrix = getattr(self, f"resize_{size}")
                view = torch.matmul(torch.matmul(matrix, images), matrix.t())
            if self.flip:
                # Both orientations in one batch: one pass through the network, better throughput.
                view = torch.cat([view, view.flip(-1)])
            probs = torch.softmax(self.model(view).float(), dim=1)
            if self.flip:
                probs = probs.view(2, -1, probs.shape[-1]).sum(0)
            total = probs if total is None else total + probs
        views = len(self.sizes) * (2 if self.flip else 1)
        return torch.log((total / views).clamp_min(_MIN_PROBABILITY))


class EnsembleModel(nn.Module):
    """Late fusion: the weighted mean of the members' softmax probabilities.

    Members may have been trained with different normalisation; each gets the input re-normalised
    from the ensemble's (the first member's) to its own, inside the graph.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float],
        input_norm: tuple[Sequence[float], Sequence[float]],
        member_norms: Sequence[tuple[Sequence[float], Sequence[float]]],
    ):
        super().__init__()
        if len(members) < 2 or len(weights) != len(members) or len(member_norms) != len(members):
            raise ConfigError("an ensemble needs two or more members, each with a weight and a normalisation")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise ConfigError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([w / total for w in weights]), persistent=False)
        mean0, std0 = (torch.tensor(v, dtype=torch.float32) for v in input_norm)
        scales, shifts = [], []
        for mean, std in member_norms:
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in (mean, std))
            # (x * std0 + mean0 - mean) / std  ==  x * scale + shift
            scales.append(std0 / std)
            shifts.append((mean0 - mean) / std)
        self.same_norm = all(
            torch.equal(s, torch.ones_like(s)) and torch.equal(t, torch.zeros_like(t))
            for s, t in zip(scales, shifts, strict=True)
        )
        # (members, 3): 2-D, so .to(memory_format=channels_last) leaves them alone.
        self.register_buffer("scales", torch.stack(scales), persistent=False)
        self.register_buffer("shifts", torch.stack(shifts), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for index, member in enumerate(self.members):
            view = images
            if not self.same_norm:
                view = images * self.scales[index].view(1, 3, 1, 1) + self.shifts[index].view(1, 3, 1, 1)
            probs = torch.softmax(member(view).float(), dim=1) * self.weights[index]
            total = probs if total is None else total + probs
        return torch.log(total.clamp_min(_MIN_PROBABILITY))


class TemperatureScaled(nn.Module):
    """``model``'s logits divided by a fixed temperature: no parameters, nothing added to the weights file."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number above 0, got {temperature}")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the autocast: the same numbers as dividing the saved raw logits afterwards
        # (calibration.scaled_logits), and no bf16 rounding added to calibrated probabilities.
        return self.model(images).float() / self.temperature


class WithFeatures(nn.Module):
    """A single network's calibrated logits with its L2-normalised pooled features appended as columns.

    One output keeps every engine (PyTorch, ONNX Runtime, OpenVINO, int8) and the service's batching as they
    are; ``split_output`` takes the two apart again.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.temperature = model.temperature if isinstance(model, TemperatureScaled) else 1.0
        self.network = model.model if isinstance(model, TemperatureScaled) else model
        if not hasattr(self.network, "fc"):
            raise ConfigError("feature scores need a single network with an fc head (not an ensemble or TTA)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_features(forward_features(self.network, images))

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The output for pooled features already computed (the head stage's cached ones)."""
        logits = self.network.fc(features).float() / self.temperature  # float32: see TemperatureScaled
        return torch.cat([logits, nn.functional.normalize(features.float(), dim=1)], dim=1)
