"""The accuracy suite's pure statistics: folds, subsamples, intervals, the summary. No training, no images."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SUITE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_suite.py"
_spec = importlib.util.spec_from_file_location("accuracy_suite", SUITE_PATH)
suite = importlib.util.module_from_spec(_spec)
sys.modules["accuracy_suite"] = suite  # dataclasses look their module up while the class is built
_spec.loader.exec_module(suite)


def labels_like_hymenoptera() -> list[str]:
    return ["ants"] * 194 + ["bees"] * 204


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_folds_cover_every_photo_exactly_once_and_are_stratified(k):
    labels = labels_like_hymenoptera() + ["wasps"] * 7  # a class smaller than some k
    fold_of = suite.stratified_folds(labels, k, seed=3)
    assert len(fold_of) == len(labels)
    assert set(fold_of) == set(
        range(k)
    )  # every fold used, each photo in exactly one (a list: one entry each)
    sizes = Counter(fold_of)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for name in set(labels):
        per_fold = Counter(f for f, label in zip(fold_of, labels, strict=True) if label == name)
        counts = [per_fold.get(f, 0) for f in range(k)]
        assert max(counts) - min(counts) <= 1, (name, counts)


def test_folds_depend_on_the_seed_and_only_on_it():
    labels = labels_like_hymenoptera()
    assert suite.stratified_folds(labels, 5, seed=0) == suite.stratified_folds(labels, 5, seed=0)
    assert suite.stratified_folds(labels, 5, seed=0) != suite.stratified_folds(labels, 5, seed=1)


def test_folds_need_two():
    with pytest.raises(ValueError):
        suite.stratified_folds(["a", "b"], 1, seed=0)


def test_subsample_keeps_at_most_n_per_class_without_repeats():
    labels = ["daisy"] * 50 + ["rose"] * 8 + ["tulip"] * 30
    keep = suite.stratified_subsample(labels, 20, seed=0)
    assert keep == sorted(set(keep))
    assert Counter(labels[i] for i in keep) == {"daisy": 20, "rose": 8, "tulip": 20}
    assert keep == suite.stratified_subsample(labels, 20, seed=0)


def test_paired_t_interval_matches_scipy():
    a = np.array([0.81, 0.77, 0.85, 0.79, 0.83])
    b = np.array([0.78, 0.75, 0.80, 0.80, 0.79])
    diffs = a - b
    result = suite.t_interval(diffs)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert result["mean"] == pytest.approx(0.026)
    assert (result["low"], result["high"]) == (pytest.approx(low), pytest.approx(high))
    assert result["df"] == 4
    # The same as scipy's paired t-test: the interval excludes 0 exactly when p < 0.05.
    p = stats.ttest_rel(a, b).pvalue
    assert (result["low"] > 0) == (p < 0.05)


def test_corrected_interval_widens_by_the_nadeau_bengio_factor():
    diffs = np.array([0.02, -0.01, 0.04, 0.03, 0.00])
    plain = suite.t_interval(diffs)
    corrected = suite.t_interval(diffs, correction=1 / 4)  # 5-fold: n_test / n_train = 1/4
    factor = math.sqrt((1 / 5 + 1 / 4) / (1 / 5))
    assert corrected["mean"] == plain["mean"]
    assert corrected["high"] - corrected["mean"] == pytest.approx((plain["high"] - plain["mean"]) * factor)


def test_interval_of_one_value_is_undefined():
    assert suite.t_interval([0.7]) == {"mean": 0.7, "low": None, "high": None, "n": 1, "df": None}


def test_bootstrap_over_photos_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    differences = rng.choice([-1, 0, 0, 1, 1], size=(400, 2)).astype(float)
    result = suite.paired_bootstrap(differences, reps=500, seed=1)
    assert result["low"] < result["mean"] < result["high"]
    assert result["mean"] == pytest.approx(differences.mean())
    # ~ the normal approximation for a mean of 400 photo-level differences
    se = differences.mean(axis=1).std(ddof=1) / math.sqrt(400)
    assert result["high"] - result["low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert result == suite.paired_bootstrap(differences, reps=500, seed=1)


def fake_row(recipe: str, fold: int, correct: list[int], wall: float) -> dict:
    items = [f"set/photo{fold}-{i}.jpg" for i in range(len(correct))]
    return {
        "dataset": "hymenoptera",
        "repeat": 0,
        "fold": fold,
        "recipe": recipe,
        "n_test": len(correct),
        "n_outer_train": 3 * len(correct),
        "test_correct": sum(correct),
        "test_acc": sum(correct) / len(correct),
        "test_items": items,
        "correct": correct,
        "wall_s": wall,
    }


def test_summary_pairs_recipes_on_the_same_folds():
    rows = []
    for fold in range(4):
        base = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
        better = base.copy()
        better[(2, 4)[fold % 2]] = 1  # one more photo right on every fold
        rows.append(fake_row("resfit", fold, better, wall=10.0))
        rows.append(fake_row("timm", fold, base, wall=20.0))
    rows.append(fake_row("resfit", 4, [1] * 10, wall=10.0))  # a fold timm has not run yet: not paired
    summary = suite.summarize(rows)["hymenoptera"]
    assert summary["recipes"]["resfit"]["fold_runs"] == 5
    assert summary["recipes"]["timm"]["pooled_accuracy"] == pytest.approx(0.7)
    (pair,) = summary["pairs"]
    assert (pair["a"], pair["b"], pair["fold_runs"]) == ("resfit", "timm", 4)
    assert pair["difference"]["mean"] == pytest.approx(0.1)
    # Every fold differs by exactly one photo: zero variance, so the interval is the point.
    assert pair["difference"]["low"] == pytest.approx(0.1)
    assert pair["a_better_folds"] == 4 and pair["b_better_folds"] == 0
    assert pair["wall_ratio"] == pytest.approx(0.5)
    assert pair["bootstrap_photos"]["mean"] == pytest.approx(0.1)
    table = suite.markdown_tables(suite.summarize(rows))
    assert "| resfit - timm | 4 |" in table


def test_summary_reports_how_far_fine_tuning_falls_below_its_probe():
    def history(probe: float, tuned: list[float]) -> list[dict]:
        return [{"stage": "head", "val_acc": probe}] + [{"stage": "finetune", "val_acc": v} for v in tuned]

    rows = [
        fake_row("resfit", 0, [1] * 10, wall=10.0) | {"history": history(0.70, [0.60, 0.75, 0.80])},
        fake_row("resfit", 1, [1] * 10, wall=10.0) | {"history": history(0.70, [0.69, 0.72])},
        fake_row("resfit-probe", 0, [1] * 10, wall=1.0) | {"history": history(0.70, [])},
        # timm's loop has no head stage: its history rows carry no "stage" (once a KeyError mid-suite)
        fake_row("timm", 0, [1] * 10, wall=20.0)
        | {"history": [{"epoch": 1, "val_acc": 0.6, "seconds": 1.0}]},
    ]
    recipes = suite.summarize(rows)["hymenoptera"]["recipes"]
    dip = recipes["resfit"]["fine_tuning_dip"]
    assert dip["fold_runs"] == 2 and dip["runs_over_2_points"] == 1  # 10 points below, then 1
    assert dip["worst_epoch_mean"] == pytest.approx(5.5) and dip["worst_epoch_max"] == pytest.approx(10.0)
    assert dip["first_epoch_mean"] == pytest.approx(5.5)
    # Per epoch over the runs that reached it: (10 + 1) / 2, (-5 - 2) / 2, then the first run's -10 alone.
    assert dip["epoch_means"] == pytest.approx([5.5, -3.5, -10.0])
    assert dip["mean_curve_worst"] == {"epoch": 1, "points": pytest.approx(5.5), "fold_runs": 2}
    assert "fine_tuning_dip" not in recipes["resfit-probe"]  # no fine-tuning epoch, nothing to report
    assert "fine_tuning_dip" not in recipes["timm"] and recipes["timm"]["fold_runs"] == 1
    assert [e["n"] for e in dip["mean_curve"]] == [2, 2, 1]
    assert dip["mean_curve"][0]["low"] < 5.5 < dip["mean_curve"][0]["high"]
    assert dip["mean_curve"][2]["low"] is None  # one run reached epoch 3: no interval
    line = "| resfit | 2 | 5.5, 10.0 | 5.5 | 1 | 5.5 [-51.7, 62.7] (epoch 1); last -10.0 |"
    assert line in suite.markdown_tables(suite.summarize(rows))


def test_summary_says_where_each_recipes_wall_time_goes():
    """Head stage, one fine-tuning epoch (timm's epochs carry no stage) and what lies outside the epochs."""

    def row(recipe: str, fold: int, wall: float, history: list[dict]) -> dict:
        return fake_row(recipe, fold, [1] * 10, wall=wall) | {"history": history}

    head = {"stage": "head", "val_acc": 0.7, "seconds": 6.0}
    rows = [
        row("resfit", 0, 50.0, [head] + [{"stage": "finetune", "val_acc": 0.7, "seconds": 12.0}] * 3),
        row("resfit", 1, 60.0, [head] + [{"stage": "finetune", "val_acc": 0.7, "seconds": 14.0}] * 2),
        row("timm", 0, 40.0, [{"epoch": e, "val_acc": 0.6, "seconds": 13.0} for e in (1, 2, 3)]),
        row("resfit-probe", 0, 10.0, [head]),
    ]
    recipes = suite.summarize(rows)["hymenoptera"]["recipes"]
    # resfit: outside = 50 - 42 and 60 - 34; epochs 12, 12, 12, 14, 14 -> median 12
    assert recipes["resfit"]["time_split"] == {
        "head_s": 6.0,
        "epoch_s": 12.0,
        "epochs": 2.5,
        "outside_epochs_s": 17.0,
    }
    assert recipes["timm"]["time_split"] == {
        "head_s": None,
        "epoch_s": 13.0,
        "epochs": 3.0,
        "outside_epochs_s": 1.0,
    }
    assert (
        recipes["resfit-probe"]["time_split"]["epochs"] == 0
        and recipes["resfit-probe"]["time_split"]["epoch_s"] is None
    )
    table = suite.markdown_tables(suite.summarize(rows))
    assert "| resfit | 6.0 | 12.0 | 2.5 | 17.0 |" in table and "| timm | - | 13.0 | 3 | 1.0 |" in table


def test_reused_rows_take_only_the_named_recipes_and_repeats_of_the_same_settings(tmp_path):
    settings = {
        **{key: 1 for key in suite.SETTINGS_THAT_DECIDE},
        "recipes": {"resfit": {}, "resfit-lr1e-4": {}},
        "first_repeat": 0,
        "repeats": 1,
    }
    rows = [fake_row("resfit", 0, [1, 0], 1.0), fake_row("resfit-frozen3", 0, [1, 1], 1.0)]
    rows.append({**fake_row("resfit", 1, [0, 0], 1.0), "repeat": 1})  # a repeat this suite does not run
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"settings": settings, "rows": rows, "commit": "abc"}))
    reused, commit = suite.reused_rows(earlier, settings, "resfit")
    assert [(r["recipe"], r["repeat"], r["reused_from"]) for r in reused] == [("resfit", 0, str(earlier))]
    assert commit == "abc"
    with pytest.raises(SystemExit, match="epochs"):
        suite.reused_rows(earlier, {**settings, "epochs": 6}, "resfit")
    with pytest.raises(SystemExit, match="not among"):
        suite.reused_rows(earlier, settings, "resfit-frozen3")
    # "resfit" means resfit's defaults: rows run under other defaults (or before they were recorded) stay
    with pytest.raises(SystemExit, match="train_defaults"):
        suite.reused_rows(earlier, {**settings, "train_defaults": suite.train_defaults()}, "resfit")
    assert suite.train_defaults()["ema"] is True and "data" not in suite.train_defaults()
    # empty, truncated, wrong type, rows that are not fold runs
    for broken in ("", '{"settings": {}', "[1, 2]", '{"rows": []}', '{"settings": {}, "rows": [1, 2]}'):
        earlier.write_text(broken)
        with pytest.raises(SystemExit, match="not a readable suite result file"):
            suite.reused_rows(earlier, settings, "resfit")


