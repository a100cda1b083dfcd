"""Would averaging two recipes' outputs beat each alone? Measured on the accuracy suite's held-out photos.

    python benchmarks/output_ensemble.py SUITE.json [SUITE.json ...] --a resfit --b resfit-probe

Each resfit-kind row of an accuracy-suite JSON (since 47f357e) keeps the uncalibrated log-probabilities of
its test fold. For every fold run (data set, seed, fold) that both recipes ran, this averages their
probabilities (an output ensemble of the two networks, as ``resfit ensemble`` builds) and scores it on the
test fold: accuracy of the ensemble, of a and of b, and the paired differences with the suite's intervals
(t over fold runs, plain and corrected for k-fold's overlapping training sets). Nothing is trained. The
question it answers for issue #12: fine-tuning and its probe are level in accuracy but disagree on 9-25% of
photos (benchmarks/dip_noise.py), so does what fine-tuning learnt add to the probe? Writes JSON (commit,
machine, command) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy_suite import _fmt_interval, read_suite, t_interval  # noqa: E402
from provenance import record, stamp  # noqa: E402


def test_outputs(paths: list[Path], recipe: str) -> dict[tuple, dict]:
    """(data set, seed, fold) -> {labels, probs, n_train} of ``recipe``'s test fold; a later file wins."""
    found = {}
    for path in paths:
        for row in read_suite(path)["rows"]:
            held_out = row.get("held_out_logprobs")
            if row["recipe"] == recipe and held_out:
                found[(row["dataset"], row["seed"], row["fold"])] = {
                    "labels": np.asarray(held_out["test"]["labels"]),
                    "probs": np.exp(np.asarray(held_out["test"]["logprobs"])),
                    "n_train": row["n_outer_train"],
                }
    return found


def paired_runs(a: dict[tuple, dict], b: dict[tuple, dict]) -> list[dict]:
    """Per fold run both recipes ran: the test photos each of a, b and their average gets right."""
    runs = []
    for key in sorted(a.keys() & b.keys()):
        one, two = a[key], b[key]
        if not np.array_equal(one["labels"], two["labels"]):
            raise SystemExit(f"{key}: the two recipes' test folds hold other photos; not the same split")
        labels = one["labels"]
        averaged = (one["probs"] + two["probs"]) / 2
        runs.append(
            {
                "dataset": key[0],
                "seed": key[1],
                "fold": key[2],
                "n_test": len(labels),
                "n_train": one["n_train"],
                "correct": {
                    "a": int((one["probs"].argmax(1) == labels).sum()),
                    "b": int((two["probs"].argmax(1) == labels).sum()),
                    "ensemble": int((averaged.argmax(1) == labels).sum()),
                },
            }
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+", type=Path)
    parser.add_argument("--a", default="resfit")
    parser.add_argument("--b", default="resfit-probe")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = paired_runs(test_outputs(args.suites, args.a), test_outputs(args.suites, args.b))
    if len(runs) < 2:
        raise SystemExit(f"{len(runs)} fold runs have test log-probabilities of both {args.a} and {args.b}")
    summary = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        mine = [r for r in runs if r["dataset"] == dataset]
        correction = float(np.mean([r["n_test"] / r["n_train"] for r in mine]))
        acc = {
            k: np.array([100 * r["correct"][k] / r["n_test"] for r in mine]) for k in ("a", "b", "ensemble")
        }
        summary[dataset] = {"fold_runs": len(mine), "accuracy": {k: float(v.mean()) for k, v in acc.items()}}
        print(
            f"{dataset} ({len(mine)} fold runs): {args.a} {acc['a'].mean():.1f}%, {args.b} {acc['b'].mean():.1f}%, "
            f"their average {acc['ensemble'].mean():.1f}%"
        )
        for first, other in (("ensemble", "a"), ("ensemble", "b"), ("a", "b")):
            diff = acc[first] - acc[other]
            plain, corrected = t_interval(diff), t_interval(diff, correction)
            names = {"ensemble": "average", "a": args.a, "b": args.b}
            summary[dataset][f"{first}_minus_{other}"] = {
                "plain_t": plain,
                "corrected_t": corrected,
                "runs_better": int((diff > 0).sum()),
                "runs_worse": int((diff < 0).sum()),
            }
            print(
                f"  {names[first]} - {names[other]}: {_fmt_interval(plain, scale=1, signed=True)} points (plain t), corrected "
                f"[{corrected['low']:+.1f}, {corrected['high']:+.1f}]; runs better / worse "
                f"{(diff > 0).sum()} / {(diff < 0).sum()}"
            )
    out = args.out or REPO / "benchmarks" / "results" / f"output_ensemble-{stamp()}.json"
    payload = {"benchmark": "output_ensemble", **record(), "suites": [str(p) for p in args.suites]}
    payload.update({"a": args.a, "b": args.b, "summary": summary, "fold_runs": runs})
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
