"""What a default run costs outside its epochs, and what a change to that saved: the same seeded run
(ants/bees from the shared ResNet-50 source, the default recipe) trained with two source trees in turn,
old then new, each run in its own process with cold caches, so the two share the machine's drift.

    git worktree add /tmp/old <commit>
    python benchmarks/run_overhead.py --old /tmp/old/src --new src --pairs 3

Per run, from history.csv's clocks: the head stage, the fine-tuning epochs (their own seconds, validation
included), the time between epochs (the saves after each), before the head stage (scan, model, caches) and
after the last epoch (calibration, the "unknown" rule, evaluation and reports). The summary gives each
tree's medians and the per-pair wall ratio old/new with its median. Its JSON lands in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import COMMIT_AT_START, REPO, record, stamp  # noqa: E402

SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS = SHARED / "weights" / "resnet50-imagenette.pth"


def child(src: str, out: str, seed: int) -> None:
    """One run with ``src``'s resfit: its wall time and history as JSON on stdout."""
    sys.path.insert(0, src)
    import resfit

    config = resfit.TrainConfig(
        data=str(DATA), model="resnet50", weights=str(WEIGHTS), seed=seed, out=out, quiet=True
    )
    started = time.perf_counter()
    result = resfit.train(config, say=lambda _: None)
    wall = time.perf_counter() - started
    print(json.dumps({"wall": wall, "history": result.history, "accuracy": result.metrics["accuracy"]}))


def split_times(wall: float, history: list[dict]) -> dict:
    """The run's wall time cut by history.csv's clocks (``elapsed`` is since the run started)."""
    head = [row for row in history if row.get("stage") == "head"]
    epochs = [row for row in history if row.get("stage") == "finetune"]
    if not head or not epochs:
        raise SystemExit("a default run has a head stage and fine-tuning epochs; this history has not")
    between = [
        later["elapsed"] - later["seconds"] - earlier["elapsed"]
        for earlier, later in zip((head + epochs)[:-1], epochs, strict=True)
    ]
    return {
        "wall": wall,
        "before_head": head[0]["elapsed"] - head[0]["seconds"],
        "head": head[0]["seconds"],
        "epochs": sum(row["seconds"] for row in epochs),
        "between_epochs": sum(between),
        "after_last_epoch": wall - history[-1]["elapsed"],
    }


def run_once(src: Path, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="resfit-overhead-") as tmp:
        env = os.environ | {"RESFIT_CACHE": str(Path(tmp) / "cache")}  # cold: a user's first run
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(src), str(Path(tmp) / "run"), str(seed)],
            capture_output=True,
            text=True,
            env=env,
        )
    if done.returncode != 0:
        raise SystemExit(f"run with {src} failed:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {"accuracy": found["accuracy"], **split_times(found["wall"], found["history"])}


def _git_head(src: Path) -> str:
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def summarize(found: dict) -> str:
    lines = [f"{'seconds (median)':22s} {'old':>8s} {'new':>8s}"]
    for key in ("wall", "before_head", "head", "epochs", "between_epochs", "after_last_epoch"):
        old = statistics.median(run[key] for run in found["old"])
        new = statistics.median(run[key] for run in found["new"])
        lines.append(f"{key:22s} {old:8.2f} {new:8.2f}")
    ratios = [old["wall"] / new["wall"] for old, new in zip(found["old"], found["new"], strict=True)]
    lines.append(
        "wall old/new per pair: "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + f"; median {statistics.median(ratios):.3f}"
    )
    same = all(
        old["accuracy"] == new["accuracy"] for old, new in zip(found["old"], found["new"], strict=True)
    )
    lines.append(f"val accuracy the same in every pair: {same}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, help="the src/ folder of the tree before the change")
    parser.add_argument("--new", type=Path, default=REPO / "src")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("SRC", "RUN_DIR", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    if args.old is None or args.pairs < 1:
        raise SystemExit("--old SRC and --pairs >= 1 are needed")
    found = {
        "provenance": record(),
        "old_src": str(args.old.resolve()),
        "old_commit": _git_head(args.old),
        "new_src": str(args.new.resolve()),
        "new_commit": COMMIT_AT_START,
        "seed": args.seed,
        "old": [],
        "new": [],
    }
    for pair in range(args.pairs):
        for tree, src in (("old", args.old), ("new", args.new)):
            found[tree].append(run_once(src, args.seed))
            print(f"pair {pair + 1} {tree}: {found[tree][-1]['wall']:.1f} s", flush=True)
    found["summary"] = summarize(found)
    print(found["summary"])
    out = args.out or REPO / "benchmarks" / "results" / f"run_overhead-{stamp()}.json"
    out.write_text(json.dumps(found, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
