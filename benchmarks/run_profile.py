"""Where one default run's wall time goes, by the functions that do the work: each timed in place (calls and
seconds, nested ones inside their callers), and every inference pass counted by the split it ran over.

    python benchmarks/run_profile.py --src src
    python benchmarks/run_profile.py --src /tmp/old/src     # another tree, e.g. before a change

The run: ants/bees from the shared ResNet-50 source, the default recipe, cold caches. Its JSON lands in
benchmarks/results/ (run_overhead.py gives the side-by-side wall times; this says what is inside them).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REPO, record, stamp  # noqa: E402

SHARED = REPO.parent / "shared"
TRAINER_STEPS = ("prepare", "fit_head", "train_epoch", "validate", "calibrate", "feature_bank", "finish")


def profile(src: Path, seed: int) -> dict:
    sys.path.insert(0, str(src.resolve()))
    import resfit

    loop = importlib.import_module("resfit.train.loop")  # resfit.train is also a function's name
    evaluate = importlib.import_module("resfit.evaluate")
    run_folder = importlib.import_module("resfit.run_folder")
    spent: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    passes: collections.Counter = collections.Counter()

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label][0] += 1
                spent[label][1] += time.perf_counter() - started

        setattr(owner, name, wrapper)

    def counted(module) -> None:
        original = module.predict_logits

        def predict_logits(model, loader, *args, **kwargs):
            dataset = loader.dataset
            passes[getattr(dataset, "split", None) or getattr(dataset.dataset, "split", "?")] += 1
            return original(model, loader, *args, **kwargs)

        module.predict_logits = predict_logits

    trainer = next(c for c in vars(loop).values() if isinstance(c, type) and hasattr(c, "fine_tune"))
    for step in TRAINER_STEPS:
        timed(trainer, step, f"Trainer.{step}")
    timed(loop, "plot_training_curves", "plot_training_curves")
    timed(loop, "save_state", "save_state (resume)")
    timed(run_folder.RunFolder, "write_model", "RunFolder.write_model")
    timed(run_folder.RunFolder, "evaluate_and_report", "RunFolder.evaluate_and_report")
    timed(run_folder.RunFolder, "write_evaluation", "RunFolder.write_evaluation (reports, plots)")
    counted(loop)
    counted(evaluate)
    with tempfile.TemporaryDirectory(prefix="resfit-profile-") as tmp:
        os.environ["RESFIT_CACHE"] = str(Path(tmp) / "cache")
        config = resfit.TrainConfig(
            data=str(SHARED / "data" / "hymenoptera"),
            model="resnet50",
            weights=str(SHARED / "weights" / "resnet50-imagenette.pth"),
            seed=seed,
            out=str(Path(tmp) / "run"),
            quiet=True,
        )
        started = time.perf_counter()
        result = resfit.train(config, say=lambda _: None)
        wall = time.perf_counter() - started
    return {
        "src": str(src.resolve()),
        "resfit_module": resfit.__file__,
        "wall": wall,
        "accuracy": result.metrics["accuracy"],
        "spent": {label: {"calls": calls, "seconds": seconds} for label, (calls, seconds) in spent.items()},
        "inference_passes_by_split": dict(passes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO / "src")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    found = profile(args.src, args.seed)  # first: record() imports resfit, which must be --src's
    found = {"provenance": record(), **found}
    for label, entry in found["spent"].items():
        print(f"{label:48s} {entry['calls']:4d} calls {entry['seconds']:7.2f} s")
    print(f"inference passes by split: {found['inference_passes_by_split']}; wall {found['wall']:.1f} s")
    out = args.out or REPO / "benchmarks" / "results" / f"run_profile-{stamp()}.json"
    out.write_text(json.dumps(found, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
