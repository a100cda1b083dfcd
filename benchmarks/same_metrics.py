"""Does a refactor change behaviour? Train the same seeded runs with two source trees and compare every number.

    python benchmarks/same_metrics.py --src /path/to/old/checkout/src --out old.json
    python benchmarks/same_metrics.py --src src --out new.json
    python benchmarks/same_metrics.py --compare old.json new.json

Each run is a real fine-tune on ../shared's ants/bees from the shared ResNet-50 source (issue #15: "the same
seeded runs give bit-identical metrics before and after"). Recorded per run: metrics.json and
metrics_test.json-free fields (val has everything), the history without its clocks, the temperature, the
"unknown" rule, and a SHA-256 of model.safetensors. ``--compare`` lists every field that differs and exits 1
if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLOCK_KEYS = {"seconds", "elapsed", "images_per_s", "wall_s"}
RUNS = {
    # the default recipe: head stage, then fine-tuning (2 epochs keep it short)
    "default": {"epochs": 2},
    # --lr auto: the range test, then an epoch at the lr it chose
    "lr-auto": {"epochs": 1, "lr": "auto"},
}


def _without_clocks(value):
    if isinstance(value, dict):
        return {k: _without_clocks(v) for k, v in value.items() if k not in CLOCK_KEYS}
    if isinstance(value, list):
        return [_without_clocks(v) for v in value]
    return value


def _git(src: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True).stdout.strip()


def run_all(src: Path, out: Path) -> None:
    sys.path.insert(0, str(src.resolve()))
    import resfit

    found = {
        "src": str(src.resolve()),
        "resfit_module": resfit.__file__,
        "commit": _git(src, "rev-parse", "HEAD"),
        "src_uncommitted": _git(src, "status", "--porcelain", "--", ".").splitlines(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="resfit-same-") as tmp:
        os.environ["RESFIT_CACHE"] = str(Path(tmp) / "cache")  # cold caches: nothing carried between trees
        for name, overrides in RUNS.items():
            run_dir = Path(tmp) / name
            config = resfit.TrainConfig(
                data=str(SHARED / "data" / "hymenoptera"),
                weights=str(SHARED / "weights" / "resnet50-imagenette.pth"),
                out=str(run_dir),
                quiet=True,
                **overrides,
            )
            result = resfit.train(config, say=lambda _: None)
            meta = json.loads((run_dir / "model.json").read_text())
            found["runs"][name] = {
                "metrics": _without_clocks(result.metrics),
                "history": _without_clocks(result.history),
                "best_epoch": result.best_epoch,
                "temperature": meta.get("temperature"),
                "reject": meta.get("reject"),
                "lr": json.loads((run_dir / "train_config.json").read_text()).get("lr"),
                "weights_sha256": hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest(),
            }
            print(
                f"{name}: val acc {result.metrics['accuracy']:.4f}, best epoch {result.best_epoch}",
                flush=True,
            )
    out.write_text(json.dumps(found, indent=1, sort_keys=True))
    print(f"wrote {out}")


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{where}/{key}: only in {'second' if key not in a else 'first'}")
            else:
                found += differences(a[key], b[key], f"{where}/{key}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, help="the source tree whose resfit runs (its src/ folder)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FIRST", "SECOND"))
    args = parser.parse_args()
    if args.compare:
        first, second = (json.loads(p.read_text()) for p in args.compare)
        found = differences(first["runs"], second["runs"])
        print(f"{first['commit'][:7]} vs {second['commit'][:7]}: {len(found)} differences")
        for line in found:
            print("  " + line)
        sys.exit(1 if found else 0)
    if not (args.src and args.out):
        parser.error("give --src and --out, or --compare FIRST SECOND")
    run_all(args.src, args.out)


if __name__ == "__main__":
    main()
