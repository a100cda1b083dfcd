"""Sharded data (issue #16, part 3): training images/s streamed from WebDataset shards against ImageFolder.

Side by side in one run, on the same subset of a real data set (symlinked into an ImageFolder tree, then
sharded with `resfit shard`): ResNet-50 fine-tuning through the public API (``resfit.train``, no head stage,
resfit's default workers), data loading included, the images/s of the last fine-tuning epoch from the
history, for
  imagefolder       the ImageFolder tree, --decoded-cache off (files decoded every epoch, as shards are)
  imagefolder-auto  the ImageFolder tree, resfit's default --decoded-cache auto
  shards            the shard folder (streamed; the decoded cache is not available)
alternating within each repeat; medians of the repeats. Also: the time to write the shards of the whole
data set (scan cache cold and warm) and their sizes.

    nice -n 5 python benchmarks/shards.py [--data ../shared/data/flowers5] [--train-images 192] [--repeats 3]
Writes benchmarks/results/shards-<stamp>.json (commit, machine, command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from provenance import record, stamp

from resfit.data.shard_writer import write_shards
from resfit.data.sources import discover
from resfit.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VARIANTS = {
    "imagefolder": ("tree", "off"),
    "imagefolder-auto": ("tree", "auto"),
    "shards": ("shards", "auto"),
}


def subset_tree(data: Path, train_images: int, val_images: int, folder: Path) -> Path:
    """Every k-th file of train and val, symlinked as an ImageFolder tree (classes stay mixed)."""
    source = discover(data)
    for split, count in (("train", train_images), ("val", val_images)):
        items, labels = source.splits[split].items, source.splits[split].labels
        step = max(1, len(items) // count)
        for i in list(range(0, len(items), step))[:count]:
            target = folder / split / source.class_names[labels[i]] / Path(items[i]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(items[i])
    return folder


def images_per_s(data: Path, args, decoded_cache: str, out: Path) -> float:
    config = TrainConfig(
        data=str(data),
        model="resnet50",
        weights=args.weights,
        epochs=args.epochs,
        img_size=args.img_size,
        batch_size=args.batch,
        head_stage=False,
        patience=args.epochs + 1,
        decoded_cache=decoded_cache,
        out=str(out),
        quiet=True,
    )
    result = train(config, say=lambda _message: None)
    return result.history[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "flowers5"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet50-imagenette.pth"))
    parser.add_argument("--train-images", type=int, default=192)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", type=float, default=64.0, help="MB, for the whole data set's shards")
    args = parser.parse_args()
    data = Path(args.data).resolve()

    with tempfile.TemporaryDirectory(prefix="resfit-shards-bench-") as scratch:
        scratch = Path(scratch)
        os.environ["RESFIT_CACHE"] = str(scratch / "cache")  # a cold scan cache, then a warm one
        writes = []
        for attempt in ("cold", "warm"):
            started = time.perf_counter()
            summary = write_shards(data, scratch / f"whole-{attempt}", shard_mb=args.shard_size)
            writes.append({"scan_cache": attempt, "seconds": time.perf_counter() - started})
        whole = {
            split: {
                "images": entry["samples"],
                "shards": len(entry["shards"]),
                "mb": sum(s["bytes"] for s in entry["shards"]) / 1e6,
                "mb_per_shard": [round(s["bytes"] / 1e6, 2) for s in entry["shards"]],
            }
            for split, entry in summary.index["splits"].items()
        }
        source_mb = (
            sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and p.suffix != ".sha256") / 1e6
        )

        tree = subset_tree(data, args.train_images, args.val_images, scratch / "tree")
        shards = scratch / "subset-shards"
        write_shards(tree, shards, shard_mb=args.shard_size)
        folders = {"tree": tree, "shards": shards}
        runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):
            for name, (folder, cache) in VARIANTS.items():
                out = scratch / f"run-{name}-{repeat}"
                runs[name].append(images_per_s(folders[folder], args, cache, out))
                print(f"repeat {repeat} {name}: {runs[name][-1]:.1f} img/s", file=sys.stderr, flush=True)

    medians = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "benchmark": "shards",
        "data": str(data),
        "config": vars(args),
        "write_whole_set": writes,
        "whole_set_shards": whole,
        "source_mb": source_mb,
        "train_images_per_s": runs,
        "median_images_per_s": medians,
        "shards_vs_imagefolder": medians["shards"] / medians["imagefolder"],
        "provenance": record(),
    }
    path = REPO / "benchmarks" / "results" / f"shards-{stamp()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['provenance']['cpu']}; load average {result['provenance']['load_average']}")
    print(
        f"ResNet-50 fine-tuning, {args.train_images} train images of {data.name}, {args.img_size} px, batch "
        f"{args.batch}, {args.repeats} repeats (medians)"
    )
    print("| data path | images/s (median) | runs |")
    print("|---|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {medians[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    for split, entry in whole.items():
        print(f"{split}: {entry['images']} images in {entry['shards']} shards, {entry['mb']:.1f} MB")
    print(
        f"source files {source_mb:.1f} MB; "
        + ", ".join(f"write ({w['scan_cache']} scan cache) {w['seconds']:.1f}s" for w in writes)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