def test_suites_of_other_seeds_pool_into_one_summary_and_no_fold_run_counts_twice(tmp_path):
    settings = {key: 1 for key in suite.SETTINGS_THAT_DECIDE}

    def suite_file(name: str, repeat: int, rows_settings: dict = settings) -> Path:
        rows = [
            {**fake_row(recipe, fold, correct, 1.0), "repeat": repeat}
            for fold in range(2)
            for recipe, correct in (("resfit", [1, 1, 0]), ("resfit-probe", [1, 0, 0]), ("timm", [0, 0, 0]))
        ]
        path = tmp_path / name
        path.write_text(json.dumps({"settings": rows_settings, "rows": rows}))
        return path

    seed0, seed1 = suite_file("seed0.json", 0), suite_file("seed1.json", 1)
    pooled = suite.summarize(suite.pooled_rows([seed0, seed1]))["hymenoptera"]
    assert pooled["recipes"]["resfit"]["fold_runs"] == 4
    pairs = {(pair["a"], pair["b"]): pair for pair in pooled["pairs"]}
    assert pairs[("resfit", "resfit-probe")]["fold_runs"] == 4
    probe_vs_peer = pairs[("resfit-probe", "timm")]
    assert probe_vs_peer["difference"]["mean"] == pytest.approx(1 / 3)
    with pytest.raises(SystemExit, match="both hold the fold run"):
        suite.pooled_rows([seed0, suite_file("again.json", 0)])
    with pytest.raises(SystemExit, match="other settings.*flowers_per_class"):
        suite.pooled_rows([seed0, suite_file("other.json", 1, {**settings, "flowers_per_class": 200})])


