"""Side by side, in one run: the tutorial loop (../shared/anchors/tutorial_loop.py), resfit's defaults, and a
plain linear probe, all from the same pretrained source on the same data. Prints a table and writes JSON.

    python benchmarks/anchor_vs_resfit.py [--sets hymenoptera,flowers5] [--model resnet50]

Wall times include data loading and process start. "to anchor best" is the wall time at which resfit's
validation accuracy first reached the anchor's best (from the run's history.csv, plus process start-up).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# The anchor's documented settings per data set (issue #3): epochs and resolution.
ANCHOR_SETTINGS = {"hymenoptera": {"epochs": 10, "size": 160}, "flowers5": {"epochs": 2, "size": 96}}


def run_anchor(data: Path, model: str, weights: Path, epochs: int, size: int) -> dict:
    cmd = [
        sys.executable,
        str(SHARED / "anchors" / "tutorial_loop.py"),
        str(data),
        "--arch",
        model,
        "--weights",
        str(weights),
        "--epochs",
        str(epochs),
        "--size",
        str(size),
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    final = lines[-1]
    return {
        "wall_s": wall,
        "best_val_acc": final["best_val_acc"],
        "final_val_acc": final["final_val_acc"],
        "train_img_s": final["train_img_s"],
        "per_epoch": [row["val_acc"] for row in lines[:-1]],
    }


def run_resfit(data: Path, model: str, weights: Path, workdir: Path, extra: list[str]) -> dict:
    run_dir = workdir / f"resfit-{data.name}-{model}"
    cmd = [
        sys.executable,
        "-m",
        "resfit",
        "train",
        str(data),
        "--model",
        model,
        "--weights",
        str(weights),
        "--out",
        str(run_dir),
        "--quiet",
        *extra,
    ]
    # A cold start, as a new user has it: empty scan and feature caches.
    env = dict(os.environ, RESFIT_CACHE=str(workdir / f"cache-{data.name}-{model}"))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    wall = time.perf_counter() - t0
    device_line = next((line for line in out.splitlines() if line.startswith("device:")), "")
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "train_config.json").read_text())
    # The history's clock starts once resfit is imported: add the interpreter and import time.
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import resfit.cli, resfit.train"], check=True)
    startup = time.perf_counter() - started
    return {
        "wall_s": wall,
        "final_val_acc": metrics["accuracy"],
        "f1_macro": metrics["f1_macro"],
        "history": [(int(r["epoch"]), r["stage"], float(r["val_acc"]), float(r["elapsed"])) for r in history],
        "startup_s": startup,
        "device": device_line,
        "img_size": config["img_size"],
        "batch_size": config["batch_size"],
        "epochs": config["epochs"],
    }


def time_to_reach(resfit: dict, target: float) -> float | None:
    for _epoch, _stage, acc, elapsed in resfit["history"]:
        if acc >= target:
            return elapsed + resfit["startup_s"]
    return None


def plain_probe(data: Path, model: str, weights: Path, size: int) -> dict:
    """Logistic regression (C by 3-fold CV) on standardised pooled features of centre crops: the bar to keep."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from resfit.torchvision_import import models, torchvision  # noqa: F401 - the clean import
    from resfit.torchvision_import import transforms as T

    t0 = time.perf_counter()
    net = getattr(models, model)()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    net.fc = torch.nn.Identity()
    net.eval()
    tf = T.Compose(
        [
            T.Resize(round(size / 0.875)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    def features(split: str):
        ds = torchvision.datasets.ImageFolder(str(data / split), tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=64)
        xs, ys = [], []
        with torch.inference_mode():
            for x, y in loader:
                xs.append(net(x).float())
                ys.append(y)
        return torch.cat(xs).numpy(), torch.cat(ys).numpy()

    xtr, ytr = features("train")
    xva, yva = features("val")
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(Cs=np.logspace(-3, 1, 9), cv=3, max_iter=1000, scoring="accuracy"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9's notices about future defaults
        clf.fit(xtr, ytr)
    return {
        "val_acc": float((clf.predict(xva) == yva).mean()),
        "size": size,
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="hymenoptera,flowers5")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--resfit-args", default="", help="extra flags for resfit train, e.g. '--epochs 4'")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    weights = SHARED / "weights" / f"{args.model}-imagenette.pth"
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.sets.split(","):
            data = SHARED / "data" / name
            settings = ANCHOR_SETTINGS[name]
            print(f"== {name}: anchor ({settings['epochs']} epochs @ {settings['size']} px)", flush=True)
            anchor = run_anchor(data, args.model, weights, settings["epochs"], settings["size"])
            print(
                f"   anchor best {anchor['best_val_acc']:.4f} final {anchor['final_val_acc']:.4f} in {anchor['wall_s']:.0f}s",
                flush=True,
            )
            print(f"== {name}: resfit train (defaults)", flush=True)
            resfit = run_resfit(data, args.model, weights, Path(workdir), args.resfit_args.split())
            print(
                f"   resfit final {resfit['final_val_acc']:.4f} in {resfit['wall_s']:.0f}s; {resfit['device']}",
                flush=True,
            )
            probe = plain_probe(data, args.model, weights, resfit["img_size"])
            print(f"   plain probe @ {probe['size']} px: {probe['val_acc']:.4f}", flush=True)
            reach = time_to_reach(resfit, anchor["best_val_acc"])
            results.append(
                {
                    "set": name,
                    "anchor": anchor,
                    "resfit": resfit,
                    "probe": probe,
                    "resfit_time_to_anchor_best_s": reach,
                }
            )
    print()
    header = (
        "set",
        "anchor best",
        "anchor final",
        "anchor wall s",
        "resfit final",
        "resfit wall s",
        "to anchor best s",
        "time ratio",
        "probe",
    )
    print(" | ".join(header))
    for r in results:
        reach = r["resfit_time_to_anchor_best_s"]
        print(
            " | ".join(
                [
                    r["set"],
                    f"{r['anchor']['best_val_acc']:.3f}",
                    f"{r['anchor']['final_val_acc']:.3f}",
                    f"{r['anchor']['wall_s']:.0f}",
                    f"{r['resfit']['final_val_acc']:.3f}",
                    f"{r['resfit']['wall_s']:.0f}",
                    f"{reach:.0f}" if reach is not None else "never",
                    f"{reach / r['anchor']['wall_s']:.2f}" if reach is not None else "-",
                    f"{r['probe']['val_acc']:.3f} @{r['probe']['size']}",
                ]
            )
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    (out / f"anchor_vs_resfit-{args.model}-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
