"""End to end on real photos: fine-tune from the real pretrained source, then evaluate and predict.

Thresholds: the val split of ants/bees has 70 ants and 83 bees, so always answering "bees" scores 0.54.
The source's linear probe reaches about 0.71 at 112-160 px (../shared/README.md) and our head stage alone
0.71-0.75, so a run from the source must reach 0.68. Pretrained against scratch is judged on flowers5,
where 860 validation photos make a gap meaningful (ants/bees' 153 give a standard error of ~0.04): there
the head stage reaches 0.63 from the source and 0.53 from random weights (measured), so the source must
reach 0.55 (chance is 0.2) and beat scratch by 0.06.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resfit.train import TrainConfig, train

pytestmark = pytest.mark.slow
MAJORITY_BASELINE = 83 / 153


@pytest.fixture(scope="module")
def pretrained_run(shared_dir, module_tmp):
    run_dir = module_tmp("e2e") / "run"
    cmd = [
        sys.executable,
        "-m",
        "resfit",
        "train",
        str(shared_dir / "data" / "hymenoptera"),
        "--model",
        "resnet50",
        "--weights",
        str(shared_dir / "weights" / "resnet50-imagenette.pth"),
        "--epochs",
        "1",
        "--out",
        str(run_dir),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return run_dir, result.stdout


def test_run_folder_is_complete(pretrained_run):
    run_dir, stdout = pretrained_run
    for name in (
        "model.safetensors",
        "model.json",
        "metrics.json",
        "history.csv",
        "curves.png",
        "confusion_matrix.png",
        "data_report.json",
        "train_config.json",
        "resume/state.json",
    ):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["class_names"] == ["ants", "bees"]
    assert meta["preprocessing"]["crop_size"] == 112 and meta["preprocessing"]["mean"] == [
        0.485,
        0.456,
        0.406,
    ]
    assert meta["precision"] in ("bf16", "fp32")
    assert "device:" in stdout and "precision" in stdout
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["skipped"] == []
    assert any(entry["path"].endswith("imageNotFound.gif") for entry in report["converted"])


def test_pretrained_run_is_well_above_chance(pretrained_run):
    run_dir, _ = pretrained_run
    accuracy = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
    assert accuracy >= 0.68, accuracy
    assert accuracy > MAJORITY_BASELINE + 0.1


def test_pretrained_source_beats_scratch_on_flowers(shared_dir, tmp_path):
    """The same head-stage run from the source and from random weights, on 860 validation photos.

    Both at the source card's 112 px: from random weights the default size would be 224 px, four times the
    arithmetic (most of this test's time on a 2-core fp32 CPU) for a comparison that is not like for like."""
    data = str(shared_dir / "data" / "flowers5")
    common = dict(model="resnet50", epochs=0, img_size=112, quiet=True)
    source = str(shared_dir / "weights" / "resnet50-imagenette.pth")
    pretrained = train(
        TrainConfig(data=data, weights=source, out=str(tmp_path / "src"), **common), say=lambda _: None
    )
    scratch = train(
        TrainConfig(data=data, weights="none", out=str(tmp_path / "scratch"), **common), say=lambda _: None
    )
    assert pretrained.metrics["accuracy"] >= 0.55, pretrained.metrics["accuracy"]
    assert scratch.metrics["accuracy"] <= pretrained.metrics["accuracy"] - 0.06, (
        scratch.metrics["accuracy"],
        pretrained.metrics["accuracy"],
    )


def test_evaluate_reproduces_metrics_json(pretrained_run, shared_dir):
    """On training's backend (PyTorch) evaluate gives the same numbers; the fast default backend
    (OpenVINO bf16 where the CPU has native bf16) can move an image or two, and says so."""
    run_dir, _ = pretrained_run
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "resfit",
            "evaluate",
            str(run_dir),
            str(shared_dir / "data" / "hymenoptera"),
            "--json",
            "--backend",
            "torch",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "confusion_matrix", "per_class", "f1_macro", "num_images", "split"):
        assert evaluated[key] == saved[key], key
    assert evaluated["loss"] == pytest.approx(saved["loss"], abs=1e-5)


def test_predict_json_returns_class_names_and_reports_bad_files(pretrained_run, shared_dir, tmp_path):
    run_dir, _ = pretrained_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    val = shared_dir / "data" / "hymenoptera" / "val"
    files = [
        str(sorted((val / "ants").glob("*.jpg"))[0]),
        str(sorted((val / "bees").glob("*.jpg"))[0]),
        str(broken),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "resfit", "predict", str(run_dir), *files, "--json", "--top-k", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1  # one file failed, the others were still predicted
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    for line in lines[:2]:
        assert line["predicted"] in ("ants", "bees")
        assert [entry["class"] for entry in line["top_k"]] in (["ants", "bees"], ["bees", "ants"])
        assert sum(entry["probability"] for entry in line["top_k"]) == pytest.approx(1.0, abs=1e-4)
    assert lines[2]["path"] == str(broken) and "not an image" in lines[2]["error"]


def test_python_api_load_and_predict(pretrained_run, shared_dir):
    import resfit

    run_dir, _ = pretrained_run
    classifier = resfit.load(run_dir)
    image = sorted((shared_dir / "data" / "hymenoptera" / "val" / "bees").glob("*.jpg"))[0]
    top = classifier.predict(image, top_k=2)
    assert {name for name, _ in top} == {"ants", "bees"}