def test_runs_of_one_recipe_can_be_counted_as_anothers_and_still_only_once(tmp_path):
    settings = {key: 1 for key in suite.SETTINGS_THAT_DECIDE}

    def suite_file(name: str, repeat: int, recipes: tuple[str, ...]) -> Path:
        rows = [
            {**fake_row(recipe, fold, [1, 1, 0], 1.0), "repeat": repeat}
            for fold in range(2)
            for recipe in recipes
        ]
        path = tmp_path / name
        path.write_text(json.dumps({"settings": settings, "rows": rows}))
        return path

    seed0 = suite_file("seed0.json", 0, ("resfit", "resfit-ema"))
    seed1 = suite_file("seed1.json", 1, ("resfit", "resfit-ema-no-stop"))
    rename = {"resfit-ema": "resfit-ema-no-stop"}
    pooled = suite.summarize(suite.pooled_rows([seed0, seed1], rename))["hymenoptera"]
    assert set(pooled["recipes"]) == {"resfit", "resfit-ema-no-stop"}
    assert pooled["recipes"]["resfit-ema-no-stop"]["fold_runs"] == 4
    # Unrenamed, the two stay apart; renamed, a fold run both recipes hold would count twice: refused.
    apart = suite.summarize(suite.pooled_rows([seed0, seed1]))["hymenoptera"]["recipes"]
    assert apart["resfit-ema"]["fold_runs"] == 2
    both = suite_file("both.json", 1, ("resfit-ema", "resfit-ema-no-stop"))
    with pytest.raises(SystemExit, match="both hold the fold run"):
        suite.pooled_rows([both], rename)


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, SUITE_PATH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dip_noise_gives_the_exact_chance_an_equally_accurate_model_scores_below_its_probe():
    dip_noise = _benchmark("dip_noise")
    assert dip_noise.photos_beyond(2.0, 53) == 2  # one photo is 1.9 points: "more than 2" is two photos
    assert dip_noise.photos_beyond(2.0, 200) == 5
    # 2 val photos, both disagreed on: the fine-tuned model loses both (so is > 2 points below) 1 time in 4.
    assert dip_noise.chance_of_dip(2, 1.0) == pytest.approx(0.25)
    assert dip_noise.chance_of_dip(53, 0.0) == 0.0  # a model that agrees on every photo never dips
    rng = np.random.default_rng(0)
    disagree = rng.binomial(53, 0.15, 100_000)
    simulated = float(((disagree - 2 * rng.binomial(disagree, 0.5)) >= 2).mean())
    assert dip_noise.chance_of_dip(53, 0.15) == pytest.approx(simulated, abs=0.01)
    worst = dip_noise.worst_of_epochs(53, 0.15, epochs=6)
    assert worst["share_beyond_2_points"] > dip_noise.chance_of_dip(53, 0.15)  # six tries dip more often


