"""The accuracy suite: recipes compared on the same stratified k-fold splits of real photos, every photo scored.

    python benchmarks/accuracy_suite.py --budget quick            # about an hour on 2 shared cores
    python benchmarks/accuracy_suite.py --budget full             # more folds, seeds, all of flowers5
    python benchmarks/accuracy_suite.py --budget quick --datasets hymenoptera --folds 2 --epochs 1 --img-size 64

Protocol. Each data set's photos (ants/bees: train+val pooled, 398; flowers5: 4,317, or a stratified
subsample in the quick tier) are cut into k stratified folds per repeat; repeat r uses seed r for the folds
and for every recipe's training. For fold f the photos of the other folds are given to each recipe as its
training data and fold f is its test set, which no recipe sees before it is scored. The training data is
the same for every recipe: a CSV manifest (``path,label,split``) with train rows and test rows and no val
rows, so resfit holds out 20% of each class of the training rows for validation (its own seeded,
stratified rule), and the other recipes get exactly those inner train/val splits (resfit's own
``load_dataset`` on the same manifest). Validation picks the epoch each recipe keeps; test is scored once.

Statistics (per data set). Each recipe: mean test accuracy over the k x r fold runs with a 95% t interval,
and the pooled out-of-fold accuracy (every photo once per repeat). Each pair of recipes: the paired
difference on the same fold runs, with a 95% paired t interval over fold runs, plain and corrected for the
overlap of the training sets (Nadeau & Bengio 2003, corrected repeated k-fold t: variance x (1/J +
n_test/n_train)); the corrected one is the headline (the plain one is too narrow for k-fold), and a paired
bootstrap over photos (photos resampled, each carrying its scores from every repeat: the test-set noise
alone, models held fixed). Wall time of each recipe run is its whole cost (scan, caches cold, head stage,
training, evaluation), so accuracy per second is visible.

Recipes (``RECIPES``): a resfit variant is the default TrainConfig plus overrides, so a later session adds
one line (e.g. ``"resfit-160px": Recipe("resfit", {"img_size": 160})``). The timm baseline is a fine-tuning
loop built from timm's library (create_optimizer_v2 AdamW + layer decay, create_scheduler_v2 cosine with
warm-up, create_transform's training defaults without RandAugment, LabelSmoothingCrossEntropy) from the same
source weights, image size, epochs, batch size and precision as resfit. The sklearn probe is
LogisticRegressionCV on standardised pooled features of centre crops.

Results: benchmarks/results/accuracy_suite-<budget>-<model>-<stamp>.json, rewritten after every fold run
(so a stop loses at most the run in progress; ``--resume FILE`` continues it), and a markdown table printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
# Data sets: name -> the folders whose class sub-folders are pooled (each photo once).
DATASETS = {
    "hymenoptera": ("train", "val"),
    "flowers5": ("train", "val"),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
VAL_FRACTION = 0.2  # resfit's default hold-out of the training rows: the inner validation split
CONFIDENCE = 0.95
BOOTSTRAP_REPS = 2000


@dataclass(frozen=True)
class Budget:
    folds: int
    repeats: int
    epochs: int
    datasets: tuple[str, ...]
    flowers_per_class: int | None  # stratified subsample of flowers5 (None: all 4,317 photos)


BUDGETS = {
    # Sized for about an hour on a 2-core CPU shared with other jobs (measured there, 2026-12-01: one ants/bees
    # fold of all four recipes took 9.3 min, the timm loop 6 of them): 3 folds of ants/bees (133 test photos
    # each) and of a 400-photo stratified subsample of flowers5, 6 epochs (resfit's default).
    "quick": Budget(folds=3, repeats=1, epochs=6, datasets=("hymenoptera", "flowers5"), flowers_per_class=80),
    # Every photo of both sets, 5 folds x 3 seeds. Measured 2026-12-07 (quiet 2-core Zen 5, bf16): one fold
    # of all 4,317 flowers5 photos at 3 folds took 203 s (resfit), 26 s (its probe), 202 s (timm); at 5 folds
    # and 3 seeds (a fifth more training photos per fold) that is about 2-2.5 h for flowers5, 15 min for ants/bees.
    "full": Budget(
        folds=5, repeats=3, epochs=6, datasets=("hymenoptera", "flowers5"), flowers_per_class=None
    ),
}


@dataclass(frozen=True)
class Recipe:
    kind: str  # "resfit" | "timm" | "sklearn-probe"
    overrides: dict = field(default_factory=dict)  # resfit: TrainConfig fields changed from the default
    about: str = ""


RECIPES = {
    "resfit": Recipe("resfit", {}, "resfit's default recipe: probe head, then layer-wise fine-tuning"),
    # The default until the EMA validated beside the network became it (results/ema-better-hl72-fixed-rule.md).
    "resfit-no-ema": Recipe("resfit", {"ema": False}, "the default without the EMA: the network alone"),
    "resfit-probe": Recipe("resfit", {"epochs": 0}, "resfit's head stage alone (its probe)"),
    "timm": Recipe("timm", {}, "fine-tuning loop from timm's library (optim, scheduler, transforms, loss)"),
    "sklearn-probe": Recipe("sklearn-probe", {}, "scikit-learn LogisticRegressionCV on pooled features"),
    # Candidates for the default (issue #12), measured against "resfit" on the same folds.
    "resfit-160px": Recipe("resfit", {"img_size": 160}, "the default at 160 px instead of the card's 112"),
    "resfit-probe-160px": Recipe("resfit", {"img_size": 160, "epochs": 0}, "the head stage alone at 160 px"),
    "resfit-lr3e-4": Recipe("resfit", {"lr": 3e-4}, "the default with a 3x smaller fine-tuning lr"),
    "resfit-12ep": Recipe("resfit", {"epochs": 12}, "the default with twice the fine-tuning epochs"),
    "resfit-3ep": Recipe("resfit", {"epochs": 3}, "the default with half the fine-tuning epochs"),
    "resfit-wise": Recipe(
        "resfit", {"wise_ft": 0.5}, "WiSE-FT: the midpoint of the head stage and the last epoch"
    ),
    "resfit-160px-wise": Recipe(
        "resfit", {"img_size": 160, "wise_ft": 0.5}, "WiSE-FT's midpoint, trained and tested at 160 px"
    ),
    # Issue #17: the default leaves stem + layer1 untrained (no backward through them); these train more.
    "resfit-frozen1": Recipe(
        "resfit",
        {"frozen_blocks": 1},
        "the default with layer1 trained too (only the stem left as the source's)",
    ),
    "resfit-all-blocks": Recipe("resfit", {"frozen_blocks": 0}, "the default with every block trained"),
    "resfit-sgd": Recipe(
        "resfit",
        {"optimizer": "sgd", "weight_decay": 1e-4},
        "SGD + Nesterov momentum (lr 1e-2, weight decay 1e-4 as SGD takes it) instead of AdamW in fine-tuning",
    ),
    "resfit-ld0.25": Recipe(
        "resfit", {"layer_decay": 0.25}, "the default with the backbone's lr falling 4x (not 2x) per block"
    ),
    "resfit-frozen3": Recipe(
        "resfit",
        {"frozen_blocks": 3},
        "the default with layer2 left as the source's too (no backward through stem, layer1, layer2)",
    ),
    # Issue #12's dip below the probe: which part of fine-tuning causes it (screened with --epochs 1).
    "resfit-head-only": Recipe(
        "resfit",
        {"frozen_blocks": 5},
        "fine-tuning trains the head alone (every backbone block left as the source's), on augmented crops",
    ),
    "resfit-lr1e-4": Recipe("resfit", {"lr": 1e-4}, "the default with a 10x smaller fine-tuning lr"),
    "resfit-warmup3": Recipe(
        "resfit", {"warmup_epochs": 3.0}, "the default with 3 epochs of lr warm-up (not 1)"
    ),
    "resfit-ld0.1": Recipe(
        "resfit",
        {"layer_decay": 0.1},
        "LP-FT's split: the head keeps lr 1e-3, the backbone's falls 10x per block (layer4 1e-4, layer3 1e-5)",
    ),
    "resfit-crop0.8": Recipe(
        "resfit", {"min_crop_scale": 0.8}, "the default with milder crops (each keeps at least 80%, not 35%)"
    ),
    # The dip is the backbone's weights moving at peak lr: an EMA of the weights is what is validated and
    # kept, so each epoch's step noise is averaged out. patience 3 pinned: these rows were run when --ema still
    # stopped early by default (now it never does). The EMA recipes' rows run before 486535a had a half-life of
    # one epoch and an average that started from the network after its first step, not the head stage's.
    "resfit-ema": Recipe(
        "resfit",
        {"ema": True, "ema_keep": "average", "patience": 3},
        "the default, validating and keeping an EMA of the weights",
    ),
    "resfit-one-se": Recipe(
        "resfit",
        {"keep": "one-se"},
        "the default keeping the head stage unless a fine-tuned epoch beats it on val by more than one SE",
    ),
    # At full size the EMA's val loss can stay flat for 3 epochs while the network underneath climbs out
    # of its dip, so early stopping (patience 3) ended 2 of 9 full-size runs after epoch 4: this one never stops.
    "resfit-ema-no-stop": Recipe(
        "resfit",
        {"ema": True, "ema_keep": "average", "patience": 6},
        "the default validating and keeping an EMA of the weights, with no early stop in 6 epochs",
    ),
    # Issue #12's wall time: fine-tune on smaller crops, still validate and test at the card's 112 px
    # (FixRes: random resized crops make objects look larger in training than at test, so a smaller training
    # size matches them; 96 px is 0.73x and 80 px 0.51x the pixels of 112). Screened on all of flowers5: both
    # lost 1.0-1.2 points for 1.19-1.29x the speed (RESULTS.md section 7), so the default trains at 112.
    "resfit-train96": Recipe(
        "resfit",
        {"train_sizes": [96]},
        "the default fine-tuned on 96 px crops, validated and tested at 112 px",
    ),
    "resfit-train80": Recipe(
        "resfit",
        {"train_sizes": [80]},
        "the default fine-tuned on 80 px crops, validated and tested at 112 px",
    ),
    # The EMA took the dip away and lagged the network by 0.7 points at the end (all of flowers5): here each
    # epoch validates both, and the better on val stands for it, so neither the dip nor the lag is kept.
    # Since 2026-12-08 the default (with the half-life at least 72 steps).
    "resfit-ema-better": Recipe(
        "resfit",
        {"ema": True, "ema_keep": "better"},
        "the default validating an EMA of the weights and the network, the better on val standing for the epoch",
    ),
    # On the quick tier an epoch is 7 steps, so a one-epoch half-life follows the network into its dip (4.0
    # points on flowers5): a half-life of at least 72 steps, one epoch of all of flowers5 at batch 32, where
    # the dip went (0.5 ** (1 / 72) is then the same decay as resfit-ema-better's there).
    "resfit-ema-better-hl72": Recipe(
        "resfit",
        {"ema": True, "ema_keep": "better", "ema_decay": 0.5 ** (1 / 72)},
        "resfit-ema-better with the EMA's half-life at least 72 steps (not one epoch)",
    ),
    "resfit-lr1e-4-ema": Recipe(
        "resfit",
        {"lr": 1e-4, "ema": True, "ema_keep": "average", "patience": 3},
        "a 10x smaller lr, validating and keeping an EMA of the weights",
    ),
}
# Paired differences: every other recipe against REFERENCE, and EXTRA_PAIRS (the probe against the peers).
REFERENCE = "resfit"
EXTRA_PAIRS = [("resfit-probe", "sklearn-probe"), ("resfit-probe", "timm")]
# The timm baseline's settings, named. lr as resfit's head lr; layer decay per block (timm groups the 16
# bottleneck blocks of a ResNet-50 one by one): 0.8 ** 17 = 0.023 at the stem, about resfit's 0.5 ** 5.
TIMM_SETTINGS = {
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "layer_decay": 0.8,
    "sched": "cosine",
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "min_lr": 0.0,
    "smoothing": 0.1,
    "auto_augment": None,
}


# ----------------------------------------------------------------------------------------------------------
# Pure parts: photo lists, folds, statistics (tests/test_accuracy_suite.py)


def list_photos(root: Path, split_folders: Sequence[str]) -> list[tuple[str, str]]:
    """(absolute path, class name) of every image under root/<split>/<class>/, sorted by path."""
    photos = []
    for split in split_folders:
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    photos.append((str(path), class_dir.name))
    return sorted(photos)


def _by_class(labels: Sequence) -> dict:
    groups: dict = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return groups


def stratified_subsample(labels: Sequence, per_class: int, seed: int) -> list[int]:
    """Sorted indices of at most ``per_class`` items of each class, drawn at random (seeded)."""
    rng = random.Random(seed)
    keep = []
    groups = _by_class(labels)
    for label in sorted(groups):
        indices = groups[label]
        rng.shuffle(indices)
        keep.extend(indices[:per_class])
    return sorted(keep)


def stratified_folds(labels: Sequence, k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of every item: each class shuffled (seeded) and dealt out in turn.

    Every item lands in exactly one fold, each class's count differs by at most one between folds, and
    the dealing starts where the previous class stopped, so fold sizes differ by at most one too.
    """
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    rng = random.Random(seed)
    fold_of = [0] * len(labels)
    turn = 0
    groups = _by_class(labels)
    for label in sorted(groups):
        indices = groups[label]
        rng.shuffle(indices)
        for index in indices:
            fold_of[index] = turn % k
            turn += 1
    return fold_of


