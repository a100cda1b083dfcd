"""The "unknown" answer on real out-of-distribution photos, and calibration on held-out photos.

    python benchmarks/ood.py [--archs resnet50,resnet101] [--epochs 6] [--flowers-train-per-class 150]

For each architecture and each direction (an ants/bees model shown flowers5 photos, a flowers5 model shown
ants/bees photos) a run is trained with resfit's default recipe from the shared Imagenette source on the
in-distribution (ID) set's train/ folder, its val/ folder cut into two stratified halves: "val" (what
resfit fits the temperature and the rejection threshold on) and "test" (held out, scored once). The OOD
photos are the other set's val/ folder, all of them. flowers5's train/ is subsampled per class (the quick
budget of 2 cores); its val halves are 430 photos each.

Per score (knn, resfit's default: minus the distance to the 5th nearest of the run's bank of training features;
msp: calibrated top-1 probability; energy: logsumexp of the calibrated logits) the table gives the
AUROC of ID test against OOD photos, the false-positive rate at 95% true-positive rate, and with the
threshold resfit chooses on val (--reject-target, default coverage:0.95): the share of OOD photos rejected,
the share of ID test photos answered and the accuracy on them. The calibration columns are NLL and ECE on the
ID test half before and after the run's temperature. Writes JSON (provenance.record) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import provenance  # noqa: E402

SHARED = provenance.REPO.parent / "shared"
PAIRS = (("hymenoptera", "flowers5"), ("flowers5", "hymenoptera"))
SUFFIXES = {".jpg", ".jpeg", ".png"}


def photos(folder: Path) -> list[tuple[str, str]]:
    """(path, class) under folder/<class>/, sorted."""
    return sorted(
        (str(p), p.parent.name) for p in folder.glob("*/*") if p.suffix.lower() in SUFFIXES and p.is_file()
    )


def stratified_halves(items: list[tuple[str, str]], seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    first, second = [], []
    for name in sorted({label for _, label in items}):
        mine = [item for item in items if item[1] == name]
        order = rng.permutation(len(mine))
        half = len(mine) // 2
        first += [mine[i] for i in order[:half]]
        second += [mine[i] for i in order[half:]]
    return first, second


def subsample(items: list[tuple[str, str]], per_class: int | None, seed: int) -> list:
    if not per_class:
        return items
    rng = np.random.default_rng(seed)
    kept = []
    for name in sorted({label for _, label in items}):
        mine = [item for item in items if item[1] == name]
        kept += [mine[i] for i in sorted(rng.permutation(len(mine))[:per_class])]
    return kept


def write_manifest(path: Path, rows: dict[str, list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for split, items in rows.items():
            writer.writerows([(p, label, split) for p, label in items])


def outputs_of(classifier, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated logits and the normalised pooled features (the knn rule makes the engine output them)."""
    found = [classifier.outputs(classifier.preprocess(paths[i : i + 32])) for i in range(0, len(paths), 32)]
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of OOD photos scoring at or above the threshold that keeps ``tpr`` of the ID photos."""
    threshold = np.quantile(id_scores, 1 - tpr)
    return float((ood_scores >= threshold).mean())


def measure(arch: str, id_name: str, ood_name: str, args, work: Path) -> dict:
    from sklearn.metrics import roc_auc_score

    import resfit
    from resfit.batched_inference import softmax
    from resfit.calibration import calibration_scores
    from resfit.inference.classifier import Classifier, InferenceConfig
    from resfit.rejection import SCORES, fit_rule

    id_root = SHARED / "data" / id_name
    train = photos(id_root / "train")
    if id_name == "flowers5":
        train = subsample(train, args.flowers_train_per_class, seed=0)
    val, test = stratified_halves(photos(id_root / "val"), seed=0)
    manifest = work / f"{arch}-{id_name}.csv"
    write_manifest(manifest, {"train": train, "val": val, "test": test})
    run = work / f"run-{arch}-{id_name}"
    config = resfit.TrainConfig(
        data=str(manifest),
        model=arch,
        weights=str(SHARED / "weights" / f"{arch}-imagenette.pth"),
        epochs=args.epochs,
        reject_target=args.reject_target,
        seed=0,
        out=str(run),
        quiet=True,
    )
    started = time.perf_counter()
    resfit.train(
        config,
        say=lambda line: (
            print(f"  {line}", flush=True) if "unknown" in line or "calibration" in line else None
        ),
    )
    train_seconds = time.perf_counter() - started
    classifier = Classifier.load(run, config=InferenceConfig(backend="torch", precision="fp32", reject=True))
    temperature = float(classifier.meta.get("temperature", 1.0))
    names = classifier.class_names
    val_logits, val_features = outputs_of(classifier, [p for p, _ in val])
    id_logits, id_features = outputs_of(classifier, [p for p, _ in test])
    ood_paths = [p for p, _ in photos(SHARED / "data" / ood_name / "val")]
    ood_logits, ood_features = outputs_of(classifier, ood_paths)
    val_labels = np.array([names.index(label) for _, label in val])
    id_labels = np.array([names.index(label) for _, label in test])
    id_correct = id_logits.argmax(1) == id_labels
    bank = classifier.reject.bank  # the run's bank of training features (knn, resfit's default score)
    scores = {}
    for score in SCORES:
        rule = fit_rule(val_logits, val_labels, args.reject_target, score, val_features, bank)
        (answered, id_scores), (_, ood_scores) = (
            rule.accepts(id_logits, id_features),
            rule.accepts(ood_logits, ood_features),
        )
        scores[score] = {
            "auroc": float(
                roc_auc_score(
                    np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))], np.r_[id_scores, ood_scores]
                )
            ),
            "fpr_at_95_tpr": fpr_at_tpr(id_scores, ood_scores),
            "threshold": rule.threshold,
            "ood_rejected": float((ood_scores < rule.threshold).mean()),
            "id_answered": float(answered.mean()),
            "id_accuracy_answered": float(id_correct[answered].mean()) if answered.any() else float("nan"),
        }
    stored = classifier.reject
    row = {
        "arch": arch,
        "id": id_name,
        "ood": ood_name,
        "train_photos": len(train),
        "val_photos": len(val),
        "test_photos": len(test),
        "ood_photos": len(ood_paths),
        "train_seconds": train_seconds,
        "temperature": temperature,
        "stored_rule": stored.to_dict() if stored else None,
        "id_accuracy": float(id_correct.mean()),
        "calibration_test": {
            "before": calibration_scores(softmax(id_logits * temperature), id_labels),
            "after": calibration_scores(softmax(id_logits), id_labels),
        },
        "scores": scores,
    }
    print(json.dumps({k: row[k] for k in ("arch", "id", "ood", "id_accuracy", "temperature")}), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'model':<10} {'ID -> OOD':<24} {'score':<7} {'AUROC':>6} {'FPR@95':>7} {'OOD rejected':>13} "
        f"{'ID answered':>12} {'acc answered / all':>19} {'test NLL before->after':>23} {'ECE before->after':>18}"
    )
    for row in rows:
        cal = row["calibration_test"]
        for score, s in row["scores"].items():
            print(
                f"{row['arch']:<10} {row['id'] + ' -> ' + row['ood']:<24} {score:<7} {s['auroc']:>6.3f} "
                f"{s['fpr_at_95_tpr']:>7.1%} {s['ood_rejected']:>13.1%} {s['id_answered']:>12.1%} "
                f"{s['id_accuracy_answered']:>9.1%} / {row['id_accuracy']:<7.1%} "
                f"{cal['before']['nll']:>10.4f} -> {cal['after']['nll']:<8.4f} "
                f"{cal['before']['ece']:>7.4f} -> {cal['after']['ece']:<7.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="resnet50,resnet101")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (6: resfit's default)")
    parser.add_argument("--flowers-train-per-class", type=int, default=150, help="0: all of flowers5 train/")
    parser.add_argument("--reject-target", default="coverage:0.95")
    parser.add_argument("--pairs", default="hymenoptera:flowers5,flowers5:hymenoptera")
    args = parser.parse_args()
    pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="resfit-ood-") as work:
        for arch in args.archs.split(","):
            for id_name, ood_name in pairs:
                print(f"== {arch}: {id_name} model, {ood_name} photos as out-of-distribution", flush=True)
                rows.append(measure(arch.strip(), id_name, ood_name, args, Path(work)))
    print_table(rows)
    settings = {k: v for k, v in vars(args).items()}
    out = provenance.REPO / "benchmarks" / "results" / f"ood-e{args.epochs}-{provenance.stamp()}.json"
    out.write_text(json.dumps({**provenance.record(), "settings": settings, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
