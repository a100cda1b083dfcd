"""`resfit ensemble`: several trained runs become one run folder that averages their probabilities.

The result is an ordinary run folder (model.json + model.safetensors + metrics), so evaluate, predict,
export and the service use it exactly like a single model. Member weights are equal, or chosen on the
validation split (never the test split) by minimising the ensemble's validation log-loss.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batched_inference import eval_loader, predict_logits
from .calibration import calibrate_run
from .data.dataset import ImageDataset
from .data.transforms import Preprocessing
from .errors import ConfigError, RunFolderError
from .evaluate import evaluate_split
from .hardware import apply_threads, resolve_runtime
from .metrics import format_metrics_table
from .model_wrappers import EnsembleModel, check_tta
from .rejection import DEFAULT_TARGET, choose_and_store_rule
from .run_folder import ENSEMBLE, RunFolder, build_model_meta, load_model, read_meta

WEIGHTINGS = ("equal", "val")
WEIGHT_STEP = 0.05  # grid step of the validation weight search (two members: 21 candidates)


@dataclass
class EnsembleResult:
    run_dir: Path
    weights: list[float]
    member_accuracy: list[float]
    metrics: dict
    seconds: float


def check_members(metas: list[dict], run_dirs: list[Path]) -> None:
    """Members must be able to share one input and one output: same classes, same preprocessing size."""
    if len(metas) < 2:
        raise ConfigError("an ensemble needs at least two run folders")
    first = metas[0]
    for run_dir, meta in zip(run_dirs[1:], metas[1:], strict=True):
        if meta["architecture"] == ENSEMBLE:
            raise ConfigError(f"{run_dir} is itself an ensemble: build from its member runs instead")
        if meta["class_names"] != first["class_names"]:
            only_a = sorted(set(first["class_names"]) - set(meta["class_names"]))
            only_b = sorted(set(meta["class_names"]) - set(first["class_names"]))
            detail = (
                f"only in {run_dirs[0]}: {only_a or '-'}; only in {run_dir}: {only_b or '-'}"
                if only_a or only_b
                else "same names in another order"
            )
            raise ConfigError(
                f"the runs' class lists differ, so their probabilities cannot be averaged ({detail})"
            )
        a, b = Preprocessing.from_dict(first["preprocessing"]), Preprocessing.from_dict(meta["preprocessing"])
        if (a.crop_size, a.resize_size, a.interpolation) != (b.crop_size, b.resize_size, b.interpolation):
            raise ConfigError(
                f"{run_dirs[0]} takes {a.crop_size} px crops of {a.resize_size} px images but {run_dir} takes "
                f"{b.crop_size} of {b.resize_size}: train the members at the same --img-size"
            )
    if metas[0]["architecture"] == ENSEMBLE:
        raise ConfigError(f"{run_dirs[0]} is itself an ensemble: build from its member runs instead")


def mixture_log_loss(member_probs: list[np.ndarray], labels: np.ndarray, weights) -> float:
    mixed = sum(w * p for w, p in zip(weights, member_probs, strict=True))
    return float(-np.log(np.clip(mixed[np.arange(len(labels)), labels], 1e-12, None)).mean())


def choose_weights(member_probs: list[np.ndarray], labels: np.ndarray) -> list[float]:
    """The grid point of the weight simplex with the lowest validation log-loss; ties go to the most equal."""
    count = len(member_probs)
    steps = round(1 / WEIGHT_STEP)
    best, best_key = None, None
    for parts in itertools.product(range(steps + 1), repeat=count - 1):
        if sum(parts) > steps:
            continue
        weights = [p / steps for p in parts] + [(steps - sum(parts)) / steps]
        loss = mixture_log_loss(member_probs, labels, weights)
        key = (round(loss, 9), float(np.abs(np.array(weights) - 1 / count).sum()))
        if best_key is None or key < best_key:
            best, best_key = weights, key
    return best


def _calibrate(out: RunFolder, source, runtime, reject_target: str, say) -> tuple[dict, dict]:
    model, meta = out.load_model(calibrated=False)
    model.to(runtime.device, memory_format=torch.channels_last)
    dataset = ImageDataset(source, "val", Preprocessing.from_dict(meta["preprocessing"]).eval_transform())
    raw, labels = predict_logits(model, eval_loader(dataset, 0), runtime)
    fit = calibrate_run(out, raw, labels, say)
    rule = choose_and_store_rule(out, raw / fit["temperature"], labels, reject_target, "msp", say)
    return fit, rule


def build_ensemble(
    run_dirs: list[str | Path],
    out: str | Path,
    data: str | None = None,
    weighting: str = "equal",
    say: Callable[[str], None] = print,
    tta: str = "none",
    device: str = "auto",
    precision: str = "auto",
    reject_target: str = DEFAULT_TARGET,
) -> EnsembleResult:
    """Write the ensemble of ``run_dirs`` to ``out`` and evaluate it on the validation (and test) split.

    The ensemble is calibrated as the model it is (one temperature on its averaged output, fitted on val)
    and gets an msp "unknown" rule: it has no single feature vector for the knn score."""
    started = time.perf_counter()
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    check_tta(tta)
    run_dirs = [Path(r) for r in run_dirs]
    out = Path(out)
    folder = RunFolder(out)
    if folder.meta_file.exists():
        raise RunFolderError(f"{out} already holds a model: choose another --out")
    metas = [read_meta(r) for r in run_dirs]
    check_members(metas, run_dirs)
    first = metas[0]
    training = first.get("training_config", {})
    data = data or first.get("data", {}).get("path")
    source, _ = RunFolder(run_dirs[0]).dataset(data, first)
    if source.class_names != first["class_names"]:
        raise ConfigError(
            f"the classes of {data} {source.class_names} differ from the runs' {first['class_names']}"
        )
    runtime = resolve_runtime(device, precision)
    apply_threads(runtime)
    preprocessing = Preprocessing.from_dict(first["preprocessing"])

    members, member_probs, member_accuracy = [], [], []
    for run_dir in run_dirs:
        model, _ = load_model(run_dir, tta="none", calibrated=False)  # its state dict is the ensemble's
        model.to(runtime.device, memory_format=torch.channels_last)
        metrics, probs = evaluate_split(model, source, "val", preprocessing, runtime)
        say(f"member {run_dir}: val accuracy {metrics['accuracy']:.4f}")
        members.append(model.to("cpu"))
        member_probs.append(probs)
        member_accuracy.append(float(metrics["accuracy"]))
    labels = np.asarray(source.splits["val"].labels)
    if weighting == "val":
        weights = choose_weights(member_probs, labels)
        say(f"weights chosen on the validation split (log-loss): {', '.join(f'{w:.2f}' for w in weights)}")
    else:
        weights = [1 / len(run_dirs)] * len(run_dirs)

    member_entries = [
        {
            "run_dir": str(run_dir.resolve()),
            "architecture": meta["architecture"],
            "num_classes": meta["num_classes"],
            "dropout": meta.get("dropout", 0.0),
            "preprocessing": meta["preprocessing"],
            "pretrained": meta.get("pretrained", {}),
            "weight": weight,
            "val_accuracy": accuracy,
        }
        for run_dir, meta, weight, accuracy in zip(run_dirs, metas, weights, member_accuracy, strict=True)
    ]
    ensemble = EnsembleModel(
        members,
        weights,
        (first["preprocessing"]["mean"], first["preprocessing"]["std"]),
        [(m["preprocessing"]["mean"], m["preprocessing"]["std"]) for m in metas],
    )
    meta = build_model_meta(
        ENSEMBLE,
        first["class_names"],
        preprocessing,
        0.0,
        members=member_entries,
        weighting=weighting,
        tta=tta,
        precision=runtime.precision,
        runtime=runtime.to_dict(),
        pretrained={
            "kind": "ensemble",
            "description": " + ".join(
                f"{m['architecture']}: {m.get('pretrained', {}).get('description', '?')}" for m in metas
            ),
        },
        data=first.get("data", {"path": str(data)}),
        training_config=training,
    )
    out.mkdir(parents=True, exist_ok=True)
    folder.write_model(ensemble, meta)
    calibration, rejection = _calibrate(folder, source, runtime, reject_target, say)
    # Score the saved folder exactly as `resfit evaluate` would.
    results = folder.evaluate_and_report(source, runtime, calibration, rejection)
    say(format_metrics_table(results["val"]))
    say(
        f"ensemble val accuracy {results['val']['accuracy']:.4f} vs members "
        f"{', '.join(f'{a:.4f}' for a in member_accuracy)}; saved to {out}"
    )
    return EnsembleResult(out, weights, member_accuracy, results["val"], time.perf_counter() - started)
