"""End to end on real photos: compare ResNet-50, ResNet-101, the fused 50+101 network and the 50+101 ensemble.

Small and short so it stays within a few minutes on 2 cores: 64 px, the head stage only (fine-tuning a fused
network is tested on small models in test_ensemble_tta.py), and timed on PyTorch (the auto backend exports
every row and TTA variant to OpenVINO and ONNX first: minutes on an fp32 CPU; tested in test_backends.py).
The real measurement at the sources' resolution is in benchmarks/RESULTS.md and the README.
"""

from __future__ import annotations

import json
from pathlib import Path

from resfit.cli import main
from resfit.inference.classifier import Classifier, InferenceConfig


def test_compare_resnet50_resnet101_fused_and_ensemble_on_ants_and_bees(shared_dir, tmp_path, capsys):
    weights = shared_dir / "weights"
    out = tmp_path / "compare"
    code = main(
        [
            "compare",
            str(shared_dir / "data" / "hymenoptera"),
            "--models",
            "resnet50,resnet101,resnet50+resnet101",
            "--weights",
            f"resnet50={weights / 'resnet50-imagenette.pth'},resnet101={weights / 'resnet101-imagenette.pth'}",
            "--epochs",
            "0",
            "--backend",
            "torch",
            "--img-size",
            "64",
            "--quiet",
            "--latency-repeats",
            "3",
            "--throughput-batch",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    ensemble = next(name for name in rows if rows[name]["kind"] == "ensemble")
    assert {"resnet50", "resnet101", "resnet50+resnet101"} <= rows.keys()
    for row in rows.values():
        assert 0.5 < row["val"]["accuracy"] <= 1.0  # two classes: above chance from these sources
        assert row["latency"]["median_ms"] > 0 and row["parameters"] > 0 and row["file_bytes"] > 0
        assert set(row["tta"]) >= {"flip", "flip+multiscale"}
    # Each row says which source it started from, with the card's accuracy (74.3% and 74.4%).
    assert rows["resnet50"]["sources"][0]["card_val_top1"] == 0.7427
    assert rows["resnet101"]["sources"][0]["card_val_top1"] == 0.7442
    assert len(rows["resnet50+resnet101"]["sources"]) == 2
    assert rows["resnet50+resnet101"]["parameters"] > rows["resnet101"]["parameters"]
    markdown = (out / "report.md").read_text()
    assert "resnet50-imagenette.pth" in markdown and "resnet101-imagenette.pth" in markdown
    assert (out / "accuracy_vs_latency.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("|")
    # The ensemble and the fused model are run folders like any other.
    for name in (ensemble, "resnet50+resnet101"):
        classifier = Classifier.load(Path(rows[name]["run_dir"]), config=InferenceConfig(backend="torch"))
        photo = next((shared_dir / "data" / "hymenoptera" / "val" / "bees").iterdir())
        assert classifier.predict(photo, top_k=2)[0][0] in ("ants", "bees")
