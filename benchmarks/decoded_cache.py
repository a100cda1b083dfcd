"""Decoded-image cache (issue #6): does skipping JPEG decode each epoch speed up training at 96-128 px?

Side by side in one run, on each data set and size, with the cache off and on:
(a) the DataLoader alone (resfit's train transform, batch as in training), steady images/s with 0 and
    1 workers, plus the one-time cost of building the cache and its size;
(b) resfit's fine-tuning through the public API, ``resfit.train(TrainConfig(..., head_stage=False,
    decoded_cache="off"/"on"))``, data loading included: the images/s of the last fine-tuning epoch from
    the returned history, with resfit's default workers, and with the cache on and off and no worker
    (does in-process loading beat a worker that takes a core from the model?).
Each run trains on a fixed subset of the training split (a CSV manifest of absolute paths) so a run
takes seconds, not the whole of flowers5's 3,457 images. The variants alternate within each repeat; the
cache is built in the first "on" run's set-up, outside the timed epochs ((a) shows what it costs).
The defaults make 72 training runs: about 40 minutes on a 2-core machine.

    python benchmarks/decoded_cache.py [--sets hymenoptera,flowers5] [--sizes 96,112,128] [--repeats 3]
    python benchmarks/decoded_cache.py --quick     # a smoke run, under a minute: not a measurement
Prints medians of the repeats, the CPU line and the ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resfit.data.dataset import ImageDataset
from resfit.data.decoded_cache import open_decoded
from resfit.data.scan import load_dataset
from resfit.data.sources import discover
from resfit.data.transforms import Preprocessing
from resfit.hardware import apply_threads, default_num_workers, resolve_runtime
from resfit.models import IMAGENET_MEAN, IMAGENET_STD
from resfit.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def subset_manifest(data: Path, train_images: int, val_images: int, folder: Path) -> Path:
    """A CSV manifest of every k-th file of train and val (classes stay mixed), absolute paths."""
    source = discover(data)
    manifest = folder / f"{data.name}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for split, count in (("train", train_images), ("val", val_images)):
            items, labels = source.splits[split].items, source.splits[split].labels
            step = max(1, len(items) // count)
            for i in range(0, len(items), step)[:count]:
                writer.writerow([items[i], source.class_names[labels[i]], split])
    return manifest


def loader_images_per_s(dataset, batch: int, workers: int) -> float:
    """Steady images/s of iterating the DataLoader alone: the clock starts at the first batch (worker start-up
    is excluded here; the training figures in (b) include it, as every epoch pays it)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)
    iterator = iter(loader)
    next(iterator)
    seen, started = 0, time.perf_counter()
    for _, labels in iterator:
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def loading_rates(manifest: Path, size: int, batch: int, cache_dir: Path) -> dict:
    source, _ = load_dataset(manifest)
    prep = Preprocessing.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    started = time.perf_counter()
    build_dir = Path(tempfile.mkdtemp(dir=cache_dir))  # a fresh folder: the build is timed, never reused
    cache, message = open_decoded(source, "train", prep.resize_size, root=build_dir)
    build_s = time.perf_counter() - started
    if cache is None:
        raise SystemExit(f"decoded cache not built: {message}")
    transform = prep.train_transform("standard")
    datasets = {
        "decode": ImageDataset(source, "train", transform),
        "cache": ImageDataset(source, "train", transform, decoded=cache),
    }
    rates = {}
    for workers in (0, 1):
        for name, dataset in datasets.items():
            dataset.set_epoch(0, 1)
            rates[f"{name} {workers}w"] = loader_images_per_s(dataset, batch, workers)
    return rates | {"build s": build_s, "MiB": cache.nbytes / 2**20}


