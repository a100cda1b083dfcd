"""Confidence that means what it says: temperature scaling (Guo et al. 2017) and the scores that measure it.

A fine-tuned network's softmax is usually over- or under-confident. One temperature T, fitted on held-out
logits by minimising the negative log-likelihood, divides every logit: accuracy cannot change (the order of
the logits is kept) while the probabilities become honest. The temperature lives in model.json and inside
the model (``model_wrappers.TemperatureScaled``), so PyTorch, ONNX/OpenVINO exports and the service apply it alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import minimize_scalar

if TYPE_CHECKING:  # run_folder evaluates with this module's scores: the folder is handed in, not imported
    from .run_folder import RunFolder

ECE_BINS = 15
# T is searched from 0.1 to 10, far beyond what a trained network needs; an optimum at either end means the
# held-out set cannot pin T down (e.g. no mistakes: the NLL falls forever as T -> 0), and T stays 1.
_LOG_T_BOUND = math.log(10.0)
MIN_CALIBRATION_IMAGES = 30
# The prior on log T (mean 0, this sd): T within about 0.37-2.7 before the photos speak (choose_temperature).
PRIOR_LOG_T_SD = 0.5


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()


def why_not_calibrated(logits: np.ndarray, labels: np.ndarray) -> str | None:
    """Why a temperature cannot be fitted on these held-out predictions (None when it can)."""
    if len(labels) < MIN_CALIBRATION_IMAGES:
        return f"only {len(labels)} validation images (at least {MIN_CALIBRATION_IMAGES} are needed)"
    if (np.asarray(logits).argmax(1) == np.asarray(labels)).all():
        return "no mistakes on the validation split, so nothing to calibrate against"
    return None


def fit_temperature(logits: np.ndarray, labels: np.ndarray, prior_sd: float | None = None) -> float:
    """The temperature that minimises the NLL of ``labels`` under softmax(logits / T); 1.0 when the optimum
    sits at a bound of the search (the data cannot tell). With ``prior_sd``, the most probable T under a
    normal prior on log T (mean 0, that sd) instead: few photos pull T less far from 1 than many do."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no held-out predictions to fit a temperature on")
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:  # the mean NLL, and the prior's share of one photo
        nll = float(-_log_softmax(logits / math.exp(log_t))[rows, labels].mean())
        return nll if prior_sd is None else nll + log_t**2 / (2 * prior_sd**2 * len(labels))

    found = minimize_scalar(loss, bounds=(-_LOG_T_BOUND, _LOG_T_BOUND), method="bounded")
    # A flat NLL stops the search short of the bound it falls towards: compare with the bounds themselves.
    if min(loss(-_LOG_T_BOUND), loss(_LOG_T_BOUND)) <= found.fun + 1e-9:
        return 1.0
    return float(math.exp(found.x))


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str | None]:
    """The run's temperature from its held-out (validation) logits, and why it stays 1 when it does.

    Chosen on the accuracy suite's held-out photos (benchmarks/calibration_rules.py; README, calibrated
    confidence): T is the most probable under a prior on log T (sd ``PRIOR_LOG_T_SD``), and only softens.
    A T below 1 came from validation splits with few, unconfident mistakes, and raised the NLL of photos
    it never saw; softening lowered it.
    """
    reason = why_not_calibrated(logits, labels)
    if reason:
        return 1.0, reason
    temperature = fit_temperature(logits, labels, PRIOR_LOG_T_SD)
    if temperature < 1.0:
        return 1.0, (
            f"the fitted T {temperature:.2f} would sharpen the probabilities, which raised the NLL of "
            "held-out photos where it was measured"
        )
    return temperature, None


def calibration_scores(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, float]:
    """NLL, multi-class Brier score, and expected calibration error (equal-width confidence bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    nll = float(-np.log(np.clip(probs[rows, labels], 1e-12, 1.0)).mean())
    onehot = np.zeros_like(probs)
    onehot[rows, labels] = 1.0
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean())
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return {"nll": nll, "brier": brier, "ece": float(ece)}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    probs = np.asarray(probs)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    found = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            found.append(
                {
                    "low": float(low),
                    "high": float(high),
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                    "count": int(inside.sum()),
                }
            )
    return found


def plot_reliability(before: list[dict], after: list[dict], temperature: float, path: Path) -> None:
    """Accuracy against confidence per bin, before and after scaling; the diagonal is perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_write

    figure, axis = plt.subplots(figsize=(4.8, 4.8), dpi=110)
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for bins, label, marker in ((before, "softmax", "o"), (after, f"T = {temperature:.2f}", "s")):
        axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=marker, label=label)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy")
    axis.set_title("reliability on the validation split")
    axis.legend(loc="upper left")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def scaled_logits(raw_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Raw logits divided by the temperature in float32: the numbers model_wrappers.TemperatureScaled gives."""
    return np.asarray(raw_logits, np.float32) / np.float32(temperature)


def calibrate_run(folder: RunFolder, raw_logits: np.ndarray, labels: np.ndarray, say) -> dict:
    """Fit the temperature on a run's held-out (uncalibrated) logits, store it in model.json, plot the
    reliability diagram; returns the fit with NLL/Brier/ECE before and after (T stays 1 where it cannot
    be pinned down, with the reason)."""
    temperature, reason = choose_temperature(raw_logits, labels)
    before, after = _softmax(raw_logits), _softmax(raw_logits / temperature)
    folder.write_meta(folder.read_meta() | {"temperature": temperature})
    plot_reliability(
        reliability_bins(before, labels),
        reliability_bins(after, labels),
        temperature,
        folder.reliability_plot,
    )
    fit = {
        "temperature": temperature,
        "fitted_on": "val",
        "not_fitted_because": reason,
        "before": calibration_scores(before, labels),
        "after": calibration_scores(after, labels),
    }
    if reason:
        say(f"calibration: temperature left at 1: {reason}")
    else:
        say(
            f"calibration: temperature {temperature:.3f} fitted on val: NLL {fit['before']['nll']:.4f} -> "
            f"{fit['after']['nll']:.4f}, ECE {fit['before']['ece']:.4f} -> {fit['after']['ece']:.4f}"
        )
    return fit


def _softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(logits))
