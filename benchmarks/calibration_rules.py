"""Which temperature rule helps photos it never saw? Compared on the accuracy suite's held-out predictions.

    python benchmarks/calibration_rules.py SUITE.json [...] [--rules fit,checked,...] [--recipe NAME]

Each resfit row (or ``--recipe``'s) of an accuracy-suite JSON (``accuracy_suite.py``, which keeps them since
47f357e) holds the uncalibrated log-probabilities of its run's inner validation photos (what a run fits its
temperature on) and of its test fold (photos the run never saw). Every rule here picks a temperature from the
validation photos alone; it is scored on the test fold: NLL and ECE after minus before (T = 1), per fold run,
with a 95% t interval over fold runs corrected for the overlap of k-fold training sets (Nadeau & Bengio, as
the suite does for accuracy), and how many runs it lowered and raised. Accuracy cannot change (the order of
the log-probabilities is kept), and is checked. Writes JSON (commit, machine, command) to benchmarks/results/.
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

from accuracy_suite import read_suite, t_interval  # noqa: E402
from provenance import record, stamp  # noqa: E402

from resfit import calibration  # noqa: E402


def _fit(logprobs: np.ndarray, labels: np.ndarray) -> float:
    return calibration.fit_temperature(logprobs, labels)


def _nll(logprobs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-calibration._log_softmax(logprobs / temperature)[np.arange(len(labels)), labels].mean())


def _transfers_across_halves(logprobs: np.ndarray, labels: np.ndarray, seed: int = 0) -> bool:
    """resfit's check before 2026-12-04: T fitted on either stratified half of val must not raise the
    other half's NLL above T = 1's."""
    rng = np.random.default_rng(seed)
    first = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        first[members[: len(members) // 2]] = True
    for fit_on, score_on in ((first, ~first), (~first, first)):
        temperature = _fit(logprobs[fit_on], labels[fit_on])
        if _nll(logprobs[score_on], labels[score_on], temperature) > _nll(
            logprobs[score_on], labels[score_on], 1.0
        ):
            return False
    return True


def _checked(logprobs: np.ndarray, labels: np.ndarray) -> float:
    """resfit's rule before 2026-12-04: fit, kept only if it carries across halves of val."""
    if calibration.why_not_calibrated(logprobs, labels) or not _transfers_across_halves(logprobs, labels):
        return 1.0
    return _fit(logprobs, labels)


def _map(logprobs: np.ndarray, labels: np.ndarray) -> float:
    """The most probable T under resfit's normal prior on log T (mean 0, sd ``PRIOR_LOG_T_SD``)."""
    return calibration.fit_temperature(logprobs, labels, prior_sd=calibration.PRIOR_LOG_T_SD)


def _evidence(logprobs: np.ndarray, labels: np.ndarray, level: float = 0.05) -> float:
    """The fitted T where the validation photos show the softmax miscalibrated: a likelihood-ratio test of
    T = 1 against the fitted T (2 x the summed NLL gain, chi-square with 1 degree of freedom) at ``level``."""
    from scipy.stats import chi2

    temperature = _fit(logprobs, labels)
    gain = len(labels) * (_nll(logprobs, labels, 1.0) - _nll(logprobs, labels, temperature))
    return temperature if 2 * gain > chi2.ppf(1 - level, 1) else 1.0


def _sharpen_on_evidence(rule):
    """Softening (T > 1) as ``rule`` says; sharpening (T < 1) only where the likelihood-ratio test shows it."""

    def chosen(logprobs: np.ndarray, labels: np.ndarray) -> float:
        temperature = rule(logprobs, labels)
        return temperature if temperature >= 1.0 or _evidence(logprobs, labels) != 1.0 else 1.0

    return chosen


def _at_least_one(rule):
    return lambda logprobs, labels: max(1.0, rule(logprobs, labels))


RULES = {
    "none": lambda logprobs, labels: 1.0,
    "fit": _fit,
    "checked": _checked,
    "fit-soften-only": _at_least_one(_fit),
    "checked-soften-only": _at_least_one(_checked),
    "map": _map,
    "map-soften-only": _at_least_one(_map),
    "evidence": _evidence,
    "evidence-soften-only": _at_least_one(_evidence),
    "fit-sharpen-on-evidence": _sharpen_on_evidence(_fit),
    "map-sharpen-on-evidence": _sharpen_on_evidence(_map),
    "resfit": lambda logprobs, labels: calibration.choose_temperature(logprobs, labels)[0],
}