def training_rate(
    manifest: Path,
    size: int,
    batch: int,
    epochs: int,
    weights: Path,
    mode: str,
    workers: int | None,
    out: Path,
) -> float:
    config = TrainConfig(
        data=str(manifest),
        model="resnet50",
        weights=str(weights),
        epochs=epochs,
        img_size=size,
        batch_size=batch,
        head_stage=False,
        patience=epochs + 1,
        decoded_cache=mode,
        num_workers=workers,
        out=str(out),
        quiet=True,
    )
    result = train(config, say=lambda _line: None)
    finetune = [row for row in result.history if row["stage"] == "finetune"]
    return finetune[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="hymenoptera,flowers5", help="folders under ../shared/data")
    parser.add_argument("--sizes", default="96,112,128")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet50-imagenette.pth"))
    parser.add_argument("--batch", type=int, default=32, help="resfit's default on CPU at these sizes")
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch's img/s is reported")
    parser.add_argument("--train-images", type=int, default=480)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: one set at 96 px, tiny subsets")
    args = parser.parse_args()
    if args.quick:
        args.sets, args.sizes, args.epochs, args.repeats = args.sets.split(",")[0], "96", 1, 1
        args.train_images, args.val_images, args.batch = 32, 16, 16
    sizes = [int(s) for s in args.sizes.split(",")]
    sets = args.sets.split(",")
    weights = Path(args.weights)

    runtime = resolve_runtime("cpu", "auto")
    apply_threads(runtime)
    workdir = Path(tempfile.mkdtemp(prefix="resfit-decoded-bench-"))
    os.environ["RESFIT_CACHE"] = str(workdir / "cache")  # cold scan and decoded caches for this run only
    print(f"device: {runtime.describe()}")
    print(
        f"torch {torch.__version__}; dtype {runtime.precision}; {torch.get_num_threads()} threads; "
        f"batch {args.batch}; ResNet-50 from {Path(args.weights).name}; {args.repeats} repeats, medians"
        + ("; QUICK SMOKE RUN, not a measurement" if args.quick else "")
    )
    print(
        f"training subsets: {args.train_images} train / {args.val_images} val images per set; "
        f"{args.epochs} epoch(s), the last one's img/s; default workers = {default_num_workers(runtime)}"
    )
    manifests = {
        name: subset_manifest(SHARED / "data" / name, args.train_images, args.val_images, workdir)
        for name in sets
    }

    print("\n(a) DataLoader alone, images/s (train transform; 'w' = workers), and the one-time cache build")
    columns = ["decode 0w", "cache 0w", "decode 1w", "cache 1w", "build s", "MiB"]
    print(f"{'data':<12} {'size':>4} | " + " | ".join(f"{c:>9}" for c in columns))
    for name in sets:
        for size in sizes:
            repeats = [loading_rates(manifests[name], size, args.batch, workdir) for _ in range(args.repeats)]
            medians = [statistics.median(r[c] for r in repeats) for c in columns]
            cells = [
                f"{v:>9.1f}" if c != "build s" else f"{v:>9.2f}"
                for c, v in zip(columns, medians, strict=True)
            ]
            print(f"{name:<12} {size:>4} | " + " | ".join(cells), flush=True)

    # Variants of (b): the cache off and on with resfit's default workers, and both with none (in-process
    # loading may be cheap enough that a worker only takes a core from the model).
    variants = {"off": ("off", None), "on": ("on", None), "on, 0w": ("on", 0), "off, 0w": ("off", 0)}
    print("\n(b) fine-tuning images/s, data loading included (resfit.train, head stage off)")
    print(
        f"{'data':<12} {'size':>4} | {'cache off':>9} | {'cache on':>9} | ratio | {'on, 0 workers':>13} | ratio"
        f" | {'off, 0 workers':>14} | ratio"
    )
    run = 0
    for name in sets:
        for size in sizes:
            rates: dict[str, list[float]] = {variant: [] for variant in variants}
            for _ in range(args.repeats):
                for variant, (mode, workers) in variants.items():
                    run += 1
                    out = workdir / f"run{run}"
                    rates[variant].append(
                        training_rate(
                            manifests[name], size, args.batch, args.epochs, weights, mode, workers, out
                        )
                    )
            off, on, on_0w, off_0w = (statistics.median(rates[v]) for v in variants)
            print(
                f"{name:<12} {size:>4} | {off:>9.1f} | {on:>9.1f} | {on / off:.2f}x | {on_0w:>13.1f} | "
                f"{on_0w / off:.2f}x | {off_0w:>14.1f} | {off_0w / off:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