def test_output_ensemble_scores_the_average_of_two_recipes_on_the_same_test_photos(tmp_path):
    ensemble = _benchmark("output_ensemble")
    labels = [0, 1, 0, 1]
    # a is sure and right on photos 0-1 and barely wrong on 2-3; b the other way round: each alone gets 2
    # of 4, their average gets all 4.
    a = [[0.9, 0.1], [0.1, 0.9], [0.45, 0.55], [0.55, 0.45]]
    b = [[0.45, 0.55], [0.55, 0.45], [0.9, 0.1], [0.1, 0.9]]

    def row(recipe, probs, fold):
        held_out = {"test": {"labels": labels, "logprobs": np.log(probs).tolist()}}
        return {
            "dataset": "hymenoptera",
            "seed": 0,
            "fold": fold,
            "recipe": recipe,
            "n_outer_train": 8,
            "held_out_logprobs": held_out,
        }

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"rows": [row("resfit", a, 0), row("resfit", a, 1)]}))
    second.write_text(json.dumps({"rows": [row("resfit-probe", b, 0)]}))  # fold 1 has only a: left out
    runs = ensemble.paired_runs(
        ensemble.test_outputs([first, second], "resfit"),
        ensemble.test_outputs([first, second], "resfit-probe"),
    )
    assert len(runs) == 1 and runs[0]["correct"] == {"a": 2, "b": 2, "ensemble": 4}
