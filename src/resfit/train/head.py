"""Stage 1: the head on the frozen backbone, fitted as a linear probe on cached pooled features.

With the backbone frozen and no augmentation, every epoch of forward passes would compute the same
features again; extracting them once and fitting an L2-regularised multinomial logistic regression
(its strength chosen by cross-validation on the training split) gives the best linear head in seconds. The scaler
is folded into the head, so the model needs no extra layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

from ..batched_inference import eval_loader, to_device
from ..data.dataset import ImageDataset
from ..data.decoded_cache import DecodedImages
from ..data.splits import DatasetSource
from ..data.transforms import Preprocessing
from ..errors import DataError
from ..hardware import Runtime
from ..models import forward_features

REGULARISATION_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
# L-BFGS iterations: cross-validation fits are warm-started along the grid and only rank the strengths,
# so fewer suffice (measured on flowers5: 30 vs 150 picks alike, 4x faster); the final fit gets more.
CV_ITERATIONS = 30
FINAL_ITERATIONS = 100


@dataclass
class ProbeResult:
    regularisation: float  # the chosen C of the logistic regression
    cv_accuracy: float
    train_accuracy: float


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    source: DatasetSource,
    split: str,
    preprocessing: Preprocessing,
    runtime: Runtime,
    num_workers: int,
    progress: bool,
    indices: list[int] | None = None,
    decoded: DecodedImages | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of a split (or of its ``indices``), eval transform, BatchNorm in eval mode.

    ``decoded``: the split's decoded-image cache at the eval resize size (the same pixels, no decoding).
    """
    model.eval()
    dataset = ImageDataset(source, split, preprocessing.eval_transform(), decoded=decoded)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    loader = eval_loader(dataset, num_workers)
    features, labels = [], []
    for images, batch_labels in tqdm(
        loader, desc=f"features {split}", leave=False, disable=not progress, unit="batch"
    ):
        with runtime.autocast():
            features.append(forward_features(model, to_device(images, runtime)).float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def _fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    strength: float,
    init: torch.Tensor | None = None,
    max_iter: int = FINAL_ITERATIONS,
) -> torch.Tensor:
    """Multinomial logistic regression with sklearn's L2 objective (C = ``strength``), by full-batch L-BFGS.

    Returns the (features + 1, classes) matrix, bias last. The problem is small and smooth, so a few hundred
    L-BFGS steps on the whole batch solve it in well under a second.
    """
    n, d = x.shape
    params = torch.zeros(d + 1, num_classes, dtype=x.dtype) if init is None else init.clone()
    params.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [params],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ params[:-1] + params[-1]
        loss = nn.functional.cross_entropy(logits, y) + (params[:-1] ** 2).sum() / (2 * strength * n)
        loss.backward()
        return loss

    optimizer.step(objective)
    return params.detach()


def _accuracy(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ params[:-1] + params[-1]).argmax(1) == y).double().mean())


def _choose_regularisation(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int
) -> tuple[float, float]:
    """C by stratified k-fold accuracy on the training split (never on validation)."""
    labels = y.numpy()
    folds = min(3, int(np.bincount(labels).min()))
    if folds < 2:
        return 0.1, float("nan")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = dict.fromkeys(REGULARISATION_GRID, 0.0)
    for fit_index, held_index in splitter.split(np.zeros(len(labels)), labels):
        fit_idx, held_idx = torch.from_numpy(fit_index), torch.from_numpy(held_index)
        params = None
        for strength in REGULARISATION_GRID:  # strongest first: each fit warm-starts the next
            params = _fit_logistic(x[fit_idx], y[fit_idx], num_classes, strength, params, CV_ITERATIONS)
            scores[strength] += _accuracy(params, x[held_idx], y[held_idx]) / folds
    chosen = max(scores, key=scores.get)  # ties go to the stronger regularisation (listed first)
    return chosen, scores[chosen]


def fit_probe_head(
    head: nn.Linear, features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int
) -> ProbeResult:
    """Fit the logistic regression and write it into ``head`` (standardisation folded into weights and bias)."""
    scaler = StandardScaler().fit(features)
    x = torch.from_numpy(scaler.transform(features)).float()
    y = torch.from_numpy(labels).long()
    strength, cv_accuracy = _choose_regularisation(x, y, num_classes, seed)
    params = _fit_logistic(x, y, num_classes, strength).double().numpy()
    coef, intercept = params[:-1].T, params[-1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale
    bias = intercept - weight @ scaler.mean_
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).to(head.weight.dtype))
        head.bias.copy_(torch.from_numpy(bias).to(head.bias.dtype))
    train_accuracy = _accuracy(torch.from_numpy(params).float(), x, y)
    return ProbeResult(strength, cv_accuracy, train_accuracy)


def head_logits(head: nn.Linear, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head(torch.from_numpy(features).to(head.weight.dtype)).numpy()


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, folds: int = 5
) -> np.ndarray:
    """Each image's class probabilities from the probe fitted on the other folds (confident learning's input).

    The strength C is chosen once, as the head stage chooses it; each fold standardises on its own fit part.
    """
    folds = min(folds, int(np.bincount(labels, minlength=num_classes).min()))
    if folds < 2:
        raise DataError("confident learning needs at least two images of every class")
    y = torch.from_numpy(labels).long()
    x_all = torch.from_numpy(StandardScaler().fit_transform(features)).float()
    strength, _ = _choose_regularisation(x_all, y, num_classes, seed)
    probabilities = np.zeros((len(labels), num_classes), np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_index, held_index in splitter.split(np.zeros(len(labels)), labels):
        scaler = StandardScaler().fit(features[fit_index])
        x_fit = torch.from_numpy(scaler.transform(features[fit_index])).float()
        x_held = torch.from_numpy(scaler.transform(features[held_index])).float()
        params = _fit_logistic(x_fit, y[fit_index], num_classes, strength)
        logits = x_held @ params[:-1] + params[-1]
        probabilities[held_index] = torch.softmax(logits.double(), 1).numpy()
    return probabilities