def t_interval(values: Sequence[float], correction: float = 0.0, confidence: float = CONFIDENCE) -> dict:
    """Mean and two-sided t interval of ``values``, variance scaled by (1/n + correction) instead of 1/n.

    correction = 0 is the ordinary (paired, when values are differences) t interval; correction =
    n_test / n_train is Nadeau & Bengio's correction for resampled train/test splits whose training sets
    overlap (for k-fold, 1/(k-1)). With one value the interval is undefined (None).
    """
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "df": None}
    variance = float(values.var(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt((1 / n + correction) * variance)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "df": n - 1}


def paired_bootstrap(
    differences: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0, confidence: float = CONFIDENCE
) -> dict:
    """Percentile interval of the mean of ``differences`` (photos x repeats), resampling photos (rows)."""
    differences = np.asarray(differences, dtype=float)
    if differences.ndim == 1:
        differences = differences[:, None]
    rng = np.random.default_rng(seed)
    n = len(differences)
    per_photo = differences.mean(axis=1)
    means = np.array([per_photo[rng.integers(0, n, n)].mean() for _ in range(reps)])
    tail = (1 - confidence) / 2 * 100
    return {
        "mean": float(per_photo.mean()),
        "low": float(np.percentile(means, tail)),
        "high": float(np.percentile(means, 100 - tail)),
        "n_photos": n,
        "reps": reps,
    }


def summarize(rows: list[dict]) -> dict:
    """Per data set: each recipe's accuracy and wall time, and the paired differences between recipes."""
    summary = {}
    for dataset in sorted({r["dataset"] for r in rows}, key=list(DATASETS).index):
        mine = [r for r in rows if r["dataset"] == dataset and "test_acc" in r]
        recipes = [name for name in RECIPES if any(r["recipe"] == name for r in mine)]
        recipes += sorted({r["recipe"] for r in mine} - set(recipes))
        by_recipe = {
            name: {(r["repeat"], r["fold"]): r for r in mine if r["recipe"] == name} for name in recipes
        }
        entry: dict = {"recipes": {}, "pairs": []}
        for name, runs in by_recipe.items():
            ordered = [runs[key] for key in sorted(runs)]
            correction = _overlap_correction(ordered)
            pooled = _pooled_accuracy(ordered)
            entry["recipes"][name] = {
                "fold_runs": len(ordered),
                "accuracy": t_interval([r["test_acc"] for r in ordered], correction),
                "accuracy_plain_t": t_interval([r["test_acc"] for r in ordered]),
                "pooled_accuracy": pooled,
                "wall_s_mean": float(np.mean([r["wall_s"] for r in ordered])),
                "wall_s_median": float(np.median([r["wall_s"] for r in ordered])),  # steadier when shared
                "wall_s_total": float(np.sum([r["wall_s"] for r in ordered])),
                "cpu_s_mean": float(np.mean([r.get("cpu_s", np.nan) for r in ordered])),
            }
            calibration = _test_calibration(ordered)
            if calibration:
                entry["recipes"][name]["test_calibration"] = calibration
            dip = _fine_tuning_dip(ordered)
            if dip:
                entry["recipes"][name]["fine_tuning_dip"] = dip
            time_split = _time_split(ordered)
            if time_split:
                entry["recipes"][name]["time_split"] = time_split
        pairs = [(REFERENCE, other) for other in recipes if other != REFERENCE] + EXTRA_PAIRS
        for a, b in pairs:
            if a not in by_recipe or b not in by_recipe:
                continue
            keys = sorted(set(by_recipe[a]) & set(by_recipe[b]))
            if not keys:
                continue
            runs_a = [by_recipe[a][k] for k in keys]
            runs_b = [by_recipe[b][k] for k in keys]
            diffs = [x["test_acc"] - y["test_acc"] for x, y in zip(runs_a, runs_b, strict=True)]
            pair = {
                "a": a,
                "b": b,
                "fold_runs": len(keys),
                "difference": t_interval(diffs, _overlap_correction(runs_a)),
                "difference_plain_t": t_interval(diffs),
                "bootstrap_photos": _photo_bootstrap(runs_a, runs_b),
                "wall_ratio": float(
                    np.sum([x["wall_s"] for x in runs_a]) / np.sum([y["wall_s"] for y in runs_b])
                ),
                "cpu_ratio": _ratio(runs_a, runs_b, "cpu_s"),
                # per fold run a's time over b's (they ran side by side): geometric mean and plain t interval
                "wall_ratio_paired": _paired_ratio(runs_a, runs_b, "wall_s"),
                "cpu_ratio_paired": _paired_ratio(runs_a, runs_b, "cpu_s"),
                "a_better_folds": int(sum(d > 0 for d in diffs)),
                "b_better_folds": int(sum(d < 0 for d in diffs)),
            }
            entry["pairs"].append(pair)
        summary[dataset] = entry
    return summary


def _time_split(runs: list[dict]) -> dict | None:
    """Where a run's wall time goes, as medians over its fold runs: the head stage, one fine-tuning epoch
    (training and its validation pass), how many epochs ran, and everything outside the epochs (scan, model
    build, saves and plots between epochs, the final evaluation, calibration). timm's epochs carry no stage."""
    head, epochs, counts, outside = [], [], [], []
    for run in runs:
        history = [row for row in run.get("history") or [] if row.get("seconds") is not None]
        if not history:
            continue
        tuned = [row["seconds"] for row in history if row.get("stage", "finetune") == "finetune"]
        head += [row["seconds"] for row in history if row.get("stage") == "head"]
        epochs += tuned
        counts.append(len(tuned))
        outside.append(run["wall_s"] - sum(row["seconds"] for row in history))
    if not outside:
        return None

    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    return {
        "head_s": median(head),
        "epoch_s": median(epochs),
        "epochs": median(counts),
        "outside_epochs_s": median(outside),
    }


def _fine_tuning_dip(runs: list[dict]) -> dict | None:
    """Issue #12's third target: how far the fine-tuning epochs' inner-val accuracy falls below the probe
    they started from (the last head-stage epoch), in points: the worst epoch and the first, per run; and
    per epoch, the mean over the runs that reached it. One run's worst epoch on 53-55 inner-val photos is
    mostly noise (benchmarks/dip_noise.py); the per-epoch mean is the data set's curve."""
    dips, first, by_epoch = [], [], []
    for run in runs:
        history = run.get("history") or []
        head = [row["val_acc"] for row in history if row.get("stage") == "head"]
        tuned = [row["val_acc"] for row in history if row.get("stage") == "finetune"]
        if head and tuned:
            below = [(head[-1] - acc) * 100 for acc in tuned]
            dips.append(max(below))
            first.append(below[0])
            for epoch, points in enumerate(below):
                if epoch == len(by_epoch):
                    by_epoch.append([])
                by_epoch[epoch].append(points)
    if not dips:
        return None
    curve = [{"epoch": e + 1, **t_interval(points)} for e, points in enumerate(by_epoch)]
    epoch_means = [epoch["mean"] for epoch in curve]
    worst = int(np.argmax(epoch_means))
    return {
        "fold_runs": len(dips),
        "worst_epoch_mean": float(np.mean(dips)),
        "worst_epoch_max": float(np.max(dips)),
        "first_epoch_mean": float(np.mean(first)),
        "runs_over_2_points": int(sum(d > 2 for d in dips)),
        "epoch_means": epoch_means,
        "mean_curve": curve,  # per epoch: mean points below the probe, t interval over the runs, runs
        "mean_curve_worst": {
            "epoch": worst + 1,
            "points": epoch_means[worst],
            "fold_runs": len(by_epoch[worst]),
        },
    }


def _test_calibration(runs: list[dict]) -> dict | None:
    """The fitted temperature's effect on each fold's test photos: NLL and ECE before/after, and in how many
    fold runs each went down or up (a T of exactly 1 changes nothing, and is counted as such)."""
    if not runs or not all("test_calibration" in r for r in runs):
        return None
    found = {
        "fold_runs": len(runs),
        "temperature_kept": sum(r["test_calibration"]["temperature"] != 1.0 for r in runs),
    }
    for score in ("nll", "ece"):
        before = np.array([r["test_calibration"]["before"][score] for r in runs])
        after = np.array([r["test_calibration"]["after"][score] for r in runs])
        found[score] = {
            "before_mean": float(before.mean()),
            "after_mean": float(after.mean()),
            "lower": int((after < before - 1e-9).sum()),
            "higher": int((after > before + 1e-9).sum()),
        }
    return found


def _ratio(runs_a: list[dict], runs_b: list[dict], key: str) -> float | None:
    if not all(key in r for r in runs_a + runs_b):
        return None
    return float(np.sum([r[key] for r in runs_a]) / np.sum([r[key] for r in runs_b]))


def _paired_ratio(runs_a: list[dict], runs_b: list[dict], key: str) -> dict | None:
    """a's ``key`` over b's, fold run by fold run: exp of the t interval of the log ratios (None without
    the key). Times are not estimates from overlapping training sets, so no Nadeau-Bengio correction."""
    if not all(key in r for r in runs_a + runs_b):
        return None
    logs = [math.log(x[key] / y[key]) for x, y in zip(runs_a, runs_b, strict=True)]
    interval = t_interval(logs)
    return {
        name: (None if interval[name] is None else math.exp(interval[name]))
        for name in ("mean", "low", "high")
    } | {"n": interval["n"]}


def _fmt_ratio(pair: dict, key: str) -> str:
    total, paired = pair.get(key), pair.get(f"{key}_paired")
    if total is None:
        return ""
    if not paired or paired["low"] is None:
        return f"{total:.2f}"
    return f"{total:.2f} (paired {paired['mean']:.2f} [{paired['low']:.2f}, {paired['high']:.2f}])"


def _overlap_correction(runs: list[dict]) -> float:
    """n_test / n_train of the fold runs (Nadeau & Bengio), 0 for a single run."""
    if len(runs) < 2:
        return 0.0
    return float(np.mean([r["n_test"] / r["n_outer_train"] for r in runs]))


def _pooled_accuracy(runs: list[dict]) -> float:
    return float(sum(r["test_correct"] for r in runs) / sum(r["n_test"] for r in runs))


def _photo_bootstrap(runs_a: list[dict], runs_b: list[dict]) -> dict | None:
    """Paired bootstrap over photos, each photo carrying its score differences from every repeat."""
    scores: dict[str, dict[int, float]] = {}
    for x, y in zip(runs_a, runs_b, strict=True):
        if "correct" not in x or "correct" not in y:
            return None
        right_a = dict(zip(x["test_items"], x["correct"], strict=True))
        right_b = dict(zip(y["test_items"], y["correct"], strict=True))
        for item in sorted(right_a.keys() & right_b.keys()):  # sorted: set order varies by process
            scores.setdefault(item, {})[x["repeat"]] = int(right_a[item]) - int(right_b[item])
    if not scores:
        return None
    repeats = sorted({r for s in scores.values() for r in s})
    complete = [[s[r] for r in repeats] for s in scores.values() if len(s) == len(repeats)]
    return paired_bootstrap(np.array(complete, dtype=float))


def _fmt_interval(stat: dict, scale: float = 100, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if stat["low"] is None:
        return f"{stat['mean'] * scale:{sign}.1f}"
    return f"{stat['mean'] * scale:{sign}.1f} [{stat['low'] * scale:{sign}.1f}, {stat['high'] * scale:{sign}.1f}]"


def _fmt_seconds(value: float | None, spec: str = ".1f") -> str:
    """A median of the time split, or '-' where the recipe has no such part (timm has no head stage)."""
    return "-" if value is None else format(value, spec)


def markdown_tables(summary: dict) -> str:
    """Accuracy (%) with 95% intervals, wall times, and the paired differences, one block per data set."""
    lines = []
    for dataset, entry in summary.items():
        lines += [
            f"**{dataset}**",
            "",
            "| recipe | fold runs | test acc % (95% CI, corrected t) | plain t CI | pooled out-of-fold % "
            "| wall s per run (median) | CPU s per run | acc % per wall min |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, stats in entry["recipes"].items():
            plain = stats["accuracy_plain_t"]
            plain_text = (
                "" if plain["low"] is None else f"[{plain['low'] * 100:.1f}, {plain['high'] * 100:.1f}]"
            )
            per_min = stats["accuracy"]["mean"] * 100 / (stats["wall_s_mean"] / 60)
            lines.append(
                f"| {name} | {stats['fold_runs']} | {_fmt_interval(stats['accuracy'])} | {plain_text} | "
                f"{stats['pooled_accuracy'] * 100:.1f} | {stats['wall_s_mean']:.0f} ({stats['wall_s_median']:.0f}) | {stats['cpu_s_mean']:.0f} | {per_min:.1f} |"
            )
        split = {n: st["time_split"] for n, st in entry["recipes"].items() if "time_split" in st}
        if split:
            lines += [
                "",
                "| where the wall time goes (median s) | head stage | one fine-tuning epoch | epochs run "
                "| outside the epochs |",
                "|---|---|---|---|---|",
            ]

            for name, times in split.items():
                lines.append(
                    f"| {name} | {_fmt_seconds(times['head_s'])} | {_fmt_seconds(times['epoch_s'])} "
                    f"| {_fmt_seconds(times['epochs'], 'g')} | {_fmt_seconds(times['outside_epochs_s'])} |"
                )
        dipped = {n: st["fine_tuning_dip"] for n, st in entry["recipes"].items() if "fine_tuning_dip" in st}
        if dipped:
            lines += [
                "",
                "| fine-tuning below its probe (inner val, points) | fold runs | worst epoch: mean, max "
                "| first epoch: mean | runs more than 2 points below "
                "| mean over runs per epoch (t interval): worst (epoch); last epoch |",
                "|---|---|---|---|---|---|",
            ]
            for name, dip in dipped.items():
                curve = dip.get("mean_curve")  # absent in summaries written before it was added
                curve_text = "-"
                if curve:
                    worst = curve[dip["mean_curve_worst"]["epoch"] - 1]
                    last = curve[-1]
                    curve_text = (
                        f"{_fmt_interval(worst, scale=1)} (epoch {worst['epoch']}); "
                        f"last {_fmt_interval(last, scale=1)}"
                    )
                lines.append(
                    f"| {name} | {dip['fold_runs']} | {dip['worst_epoch_mean']:.1f}, {dip['worst_epoch_max']:.1f} "
                    f"| {dip['first_epoch_mean']:.1f} | {dip['runs_over_2_points']} | {curve_text} |"
                )
        calibrated = {
            n: st["test_calibration"] for n, st in entry["recipes"].items() if "test_calibration" in st
        }
        if calibrated:
            lines += [
                "",
                "| calibration on test folds | T kept (runs) | NLL before -> after | runs lower / higher "
                "| ECE before -> after | runs lower / higher |",
                "|---|---|---|---|---|---|",
            ]
            for name, cal in calibrated.items():
                nll, ece = cal["nll"], cal["ece"]
                lines.append(
                    f"| {name} | {cal['temperature_kept']} of {cal['fold_runs']} "
                    f"| {nll['before_mean']:.4f} -> {nll['after_mean']:.4f} | {nll['lower']} / {nll['higher']} "
                    f"| {ece['before_mean']:.4f} -> {ece['after_mean']:.4f} | {ece['lower']} / {ece['higher']} |"
                )
        lines += [
            "",
            "| paired difference (a - b) | fold runs | points (95% CI, corrected t) | plain paired t CI "
            "| bootstrap over photos | folds a>b / a<b | wall a / b | CPU a / b |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pair in entry["pairs"]:
            plain = pair["difference_plain_t"]
            plain_text = (
                "" if plain["low"] is None else f"[{plain['low'] * 100:+.1f}, {plain['high'] * 100:+.1f}]"
            )
            boot = pair["bootstrap_photos"]
            boot_text = "" if boot is None else f"[{boot['low'] * 100:+.1f}, {boot['high'] * 100:+.1f}]"
            lines.append(
                f"| {pair['a']} - {pair['b']} | {pair['fold_runs']} | {_fmt_interval(pair['difference'], signed=True)} "
                f"| {plain_text} | {boot_text} | {pair['a_better_folds']} / {pair['b_better_folds']} "
                f"| {_fmt_ratio(pair, 'wall_ratio')} | {_fmt_ratio(pair, 'cpu_ratio')} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# One fold run of each kind of recipe


@dataclass
class Fold:
    """One fold run's data: the manifest every recipe trains from, and its scanned inner splits."""

    dataset: str
    repeat: int
    fold: int
    seed: int
    manifest: Path
    source: object  # resfit.data.sources.DatasetSource: splits train / val (inner) / test (the fold)
    n_outer_train: int
    workdir: Path


@dataclass(frozen=True)
class Settings:
    model: str  # one architecture, or two joined by "+" (resfit's fused network; resfit recipes only)
    weights: str  # a state-dict file, or one per backbone joined by "," for a fused model
    epochs: int
    img_size: int
    img_size_overridden: bool
    mean: tuple
    std: tuple


def write_manifest(path: Path, photos: list[tuple[str, str]], test: set[int]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for index, (photo, label) in enumerate(photos):
            writer.writerow([photo, label, "test" if index in test else "train"])


class Stopwatch:
    """Wall time and this process's CPU time (all threads): on a shared machine CPU time is the steadier cost."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _relative(item: str) -> str:
    return os.path.relpath(item, SHARED / "data")


def run_resfit(fold: Fold, settings: Settings, overrides: dict, name: str) -> dict:
    import torch

    import resfit
    from resfit.calibration import calibration_scores
    from resfit.data.transforms import Preprocessing
    from resfit.evaluate import evaluate_split
    from resfit.hardware import resolve_runtime
    from resfit.run_folder import OPTIONAL_HISTORY_COLUMNS, load_model

    run_dir = fold.workdir / f"run-{name}"
    options = {"epochs": settings.epochs, **overrides}
    if settings.img_size_overridden and "img_size" not in overrides:
        options["img_size"] = settings.img_size
    config = resfit.TrainConfig(
        data=str(fold.manifest),
        model=settings.model,
        weights=str(settings.weights),
        seed=fold.seed,
        out=str(run_dir),
        quiet=True,
        **options,
    )
    # Cold caches for every run (scan, features, decoded images): the wall time a user's first run has.
    previous = os.environ.get("RESFIT_CACHE")
    os.environ["RESFIT_CACHE"] = str(fold.workdir / f"cache-{name}")
    try:
        clock = Stopwatch()
        result = resfit.train(config, say=lambda _: None)
        wall, cpu = clock.read()
    finally:
        if previous is None:
            os.environ.pop("RESFIT_CACHE", None)
        else:
            os.environ["RESFIT_CACHE"] = previous
    test_metrics = json.loads((run_dir / "metrics_test.json").read_text())
    # Per-photo scores for the bootstrap: the kept model evaluated on test again, as resfit evaluates it.
    model, meta = load_model(run_dir)
    runtime = resolve_runtime("auto", "auto")
    model.to(memory_format=torch.channels_last)
    _, probs = evaluate_split(
        model, fold.source, "test", Preprocessing.from_dict(meta["preprocessing"]), runtime
    )
    labels = np.asarray(fold.source.splits["test"].labels)
    correct = (probs.argmax(axis=1) == labels).astype(int)
    # Calibration on photos the run never saw (issue #14): the same model without its temperature.
    raw_model, _ = load_model(run_dir, calibrated=False)
    raw_model.to(memory_format=torch.channels_last)
    _, raw_probs = evaluate_split(
        raw_model, fold.source, "test", Preprocessing.from_dict(meta["preprocessing"]), runtime
    )
    test_calibration = {
        "temperature": float(meta.get("temperature", 1.0)),
        "before": calibration_scores(raw_probs, labels),
        "after": calibration_scores(probs, labels),
    }
    # The uncalibrated log-probabilities of the inner val (what the temperature is fitted on) and of test,
    # so that calibration rules can be compared on held-out photos without training again
    # (benchmarks/calibration_rules.py).
    _, raw_val_probs = evaluate_split(
        raw_model, fold.source, "val", Preprocessing.from_dict(meta["preprocessing"]), runtime
    )
    held_out_logprobs = {
        split: {
            "labels": np.asarray(fold.source.splits[split].labels).tolist(),
            "logprobs": np.round(np.log(np.clip(split_probs, 1e-12, 1.0)), 5).tolist(),
        }
        for split, split_probs in (("val", raw_val_probs), ("test", raw_probs))
    }
    if abs(correct.mean() - test_metrics["accuracy"]) > 1e-4 or len(correct) != test_metrics["num_images"]:
        raise RuntimeError(
            f"{run_dir}: re-evaluated test accuracy {correct.mean()} != metrics_test.json {test_metrics['accuracy']}"
        )
    resolved = json.loads((run_dir / "train_config.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        # where the wall time went: the head stage, the fine-tuning epochs (with validation), the rest
        # (scan with cold caches, model build, final evaluation of val and test, reports and plots)
        "stage_s": {
            "head": sum(r["seconds"] for r in result.history if r["stage"] == "head"),
            "finetune": sum(r["seconds"] for r in result.history if r["stage"] == "finetune"),
            "other": wall - sum(r["seconds"] for r in result.history),
        },
        "test_acc": float(correct.mean()),  # metrics_test.json holds it rounded to 5 places
        "test_f1_macro": float(test_metrics["f1_macro"]),
        "best_epoch": result.best_epoch,
        "val_acc": float(result.metrics["accuracy"]),
        "history": [
            {k: row.get(k) for k in ("epoch", "stage", "val_acc", "val_loss", "train_acc", "seconds")}
            | {k: row[k] for k in OPTIONAL_HISTORY_COLUMNS if k in row}
            for row in result.history
        ],
        "resolved": {
            **{k: resolved.get(k) for k in ("img_size", "batch_size", "lr", "epochs", "balance")},
            "precision": meta.get("precision", runtime.precision),
        },
        "correct": correct.tolist(),
        "test_calibration": test_calibration,
        "held_out_logprobs": held_out_logprobs,
    }


class _SplitImages:
    """A split of a resfit DatasetSource as (tensor, label) pairs through a given transform."""

    def __init__(self, source, split: str, transform):
        self.source, self.transform = source, transform
        self.items = source.splits[split].items
        self.labels = source.splits[split].labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, _ = self.source.read(self.items[index])
        return self.transform(image), self.labels[index]


def _autocast(precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _predict(model, loader, precision: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    model.eval()
    predicted, labels = [], []
    with torch.inference_mode(), _autocast(precision):
        for images, targets in loader:
            logits = model(images.to(memory_format=torch.channels_last))
            predicted.append(logits.float().argmax(1).numpy())
            labels.append(targets.numpy())
    return np.concatenate(predicted), np.concatenate(labels)


def run_timm(fold: Fold, settings: Settings, batch_size: int) -> dict:
    """Fine-tuning as timm's train.py does it, from timm's library; same inner splits, source and budget.

    timm imports torchvision, which fails on the CPU torch unless resfit.torchvision_import came first: run_suite
    imports resfit before any recipe runs.
    """
    import timm
    import torch
    from timm.data import create_transform
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torch.utils.data import DataLoader

    import resfit.torchvision_import  # noqa: F401 - torchvision must be imported through resfit first (CPU torch)
    from resfit.hardware import apply_threads, resolve_runtime

    clock = Stopwatch()
    runtime = resolve_runtime("auto", "auto")
    apply_threads(runtime)
    torch.manual_seed(fold.seed)
    random.seed(fold.seed)
    np.random.seed(fold.seed)
    s = TIMM_SETTINGS
    num_classes = len(fold.source.class_names)
    model = timm.create_model(settings.model, pretrained=False)
    state = torch.load(settings.weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
    )
    if set(missing) != {"fc.weight", "fc.bias"} or unexpected:
        raise RuntimeError(f"timm {settings.model} does not take {settings.weights}: {missing} {unexpected}")
    model.reset_classifier(num_classes)
    model = model.to(memory_format=torch.channels_last)
    train_tf = create_transform(
        settings.img_size,
        is_training=True,
        auto_augment=s["auto_augment"],
        mean=settings.mean,
        std=settings.std,
    )
    eval_tf = create_transform(settings.img_size, is_training=False, mean=settings.mean, std=settings.std)
    generator = torch.Generator().manual_seed(fold.seed)
    train_loader = DataLoader(
        _SplitImages(fold.source, "train", train_tf),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=0,
    )

    def eval_loader(split: str) -> DataLoader:
        return DataLoader(_SplitImages(fold.source, split, eval_tf), batch_size=batch_size * 2, num_workers=0)

    optimizer = create_optimizer_v2(
        model, opt=s["opt"], lr=s["lr"], weight_decay=s["weight_decay"], layer_decay=s["layer_decay"]
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=s["sched"],
        num_epochs=settings.epochs,
        warmup_epochs=s["warmup_epochs"],
        warmup_lr=s["warmup_lr"],
        min_lr=s["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    criterion = LabelSmoothingCrossEntropy(smoothing=s["smoothing"])
    best_acc, best_state, best_epoch, history, updates = -1.0, None, 0, [], 0
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for images, targets in train_loader:
            with _autocast(runtime.precision):
                loss = criterion(model(images.to(memory_format=torch.channels_last)), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch)
        predicted, labels = _predict(model, eval_loader("val"), runtime.precision)
        val_acc = float((predicted == labels).mean())
        history.append({"epoch": epoch, "val_acc": val_acc, "seconds": time.perf_counter() - t0})
        if val_acc > best_acc:  # timm's CheckpointSaver keeps model_best by the eval metric
            best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
    final_pred, test_labels = _predict(model, eval_loader("test"), runtime.precision)
    model.load_state_dict(best_state)
    best_pred, _ = _predict(model, eval_loader("test"), runtime.precision)
    wall, cpu = clock.read()
    correct = (best_pred == test_labels).astype(int)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "test_acc": float(correct.mean()),
        "test_acc_final_epoch": float((final_pred == test_labels).mean()),
        "best_epoch": best_epoch,
        "val_acc": best_acc,
        "history": history,
        "resolved": {
            "img_size": settings.img_size,
            "batch_size": batch_size,
            "precision": runtime.precision,
            **s,
        },
        "correct": correct.tolist(),
    }


def run_sklearn_probe(fold: Fold, settings: Settings, batch_size: int) -> dict:
    """Standardised pooled features of centre crops, LogisticRegressionCV (C by 3-fold CV on inner train)."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torch.utils.data import DataLoader

    from resfit.data.transforms import Preprocessing
    from resfit.hardware import apply_threads, resolve_runtime
    from resfit.torchvision_import import models

    clock = Stopwatch()
    runtime = resolve_runtime("auto", "auto")
    apply_threads(runtime)
    backbone = getattr(models, settings.model)()
    state = torch.load(settings.weights, map_location="cpu", weights_only=True)
    backbone.fc = torch.nn.Linear(backbone.fc.in_features, state["fc.weight"].shape[0])
    backbone.load_state_dict(state)
    backbone.fc = torch.nn.Identity()
    backbone = backbone.eval().to(memory_format=torch.channels_last)
    transform = Preprocessing.for_size(settings.img_size, settings.mean, settings.std).eval_transform()

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        loader = DataLoader(_SplitImages(fold.source, split, transform), batch_size=batch_size * 2)
        rows, labels = [], []
        with torch.inference_mode(), _autocast(runtime.precision):
            for images, targets in loader:
                rows.append(backbone(images.to(memory_format=torch.channels_last)).float().numpy())
                labels.append(targets.numpy())
        return np.concatenate(rows), np.concatenate(labels)

    x_train, y_train = features("train")
    x_test, y_test = features("test")
    probe = make_pipeline(
        StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 1, 11), cv=3, max_iter=3000, n_jobs=1)
    )
    with warnings.catch_warnings():  # scikit-learn 1.9 announces changes of LogisticRegressionCV defaults
        warnings.simplefilter("ignore", FutureWarning)
        probe.fit(x_train, y_train)
    correct = (probe.predict(x_test) == y_test).astype(int)
    return {
        **dict(zip(("wall_s", "cpu_s"), clock.read(), strict=True)),
        "test_acc": float(correct.mean()),
        "chosen_C": float(probe[-1].C_[0]),
        "resolved": {"img_size": settings.img_size, "precision": runtime.precision, "fit_on": "inner train"},
        "correct": correct.tolist(),
    }


# ----------------------------------------------------------------------------------------------------------
# The suite


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_description(note: str) -> dict:
    import torch

    from resfit.hardware import resolve_runtime

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = None
    return {
        "host": platform.node(),
        "cpu": resolve_runtime("auto", "auto").describe(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(memory_gib, 1) if memory_gib else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm_version,
        "load_average_at_start": list(os.getloadavg()),
        "note": note,
    }


def provenance() -> dict:
    own = ["benchmarks/accuracy_suite.py", "tests/test_accuracy_suite.py"]
    return {
        "commit": _git("rev-parse", "HEAD"),
        "own_files_dirty": bool(_git("status", "--porcelain", "--", *own)),
        # Others edit src/ in the same tree: what resfit code was under test, beyond the commit.
        "src_uncommitted": _git("status", "--porcelain", "--", "src").splitlines(),
    }


def atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def card_settings(weights: Path) -> tuple[int, tuple, tuple]:
    """Resolution and normalisation from the weights' JSON card, as resfit reads them."""
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    recipe = card.get("recipe", {})
    norm = recipe.get("normalisation", {})
    return (
        int(recipe.get("train_size_px", 224)),
        tuple(norm.get("mean", (0.485, 0.456, 0.406))),
        tuple(norm.get("std", (0.229, 0.224, 0.225))),
    )


def dataset_photos(name: str, flowers_per_class: int | None) -> list[tuple[str, str]]:
    photos = list_photos(SHARED / "data" / name, DATASETS[name])
    if name == "flowers5" and flowers_per_class:
        keep = stratified_subsample([label for _, label in photos], flowers_per_class, seed=0)
        photos = [photos[i] for i in keep]
    return photos


def run_suite(args: argparse.Namespace) -> None:
    budget = BUDGETS[args.budget]
    folds = args.folds or budget.folds
    repeats = args.repeats or budget.repeats
    epochs = args.epochs if args.epochs is not None else budget.epochs
    datasets = args.datasets.split(",") if args.datasets else list(budget.datasets)
    per_class = args.flowers_per_class if args.flowers_per_class is not None else budget.flowers_per_class
    recipes = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = [r for r in recipes if r not in RECIPES] + [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(
            f"unknown recipes or data sets {unknown}: recipes {list(RECIPES)}, data {list(DATASETS)}"
        )
    import resfit  # noqa: F401 - imports torchvision cleanly (resfit.torchvision_import) before timm does
    from resfit.data.scan import load_dataset
    from resfit.hardware import resolve_runtime
    from resfit.models import fused_members
    from resfit.train.resolve import default_batch_size

    members = fused_members(args.model)
    baselines = [r for r in recipes if RECIPES[r].kind != "resfit"]
    if len(members) > 1 and baselines:
        raise SystemExit(f"{baselines} take one backbone: a fused {args.model} runs resfit recipes only")
    sources = (
        args.weights.split(",")
        if args.weights
        else [str(SHARED / "weights" / f"{member}-imagenette.pth") for member in members]
    )
    weights = ",".join(sources)
    card_size, mean, std = card_settings(Path(sources[0]))  # the fused network needs one normalisation
    settings = Settings(
        args.model, weights, epochs, args.img_size or card_size, bool(args.img_size), mean, std
    )

    batch_size = default_batch_size(resolve_runtime("auto", "auto"), settings.img_size)
    if args.resume:
        out = Path(args.resume)
        payload = json.loads(out.read_text())
        payload.setdefault("resumed", []).append({"at": _now(), "command": _command(), **provenance()})
    else:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = (
            Path(args.out)
            if args.out
            else RESULTS / f"accuracy_suite-{args.budget}-{args.model}-{stamp}.json"
        )
        payload = {
            "suite": "benchmarks/accuracy_suite.py",
            "command": _command(),
            "argv": sys.argv[1:],
            "started": _now(),
            **provenance(),
            "machine": machine_description(args.machine_note),
            "budget": args.budget,
            "settings": {
                "model": args.model,
                "weights": ",".join(
                    str(Path(w).relative_to(SHARED)) if Path(w).is_relative_to(SHARED) else w for w in sources
                ),
                "epochs": epochs,
                "img_size": settings.img_size,
                "batch_size": batch_size,
                "folds": folds,
                "fold_limit": args.fold_limit,
                "repeats": repeats,
                "first_repeat": args.first_repeat,
                "datasets": datasets,
                "flowers_per_class": per_class,
                "recipes": {name: vars(RECIPES[name]) for name in recipes},
                "train_defaults": train_defaults(),
                "timm": TIMM_SETTINGS,
                "inner_val_fraction": VAL_FRACTION,
                "intervals": "95%; 'accuracy'/'difference' = t over fold runs with Nadeau-Bengio correction "
                "(variance x (1/J + n_test/n_train)); '*_plain_t' = ordinary (paired) t; 'bootstrap_photos' = "
                f"paired percentile bootstrap over photos, {BOOTSTRAP_REPS} resamples",
            },
            "status": "running",
            "rows": [],
        }
    if args.reuse_rows and not args.resume:
        payload["rows"], commit = reused_rows(Path(args.reuse_rows), payload["settings"], args.reuse_recipes)
        payload["reused_rows_from"] = {
            "file": args.reuse_rows,
            "recipes": args.reuse_recipes.split(","),
            "rows": len(payload["rows"]),
            "commit": commit,
        }
        print(f"reusing {len(payload['rows'])} fold runs of {args.reuse_recipes} from {args.reuse_rows}")
    payload.setdefault("warm_up_s", []).append(warm_up(settings, batch_size))
    done = {(r["dataset"], r["repeat"], r["fold"], r["recipe"]) for r in payload["rows"] if "test_acc" in r}
    print(f"writing {out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="resfit-accuracy-") as tmp:
        for repeat in range(args.first_repeat, args.first_repeat + repeats):
            for dataset in datasets:
                photos = dataset_photos(dataset, per_class)
                labels = [label for _, label in photos]
                fold_of = stratified_folds(labels, folds, seed=repeat)
                for fold_index in range(min(folds, args.fold_limit or folds)):
                    todo = [name for name in recipes if (dataset, repeat, fold_index, name) not in done]
                    if not todo:
                        continue
                    workdir = Path(tmp) / f"{dataset}-r{repeat}-f{fold_index}"
                    workdir.mkdir()
                    test = {i for i, f in enumerate(fold_of) if f == fold_index}
                    manifest = workdir / "manifest.csv"
                    write_manifest(manifest, photos, test)
                    source, _ = load_dataset(
                        manifest, val_fraction=VAL_FRACTION, seed=repeat, cache_dir=Path(tmp) / "scan-cache"
                    )
                    fold = Fold(
                        dataset,
                        repeat,
                        fold_index,
                        repeat,
                        manifest,
                        source,
                        len(photos) - len(test),
                        workdir,
                    )
                    for name in todo:
                        row = run_one(fold, name, settings, batch_size, len(photos))
                        payload["rows"].append(row)
                        payload["summary"] = summarize(payload["rows"])
                        atomic_write_json(out, payload)
                        print(
                            f"{dataset} repeat {repeat} fold {fold_index} {name:<14} test acc {row['test_acc']:.4f} "
                            f"({row['test_correct']}/{row['n_test']})  {row['wall_s']:.0f} s  load {row['load_before']:.1f}",
                            flush=True,
                        )
                    shutil.rmtree(workdir, ignore_errors=True)
    payload["status"] = "finished"
    payload["finished"] = _now()
    payload["machine"]["load_average_at_end"] = list(os.getloadavg())
    payload["summary"] = summarize(payload["rows"])
    payload["table"] = markdown_tables(payload["summary"])
    atomic_write_json(out, payload)
    print("\n" + payload["table"])
    print(f"wrote {out}")


# Settings that decide a fold run's result: rows of another suite file are reused only where all agree.
SETTINGS_THAT_DECIDE = (
    "model",
    "weights",
    "epochs",
    "img_size",
    "batch_size",
    "folds",
    "datasets",
    "flowers_per_class",
    # What "resfit" (the default) and every recipe's unchanged fields meant: files run before a default
    # changed (or before this key was recorded, e.g. before the EMA became the default) are not reused.
    "train_defaults",
)


def train_defaults() -> dict:
    """resfit's TrainConfig defaults as this code has them (the data path aside)."""
    import resfit

    defaults = resfit.TrainConfig(data="").to_dict()
    defaults.pop("data")
    return defaults


def read_suite(path: Path) -> dict:
    """An accuracy-suite result file, or one line saying why it is not one (missing, truncated, other)."""
    try:
        suite = json.loads(path.read_text())
        if not isinstance(suite["rows"], list) or not all(isinstance(row, dict) for row in suite["rows"]):
            raise TypeError("rows must be a list of objects")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path} is not a readable suite result file: {error!r}") from None
    return suite


def differing_settings(settings: dict, other: dict) -> list[str]:
    """The deciding settings (SETTINGS_THAT_DECIDE) in which two suites differ: their fold runs are not alike."""
    return [key for key in SETTINGS_THAT_DECIDE if settings.get(key) != other.get(key)]


def reused_rows(path: Path, settings: dict, recipes: str) -> tuple[list[dict], str | None]:
    """Finished fold runs of ``recipes`` from an earlier suite file with the same deciding settings, and
    the commit that file was run at.

    For adding one recipe to recipes already run: on one machine the suite is deterministic (the same fold
    run gives the same val losses to the last digit across commits that leave training alone; check it on a
    short run first), so the earlier runs are the ones this suite would make, at half the time. Their own
    commit and machine stay in the file (``reused_rows_from``); their wall times are not side by side.
    """
    earlier = read_suite(path)
    earlier_settings, earlier_rows = earlier.get("settings"), earlier["rows"]
    if not isinstance(earlier_settings, dict):
        raise SystemExit(f"{path} is not a readable suite result file: it has no settings")
    differ = differing_settings(earlier_settings, settings)
    if differ:
        raise SystemExit(
            f"{path} was run with other settings ({', '.join(differ)}): its rows cannot be reused"
        )
    wanted = set(recipes.split(","))
    missing = wanted - set(settings["recipes"])
    if missing:
        raise SystemExit(f"--reuse-recipes {sorted(missing)} are not among this suite's --recipes")
    first, last = settings["first_repeat"], settings["first_repeat"] + settings["repeats"]
    rows = [
        {**row, "reused_from": str(path)}
        for row in earlier_rows
        if row.get("recipe") in wanted and "test_acc" in row and first <= row.get("repeat", -1) < last
    ]
    if not rows:
        raise SystemExit(f"{path} has no finished fold runs of {recipes} for these repeats")
    return rows, earlier.get("commit")


def pooled_rows(paths: list[Path], count_as: dict[str, str] | None = None) -> list[dict]:
    """The fold runs of several suite files of the same deciding settings, as one suite (e.g. seeds run on
    different days); a fold run two files both hold is refused, so no run is counted twice.

    ``count_as`` {old: new} counts recipe old's fold runs as new's: for runs that are the same computation
    (an option that never took effect in them, e.g. an early stop that never came), so they are not run
    again. Which runs qualify is the caller's claim, said in the printed tables' header.
    """
    count_as = count_as or {}
    suites = [read_suite(path) for path in paths]
    first = suites[0].get("settings") or {}
    rows, seen = [], {}
    for path, suite in zip(paths, suites, strict=True):
        settings = suite.get("settings") or {}
        differ = differing_settings(settings, first)
        if differ:
            raise SystemExit(f"{path} was run with other settings than {paths[0]} ({', '.join(differ)})")
        for row in suite["rows"]:
            if row.get("recipe") in count_as:
                row = {**row, "recipe": count_as[row["recipe"]]}
            key = (row.get("dataset"), row.get("recipe"), row.get("repeat"), row.get("fold"))
            if key in seen:
                raise SystemExit(f"{path} and {seen[key]} both hold the fold run {key}: pool each once")
            seen[key] = path
            rows.append(row)
    return rows


def warm_up(settings: Settings, batch_size: int) -> float:
    """Pay the process's one-time costs (kernel creation at this size and precision) before any timed run."""
    import torch

    from resfit.hardware import apply_threads, resolve_runtime
    from resfit.models import build_model

    started = time.perf_counter()
    runtime = resolve_runtime("auto", "auto")
    apply_threads(runtime)
    model = build_model(settings.model, num_classes=2).to(memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, settings.img_size, settings.img_size).to(
        memory_format=torch.channels_last
    )
    targets = torch.zeros(batch_size, dtype=torch.long)
    for _ in range(2):
        with _autocast(runtime.precision):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
    with torch.inference_mode(), _autocast(runtime.precision):
        model.eval()(images)
    return time.perf_counter() - started


def run_one(fold: Fold, name: str, settings: Settings, batch_size: int, n_photos: int) -> dict:
    recipe = RECIPES[name]
    load_before = os.getloadavg()[0]
    runners: dict[str, Callable[[], dict]] = {
        "resfit": lambda: run_resfit(fold, settings, recipe.overrides, name),
        "timm": lambda: run_timm(fold, settings, batch_size),
        "sklearn-probe": lambda: run_sklearn_probe(fold, settings, batch_size),
    }
    result = runners[recipe.kind]()
    splits = fold.source.splits
    return {
        "dataset": fold.dataset,
        "repeat": fold.repeat,
        "fold": fold.fold,
        "seed": fold.seed,
        "recipe": name,
        "n_photos": n_photos,
        "n_outer_train": fold.n_outer_train,
        "n_inner_train": len(splits["train"].items),
        "n_inner_val": len(splits["val"].items),
        "n_test": len(splits["test"].items),
        "test_correct": int(sum(result["correct"])),
        "test_items": [_relative(item) for item in splits["test"].items],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "finished": _now(),
        **result,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick")
    parser.add_argument("--datasets", help=f"comma-separated, default the budget's ({', '.join(DATASETS)})")
    parser.add_argument("--recipes", help=f"comma-separated, default all ({', '.join(RECIPES)})")
    parser.add_argument("--folds", type=int, help="k of the stratified k-fold (default: the budget's)")
    parser.add_argument(
        "--repeats", type=int, help="repeats of the k folds, seeds first..first+r-1 (default: the budget's)"
    )
    parser.add_argument(
        "--first-repeat",
        type=int,
        default=0,
        help="seed of the first repeat (e.g. fresh seeds to confirm what earlier repeats chose)",
    )
    parser.add_argument(
        "--epochs", type=int, help="fine-tuning epochs for resfit and timm (default: the budget's)"
    )
    parser.add_argument(
        "--fold-limit", type=int, help="run only the first N folds (timing a tier, smoke runs)"
    )
    parser.add_argument("--img-size", type=int, help="default: the weights' card (112 px for ../shared)")
    parser.add_argument("--flowers-per-class", type=int, help="flowers5 subsample per class (0: all photos)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", help="default ../shared/weights/<model>-imagenette.pth")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/accuracy_suite-...json)")
    parser.add_argument("--resume", help="continue an interrupted suite from its JSON (same settings)")
    parser.add_argument(
        "--reuse-rows",
        metavar="JSON",
        help="start from the finished fold runs of --reuse-recipes in an earlier suite file of the same settings",
    )
    parser.add_argument(
        "--reuse-recipes",
        default="resfit",
        help="recipes whose fold runs --reuse-rows takes (default resfit)",
    )
    parser.add_argument(
        "--machine-note", default="", help="recorded with the machine, e.g. 'machine was shared'"
    )
    parser.add_argument(
        "--summarize",
        metavar="JSON",
        nargs="+",
        help="print the tables of a suite's result JSON again, or of several of the same settings pooled "
        "(e.g. other seeds; runs nothing)",
    )
    parser.add_argument(
        "--count-as",
        metavar="OLD=NEW",
        action="append",
        default=[],
        help="with --summarize: count recipe OLD's fold runs as NEW's (runs that are the same computation)",
    )
    args = parser.parse_args()
    if args.summarize:
        pairs = [pair.partition("=") for pair in args.count_as]
        if not all(old and sep and new for old, sep, new in pairs):
            raise SystemExit(f"--count-as takes OLD=NEW, got {args.count_as}")
        count_as = {old: new for old, _, new in pairs}
        for old, new in count_as.items():
            print(f"# fold runs of {old} counted as {new}'s (the same computation in those runs)")
        rows = pooled_rows([Path(path) for path in args.summarize], count_as)
        print(markdown_tables(summarize(rows)))
        return
    if args.resume:  # the interrupted suite's own arguments, so its settings cannot drift
        resume = args.resume
        args = parser.parse_args(json.loads(Path(resume).read_text())["argv"])
        args.resume = resume
    run_suite(args)


if __name__ == "__main__":
    main()
