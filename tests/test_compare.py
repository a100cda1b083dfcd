"""`resfit compare`: every row measured and reported with its source; clear one-line errors; weights per model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_export import train_tiny_run

from resfit.cli import build_parser, main
from resfit.compare import CompareConfig, compare
from resfit.compare.command import ModelPlan, describe_sources, obtain_run, weights_for, weights_per_backbone
from resfit.compare.report import source_label
from resfit.errors import ConfigError, WeightsError
from resfit.inference.classifier import InferenceConfig
from resfit.train import TrainConfig

TINY_RECIPE = [
    "--weights",
    "none",
    "--epochs",
    "0",
    "--img-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
]


@pytest.fixture(scope="module")
def two_runs(tiny_imagefolder, module_tmp) -> list[Path]:
    base = module_tmp("compare-runs")
    return [
        train_tiny_run(tiny_imagefolder, base / name, seed) for name, seed in (("tiny-a", 0), ("tiny-b", 1))
    ]


def test_compare_reports_every_row_with_its_source(two_runs, tiny_imagefolder, tmp_path):
    out = tmp_path / "cmp"
    config = CompareConfig(
        data=str(tiny_imagefolder),
        models=[str(run) for run in two_runs],
        out=str(out),
        inference=InferenceConfig(backend="torch"),  # no export step
        # A short protocol keeps the test to seconds; the defaults (30 calls, batch 32) are for real runs.
        latency_warmup=1,
        latency_repeats=3,
        throughput_batch=4,
        throughput_warmup=1,
        throughput_repeats=2,
        train=TrainConfig(quiet=True),
    )
    result = compare(config, say=lambda _: None)

    assert [row.name for row in result.rows] == ["tiny-a", "tiny-b", "ensemble-tiny-a+tiny-b"]
    assert [row.kind for row in result.rows] == ["single", "single", "ensemble"]
    for path in ("report.md", "report.json", "accuracy_vs_latency.png"):
        assert (out / path).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    for row in report["rows"]:
        assert 0.5 <= row["val"]["accuracy"] <= 1.0  # a learnable toy set: above chance
        assert row["val"]["num_images"] == 12 and row["val"]["f1_macro"] > 0
        assert row["val"]["top5_accuracy"] is None  # two classes: no top-5
        assert set(row["tta"]) == {"flip", "flip+multiscale"}
        for mode in row["tta"].values():
            assert 0 <= mode["val_accuracy"] <= 1 and mode["latency"]["median_ms"] > 0
        assert row["latency"]["median_ms"] > 0 and row["latency"]["repeats"] == 3
        assert row["latency"]["batch_size"] == 1
        assert row["throughput"]["images_per_s"] > 0 and row["throughput"]["batch_size"] == 4
        assert (
            row["parameters"] > 11_000_000
            and row["flops"] > 0
            and row["gmacs"] == pytest.approx(row["gflops"] / 2)
        )
        assert row["file_bytes"] > 40_000_000 and row["crop_size"] == 32
        assert row["train_seconds"] > 0
        assert row["sources"] and all(source["kind"] == "none" for source in row["sources"])
        assert "backend torch" in row["backend"] and row["threads"] >= 1
    ensemble = report["rows"][2]
    assert len(ensemble["sources"]) == 2
    assert ensemble["parameters"] == sum(row["parameters"] for row in report["rows"][:2])
    assert ensemble["train_seconds"] > sum(row["train_seconds"] for row in report["rows"][:2])
    assert report["how_measured"]["latency"]["timed_calls"] == 3

    markdown = (out / "report.md").read_text()
    assert result.table in markdown
    assert markdown.count("none (from scratch)") >= 3  # every row states where its weights came from
    for heading in (
        "## Starting weights",
        "## How measured",
        "GMACs = FLOPs / 2",
        "median of 3 timed calls",
    ):
        assert heading in markdown
    assert len(result.table.splitlines()) == 2 + 3


def test_compare_cli_trains_a_model_and_prints_the_table(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", str(tiny_imagefolder), "--models", "resnet18", "--out", str(out), "--backend", "torch"]
    argv += ["--latency-repeats", "3", "--throughput-batch", "4"]  # seconds; the defaults are 30 and 32
    assert main(argv + TINY_RECIPE + ["--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "training resnet18" in printed
    assert "no ensemble" in printed  # one single-architecture run is not enough
    assert printed.splitlines()[-1].startswith("| resnet18 |")  # the table is printed last
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["origin"] == "trained here" and row["train_seconds_how"] == "RunResult.seconds"
    assert row["latency"]["repeats"] == 3 and row["throughput"]["batch_size"] == 4
    defaults = build_parser().parse_args(["compare", "DATA"])
    assert (defaults.latency_repeats, defaults.throughput_batch, defaults.backend) == (30, 32, "auto")
    run_dir = out / "runs" / "resnet18"
    assert (run_dir / "metrics.json").is_file()

    # A rerun reuses the finished run instead of retraining it, and refuses one of another recipe.
    recipe = TrainConfig(data=str(tiny_imagefolder), weights="none", epochs=0, img_size=32, batch_size=8)
    plan = ModelPlan("resnet18", run_dir, architecture="resnet18", weights="none")
    said = []
    assert (
        obtain_run(plan, replace(recipe, model="resnet18"), {}, out, said.append) == "reused from this folder"
    )
    assert "reused" in said[0]
    changed = TINY_RECIPE[:3] + ["1"] + TINY_RECIPE[4:]  # --epochs 1
    assert main(argv + changed) == 2
    assert "epochs=0" in capsys.readouterr().err


def test_compare_unknown_model_is_one_line_exit_2(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        ["compare", str(tiny_imagefolder), "--models", "resnet18,resnet999", "--out", str(out)] + TINY_RECIPE
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "resnet999" in err and err.startswith("resfit: error:")
    assert not out.exists()  # nothing trained before the error


def test_compare_missing_run_folder_is_one_line(tmp_path, capsys):
    code = main(["compare", str(tmp_path), "--models", str(tmp_path / "no-such-run")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "not a run folder" in err


def test_weights_per_model(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    models = ["resnet50", "resnet101", "resnet50+resnet101"]
    per_backbone = weights_per_backbone(f"resnet50={a},resnet101={b}", models)
    assert [weights_for(m, per_backbone) for m in models] == [str(a), str(b), f"{a},{b}"]
    per_backbone = weights_per_backbone("none", models)
    assert [weights_for(m, per_backbone) for m in models] == ["none", "none", "none"]
    assert weights_for("resnet50+resnet101", weights_per_backbone("imagenet", models)) == "imagenet"

    with pytest.raises(ConfigError, match="no source for resnet101"):
        weights_per_backbone(f"resnet50={a}", models)
    with pytest.raises(ConfigError, match="resnet152, which no model"):
        weights_per_backbone(f"resnet50={a},resnet101={b},resnet152={a}", models)
    with pytest.raises(ConfigError, match="arch=FILE pairs"):
        weights_per_backbone(str(a), models)
    with pytest.raises(WeightsError, match="not found"):
        weights_per_backbone(f"resnet50={tmp_path / 'missing.pth'},resnet101={b}", models)


def test_sources_name_the_weights_and_card_accuracy_of_every_backbone():
    card = {"file": "resnet50-imagenette.pth", "sha256": "9ba2b8d8", "val_top1": 0.7427, "architecture": "x"}
    file_source = {"kind": "file", "description": "../shared/weights/resnet50-imagenette.pth", "card": card}
    single = {"architecture": "resnet50", "pretrained": file_source}
    [source] = describe_sources(single)
    assert source_label(source) == "resnet50-imagenette.pth (card val top-1 74.3%)"

    card101 = dict(card, file="resnet101-imagenette.pth", val_top1=0.7441)
    fused = {
        "architecture": "resnet50+resnet101",
        "pretrained": {
            "kind": "fused",
            "description": "both",
            "members": [file_source, dict(file_source, card=card101)],
        },
    }
    assert [(s["architecture"], s["card_val_top1"]) for s in describe_sources(fused)] == [
        ("resnet50", 0.7427),
        ("resnet101", 0.7441),
    ]
    ensemble = {
        "architecture": "ensemble",
        "members": [
            {"run_dir": "a", "architecture": "resnet50", "pretrained": file_source, "weight": 0.5},
            {"run_dir": "b", "architecture": "resnet18", "pretrained": {"kind": "none"}, "weight": 0.5},
        ],
    }
    labels = [source_label(s) for s in describe_sources(ensemble)]
    assert labels == ["resnet50-imagenette.pth (card val top-1 74.3%)", "none (from scratch)"]
