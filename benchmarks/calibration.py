"""Does temperature scaling help on data it was not fitted on? Cross-fitted on the validation split.

    python benchmarks/calibration.py [--datasets hymenoptera,flowers5] [--model resnet50] [--epochs 0]

Trains resfit (default recipe, `--epochs` fine-tuning epochs; 0 = the head stage alone) on each shared
dataset, takes the kept model's raw validation logits, splits the validation photos into two stratified
halves, fits T on one half and scores the other (and the reverse), so every photo is scored by a
temperature that never saw it. Reports NLL, Brier and ECE before and after, pooled over both halves, and
the accuracy (which must not change). Writes JSON (commit, machine, command) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))

import resfit  # noqa: E402
from resfit.batched_inference import eval_loader, predict_logits, softmax  # noqa: E402
from resfit.calibration import calibration_scores, fit_temperature  # noqa: E402
from resfit.data.dataset import ImageDataset  # noqa: E402
from resfit.data.scan import load_dataset  # noqa: E402
from resfit.data.transforms import Preprocessing  # noqa: E402
from resfit.hardware import detect_cpu, resolve_runtime  # noqa: E402
from resfit.run_folder import load_model  # noqa: E402


def halves(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """0/1 per photo: every class split evenly between two halves, seeded."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=int)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        half[members[: len(members) // 2]] = 1
    return half


def cross_fitted(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Scores of softmax(logits) and of softmax(logits / T) where T is fitted on the other half."""
    half = halves(labels)
    scaled = np.empty_like(logits, dtype=np.float64)
    temperatures = []
    for part in (0, 1):
        fitted = fit_temperature(logits[half != part], labels[half != part])
        temperatures.append(fitted)
        scaled[half == part] = logits[half == part] / fitted
    before, after = softmax(logits), softmax(scaled)
    return {
        "temperatures": temperatures,
        "before": calibration_scores(before, labels)
        | {"accuracy": float((before.argmax(1) == labels).mean())},
        "after": calibration_scores(after, labels) | {"accuracy": float((after.argmax(1) == labels).mean())},
        "photos": int(len(labels)),
    }


def measure(dataset: str, args, work: Path) -> dict:
    data = SHARED / "data" / dataset
    run = work / dataset
    config = resfit.TrainConfig(
        data=str(data),
        model=args.model,
        weights=str(SHARED / "weights" / f"{args.model}-imagenette.pth"),
        epochs=args.epochs,
        out=str(run),
        quiet=True,
    )
    resfit.train(config, say=lambda line: print(f"  {line}", flush=True) if "calibration" in line else None)
    meta = json.loads((run / "model.json").read_text())
    model, meta = load_model(run)
    runtime = resolve_runtime()
    source, _ = load_dataset(data)
    dataset_split = ImageDataset(
        source, "val", Preprocessing.from_dict(meta["preprocessing"]).eval_transform()
    )
    logits, labels = predict_logits(model, eval_loader(dataset_split, 0), runtime)
    raw = logits * float(meta.get("temperature", 1.0))  # the model divides by its fitted T: undo it
    return {"dataset": dataset, "training_temperature": meta.get("temperature"), **cross_fitted(raw, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="hymenoptera,flowers5")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: the head stage alone)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="resfit-calibration-") as work:
        for dataset in args.datasets.split(","):
            rows.append(measure(dataset.strip(), args, Path(work)))
    print(
        f"\n{'dataset':<12} {'photos':>6} {'T (2 halves)':>14} {'NLL':>16} {'Brier':>16} {'ECE':>16} {'acc':>13}"
    )
    for row in rows:
        b, a = row["before"], row["after"]
        temps = "/".join(f"{t:.2f}" for t in row["temperatures"])
        print(
            f"{row['dataset']:<12} {row['photos']:>6} {temps:>14} {b['nll']:>7.4f} -> {a['nll']:.4f} "
            f"{b['brier']:>7.4f} -> {a['brier']:.4f} {b['ece']:>7.4f} -> {a['ece']:.4f} "
            f"{b['accuracy']:.3f} -> {a['accuracy']:.3f}"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "benchmarks" / "results" / f"calibration-{args.model}-e{args.epochs}-{stamp}.json"
    record = {
        "command": " ".join(["python", *sys.argv]),
        "commit": commit,
        "src_dirty": bool(dirty.stdout.strip()),
        "cpu": detect_cpu().describe(),
        "method": "T fitted on one stratified half of val, scored on the other, both ways, pooled",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
