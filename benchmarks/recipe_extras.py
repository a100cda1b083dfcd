"""Each recipe extra with and without, side by side in one run, on real data from the same pretrained source.

    python benchmarks/recipe_extras.py --data ../shared/data/hymenoptera [--epochs 6] [--variants base,ema,...] [--seeds 0,1]
    python benchmarks/recipe_extras.py --data ../shared/data/flowers5 --imbalanced daisy:0.1 --variants base,sampler,loss

Every variant is resfit's default recipe plus one change, same seed and split; the head stage's features
come from the feature cache after the first variant, so all pay the same (small) head-stage cost.
``--imbalanced CLASS:FRACTION`` keeps only that fraction of one class's training images (symlinks in a
temporary folder; validation untouched) to measure class balancing where it matters.
Prints a markdown table and writes JSON beside this script under results/.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import resfit
from resfit.hardware import resolve_runtime

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VARIANTS = {
    "base": {},
    "multiscale": {"multi_scale": True},
    "ema": {"ema": True},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "lr-auto": {"lr": "auto"},
    "no-balance": {"balance": "none"},
    "sampler": {"balance": "sampler"},
    "loss": {"balance": "loss"},
    "no-decoded-cache": {"decoded_cache": "off"},
    "train-all-blocks": {"frozen_blocks": 0},
    "frozen-stem": {"frozen_blocks": 1},
}


def imbalanced_copy(data: Path, rare: str, fraction: float, root: Path) -> Path:
    """train/ with one class thinned to ``fraction`` (every k-th file by name), other splits as they are."""
    out = root / f"{data.name}-{rare}-{fraction:g}"
    for split in sorted(p for p in data.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())
            if split.name == "train" and class_dir.name == rare:
                step = max(1, round(1 / fraction))
                files = files[::step]
            target = out / split.name / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for file in files:
                (target / file.name).symlink_to(file.resolve())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "hymenoptera"))
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default=None, help="default ../shared/weights/<model>-imagenette.pth")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--variants", default="base,multiscale,ema,mixup,cutmix,lr-auto")
    parser.add_argument("--seeds", default="0", help="comma-separated: each variant runs once per seed")
    parser.add_argument("--imbalanced", help="CLASS:FRACTION of that class's training images to keep")
    args = parser.parse_args()
    weights = args.weights or str(SHARED / "weights" / f"{args.model}-imagenette.pth")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")

    runtime = resolve_runtime("auto", "auto")
    with tempfile.TemporaryDirectory(prefix="resfit-extras-") as tmp:
        data = Path(args.data)
        if args.imbalanced:
            rare, fraction = args.imbalanced.split(":")
            data = imbalanced_copy(data, rare, float(fraction), Path(tmp))
        rows = []
        for seed, name in ((int(seed), name) for seed in args.seeds.split(",") for name in names):
            config = resfit.TrainConfig(
                data=str(data),
                model=args.model,
                weights=weights,
                epochs=args.epochs,
                img_size=args.img_size,
                seed=seed,
                quiet=True,
                out=str(Path(tmp) / f"run-{name}-{seed}"),
                **VARIANTS[name],
            )
            started = time.perf_counter()
            result = resfit.train(config, say=lambda _: None)
            wall = time.perf_counter() - started
            metrics = result.metrics
            recalls = {c: v["recall"] for c, v in metrics["per_class"].items()}
            row = {
                "variant": name,
                "seed": seed,
                "settings": VARIANTS[name],
                "val_acc": metrics["accuracy"],
                "macro_f1": metrics["f1_macro"],
                "min_class_recall": min(recalls.values()),
                "best_epoch": result.best_epoch,
                "head_val_acc": result.history[0]["val_acc"],
                "lr": json.loads((Path(config.out) / "train_config.json").read_text())["lr"],
                "wall_s": wall,
                # Fine-tuning epochs only: the first variant also pays for cold scan/feature/decoded caches.
                "finetune_s": sum(r["seconds"] for r in result.history if r["stage"] == "finetune"),
            }
            rows.append(row)
            print(
                f"{name:<11} seed {seed}  val acc {row['val_acc']:.4f}  macro F1 {row['macro_f1']:.4f}  min recall "
                f"{row['min_class_recall']:.3f}  best epoch {row['best_epoch']}  lr {row['lr']:.2g}  {wall:.0f} s "
                f"(fine-tuning {row['finetune_s']:.0f} s)",
                flush=True,
            )
    header = (
        f"{data.name}, {args.model} from {Path(weights).name}, {args.epochs} fine-tuning epochs, "
        f"seeds {args.seeds}; {runtime.describe()}"
    )
    print(f"\n{header}\n")
    print(
        "| variant | seed | val acc | Δ vs first | macro F1 | min class recall | best epoch | lr | fine-tuning s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        # Each seed's rows are compared with that seed's first variant (base when it is listed first).
        base = next(r for r in rows if r["seed"] == row["seed"])
        print(
            f"| {row['variant']} | {row['seed']} | {row['val_acc']:.4f} | {row['val_acc'] - base['val_acc']:+.4f} | "
            f"{row['macro_f1']:.4f} | {row['min_class_recall']:.3f} | {row['best_epoch']} | {row['lr']:.2g} | "
            f"{row['finetune_s']:.0f} |"
        )
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = results / f"recipe_extras-{data.name}-{stamp}.json"
    out.write_text(
        json.dumps({"header": header, "machine": os.uname().nodename, "rows": rows}, indent=2) + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
