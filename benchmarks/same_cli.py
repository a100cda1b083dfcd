"""Does a CLI refactor change what a command line means? Parse the same command lines with two source trees.

    python benchmarks/same_cli.py --src /path/to/old/checkout/src --out old.json
    python benchmarks/same_cli.py --src src --out new.json
    python benchmarks/same_cli.py --compare old.json new.json

Each command line below is parsed by ``resfit.cli.build_parser()`` of the given tree (nothing runs); the
parsed values are recorded per line. ``--compare`` lists every value that differs and exits 1 if any does
(a flag added with its default shows as "only in second").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from same_metrics import differences

ARGVS = [
    ["train", "D"],
    [
        "train",
        "D",
        "--epochs",
        "3",
        "--img-size",
        "160",
        "--lr",
        "auto",
        "--optimizer",
        "sgd",
        "--augment",
        "--bn",
        "train",
        "--no-head-stage",
        "--no-feature-cache",
        "--multi-scale",
        "--train-sizes",
        "96,128",
        "--ema-keep",
        "average",
        "--ema-decay",
        "0.99",
        "--mixup",
        "0.2",
        "--cutmix",
        "1",
        "--balance",
        "loss",
        "--tta",
        "flip",
        "--reject-target",
        "none",
        "--reject-score",
        "energy",
        "--workers",
        "2",
        "--quiet",
        "--log",
        "tensorboard,mlflow",
        "--mlflow-uri",
        "sqlite:///x",
        "--exclude-from",
        "a.json",
        "--seed",
        "3",
        "--val-fraction",
        "0.3",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--frozen-blocks",
        "0",
        "--wise-ft",
        "0.5",
        "--dropout",
        "0.1",
        "--layer-decay",
        "0.7",
        "--weight-decay",
        "0",
        "--warmup-epochs",
        "2",
        "--label-smoothing",
        "0",
        "--patience",
        "2",
        "--decoded-cache",
        "on",
        "--sync-bn",
        "--out",
        "o",
        "--model",
        "resnet101",
        "--weights",
        "none",
        "--batch-size",
        "8",
    ],
    ["train", "D", "--augment", "randaugment", "--track", "mlflow", "--lr", "0.01"],
    ["train", "--resume", "R"],
    ["compare", "D"],
    ["compare", "D", "--models", "resnet50", "--epochs", "1", "--weights", "resnet50=a.pth", "--no-ensemble"],
    ["lr-find", "D"],
    ["lr-find", "R", "--epochs", "2", "--model", "resnet101", "--steps", "10"],
    ["audit", "D"],
    [
        "audit",
        "D",
        "--no-features",
        "--top",
        "5",
        "--near-distance",
        "4",
        "--precision",
        "fp32",
        "--json",
        "--out",
        "o",
        "--img-size",
        "128",
        "--seed",
        "1",
        "--val-fraction",
        "0.1",
        "--model",
        "resnet101",
        "--weights",
        "none",
        "--device",
        "cpu",
    ],
    ["predict", "R", "a.jpg"],
    [
        "predict",
        "R",
        "a.jpg",
        "--backend",
        "onnxruntime",
        "--precision",
        "int8",
        "--tta",
        "flip",
        "--no-reject",
        "--performance-hint",
        "THROUGHPUT",
        "--device",
        "cpu",
        "--top-k",
        "2",
        "--json",
    ],
    ["serve", "R"],
    ["evaluate", "R", "D", "--split", "test"],
    ["export", "R"],
    ["export", "R", "--tta", "none"],
    ["ensemble", "A", "B", "--out", "o"],
    [
        "export",
        "R",
        "--format",
        "openvino",
        "--out",
        "x.xml",
        "--check-images",
        "a",
        "b",
        "--num-check-images",
        "3",
        "--tta",
        "flip",
    ],
    [
        "serve",
        "R",
        "--max-upload-mb",
        "2.5",
        "--max-pixels",
        "100",
        "--top-k",
        "2",
        "--port",
        "9000",
        "--host",
        "0.0.0.0",
    ],
    [
        "compare",
        "D",
        "--models",
        "resnet50,resnet18",
        "--ensemble-weighting",
        "equal",
        "--backend",
        "torch",
        "--latency-repeats",
        "4",
        "--throughput-batch",
        "8",
        "--out",
        "o",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ],
    ["shard", "D", "--out", "o", "--exclude-from", "x"],
]


def parse_all(src: Path) -> dict:
    sys.path.insert(0, str(src.resolve()))
    from resfit.cli import build_parser

    parsed = {" ".join(argv): vars(build_parser().parse_args(argv)) for argv in ARGVS}
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"commit": commit.stdout.strip(), "lines": json.loads(json.dumps(parsed, default=str))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FIRST", "SECOND"))
    args = parser.parse_args()
    if args.compare:
        first, second = (json.loads(p.read_text())["lines"] for p in args.compare)
        found = differences(first, second)
        print(f"{len(first)} command lines, {len(found)} differences")
        for entry in found:
            print("  " + entry)
        sys.exit(1 if found else 0)
    if not (args.src and args.out):
        parser.error("give --src and --out, or --compare FIRST SECOND")
    args.out.write_text(json.dumps(parse_all(args.src), indent=1, sort_keys=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