def held_out_runs(paths: list[Path], recipe: str = "resfit") -> list[dict]:
    runs = []
    for path in paths:
        for row in read_suite(path)["rows"]:
            if row.get("recipe") == recipe and "held_out_logprobs" in row:
                runs.append({**row, "suite": path.name})
    if not runs:
        raise SystemExit(f"no {recipe} rows with held_out_logprobs in {', '.join(map(str, paths))}")
    return runs


def _split(run: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    held_out = run["held_out_logprobs"][split]
    return np.asarray(held_out["logprobs"]), np.asarray(held_out["labels"])


def rule_temperature(rule, run: dict) -> float:
    """The temperature ``rule`` picks from the run's inner validation photos alone."""
    return float(rule(*_split(run, "val")))


def score_rule(rule, run: dict) -> dict:
    test_lp, test_labels = _split(run, "test")
    temperature = rule_temperature(rule, run)
    raw = calibration._softmax(test_lp)
    scaled = calibration._softmax(test_lp / temperature)
    if not (scaled.argmax(1) == test_lp.argmax(1)).all():
        raise RuntimeError("a temperature changed a top-1 answer")
    return {
        "temperature": temperature,
        "before": calibration.calibration_scores(raw, test_labels),
        "after": calibration.calibration_scores(scaled, test_labels),
        "probs": (raw, scaled, test_labels),
    }


def ece_if_calibrated(probs: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """The ECE these photos would show if ``probs`` were perfectly calibrated (labels drawn from them):
    the floor that finite samples put under any measured ECE."""
    rng = np.random.default_rng(seed)
    cumulative = probs.cumsum(axis=1)
    found = []
    for _ in range(draws):
        labels = (rng.random((len(probs), 1)) > cumulative).sum(axis=1).clip(max=probs.shape[1] - 1)
        found.append(calibration.calibration_scores(probs, labels)["ece"])
    return float(np.mean(found))


def _sign_test(change: np.ndarray) -> float | None:
    """Two-sided sign test of the runs a rule changed: lowered against raised (None if it changed none)."""
    from scipy.stats import binomtest

    lower, higher = int((change < -1e-12).sum()), int((change > 1e-12).sum())
    return float(binomtest(lower, lower + higher).pvalue) if lower + higher else None


def pooled_by_repeat(runs: list[dict], scored: list[dict]) -> dict:
    """Per repeat, every photo of the data set once (each scored by its own fold's run): NLL and ECE of the
    pooled out-of-fold predictions, a steadier ECE than one 133-photo fold's."""
    pooled = {}
    for repeat in sorted({r["repeat"] for r in runs}):
        mine = [s["probs"] for r, s in zip(runs, scored, strict=True) if r["repeat"] == repeat]
        raw, scaled, labels = (np.concatenate(parts) for parts in zip(*mine, strict=True))
        pooled[repeat] = {
            "photos": len(labels),
            "ece_if_calibrated": ece_if_calibrated(raw),
            "before": calibration.calibration_scores(raw, labels),
            "after": calibration.calibration_scores(scaled, labels),
        }
    return pooled


def _replays_match_runs(runs: list[dict]) -> dict:
    """resfit's rules, before and since 2026-12-04, replayed here against the temperature each run kept
    (fitted on its own validation pass in training): the replay is faithful where one of them agrees."""
    kept = np.array([r["test_calibration"]["temperature"] for r in runs])
    found = {"runs": len(runs)}
    for name in ("checked", "resfit"):
        replayed = np.array([rule_temperature(RULES[name], r) for r in runs])
        found[name] = int((np.abs(replayed - kept) <= 1e-4 * kept).sum())
    return found


def summarize(runs: list[dict], rules: list[str]) -> dict:
    summary = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        mine = [r for r in runs if r["dataset"] == dataset]
        # k-fold training sets overlap: the suite's correction n_test / n_train
        correction = float(np.mean([r["n_test"] / r["n_outer_train"] for r in mine]))
        entry = {"fold_runs": len(mine), "val_photos": int(np.median([r["n_inner_val"] for r in mine]))}
        for name in rules:
            scored = [score_rule(RULES[name], r) for r in mine]
            pooled = pooled_by_repeat(mine, scored)
            result = {"temperatures": [s["temperature"] for s in scored], "pooled_by_repeat": pooled}
            for score in ("nll", "ece"):
                change = np.array([s["after"][score] - s["before"][score] for s in scored])
                result[score] = {
                    "before_mean": float(np.mean([s["before"][score] for s in scored])),
                    "after_mean": float(np.mean([s["after"][score] for s in scored])),
                    "change": t_interval(change, correction),
                    "change_plain_t": t_interval(change),
                    "lower": int((change < -1e-12).sum()),
                    "higher": int((change > 1e-12).sum()),
                    "sign_test_p": _sign_test(change),
                }
                pooled_change = np.array([p["after"][score] - p["before"][score] for p in pooled.values()])
                result[f"pooled_{score}"] = {
                    "before_mean": float(np.mean([p["before"][score] for p in pooled.values()])),
                    "after_mean": float(np.mean([p["after"][score] for p in pooled.values()])),
                    "change": t_interval(pooled_change),
                    "lower": int((pooled_change < -1e-12).sum()),
                    "higher": int((pooled_change > 1e-12).sum()),
                }
            entry[name] = result
        entry["replays_match_runs"] = _replays_match_runs(mine)
        summary[dataset] = entry
    return summary


def table(summary: dict, rules: list[str]) -> str:
    lines = [
        "| data (fold runs, val photos) | rule | T kept (runs), median T | test NLL before -> after | "
        "NLL change (95% CI: corrected, plain) | runs lower / higher | test ECE before -> after | ECE change (95% CI: "
        "corrected, plain) | runs lower / higher "
        "| pooled per repeat: NLL, ECE before -> after (repeats lower / higher) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def interval(change: dict) -> str:
        if change["low"] is None:
            return f"{change['mean']:+.4f}"
        return f"{change['mean']:+.4f} [{change['low']:+.4f}, {change['high']:+.4f}]"

    def sign(score: dict) -> str:
        return "" if score["sign_test_p"] is None else f" (sign test p {score['sign_test_p']:.2g})"

    def pooled(score: dict) -> str:
        return (
            f"{score['before_mean']:.4f} -> {score['after_mean']:.4f} ({score['lower']} / {score['higher']})"
        )

    for dataset, entry in summary.items():
        for name in rules:
            result = entry[name]
            temperatures = np.array(result["temperatures"])
            kept = int((temperatures != 1.0).sum())
            median = float(np.median(temperatures[temperatures != 1.0])) if kept else 1.0
            nll, ece = result["nll"], result["ece"]
            lines.append(
                f"| {dataset} ({entry['fold_runs']}, {entry['val_photos']}) | {name} | {kept}, {median:.2f} "
                f"| {nll['before_mean']:.4f} -> {nll['after_mean']:.4f} | {interval(nll['change'])}, "
                f"plain t {interval(nll['change_plain_t'])} "
                f"| {nll['lower']} / {nll['higher']}{sign(nll)} | {ece['before_mean']:.4f} -> {ece['after_mean']:.4f} "
                f"| {interval(ece['change'])}, plain t {interval(ece['change_plain_t'])} "
                f"| {ece['lower']} / {ece['higher']}{sign(ece)} "
                f"| {pooled(result['pooled_nll'])}; {pooled(result['pooled_ece'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+", type=Path, help="accuracy-suite result JSONs")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated of {', '.join(RULES)}")
    parser.add_argument(
        "--recipe", default="resfit", help="the suite recipe whose rows are replayed (default: resfit)"
    )
    parser.add_argument(
        "--out", type=Path, help="result JSON (default benchmarks/results/calibration_rules-*)"
    )
    args = parser.parse_args()
    rules = args.rules.split(",")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}: {list(RULES)}")
    provenance = record()
    runs = held_out_runs(args.suites, args.recipe)
    summary = summarize(runs, rules)
    text = table(summary, rules)
    print(text)
    out = args.out or REPO / "benchmarks" / "results" / f"calibration_rules-{stamp()}.json"
    payload = {
        "benchmark": "benchmarks/calibration_rules.py",
        **provenance,
        "suites": [str(p) for p in args.suites],
        "recipe": args.recipe,
        "rules": rules,
        "summary": summary,
        "table": text,
    }
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
