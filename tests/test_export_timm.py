"""`resfit export --format timm`: timm's own create_model loads the folder, with the run's classes, preprocessing
and logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import train_tiny_run

from resfit.cli import main
from resfit.errors import ExportError
from resfit.export import ExportConfig, export_run
from resfit.export_timm import crop_pct
from resfit.inference.classifier import Classifier
from resfit.run_folder import RunFolder

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def tiny_run(tiny_imagefolder, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")


def test_timm_loads_the_folder_with_resfits_logits_classes_and_preprocessing(
    tiny_run, tiny_imagefolder, tmp_path, capsys
):
    out = tmp_path / "timm-folder"
    assert main(["export", str(tiny_run), "--format", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'timm.create_model("local-dir:{out.resolve()}", pretrained=True)' in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    meta = json.loads((tiny_run / RunFolder.MODEL_META).read_text())
    prep = meta["preprocessing"]
    assert model.pretrained_cfg["label_names"] == meta["class_names"] == ["blue", "red"]
    data_config = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_config["input_size"]) == (3, prep["crop_size"], prep["crop_size"])
    assert tuple(data_config["mean"]) == tuple(prep["mean"]) and tuple(data_config["std"]) == tuple(
        prep["std"]
    )
    assert data_config["interpolation"] == prep["interpolation"]
    assert math.floor(prep["crop_size"] / data_config["crop_pct"]) == prep["resize_size"]

    classifier = Classifier.load(tiny_run, backend="torch", precision="fp32")
    batch = classifier.preprocess(sorted((tiny_imagefolder / "val").rglob("*.png"))[:6])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch))
    assert torch.allclose(logits, torch.from_numpy(classifier.logits(batch)), atol=1e-5)
    # timm's own eval transform, from the config alone, gives the tensor resfit's does
    transform = timm.data.create_transform(**data_config)
    photo = sorted((tiny_imagefolder / "val").rglob("*.png"))[0]
    with Image.open(photo) as image:
        np.testing.assert_allclose(
            transform(image.convert("RGB")).numpy(), classifier.preprocess([photo])[0], atol=1e-5
        )


def test_the_temperature_is_folded_into_the_head(tiny_run, tiny_imagefolder, tmp_path):
    calibrated = tmp_path / "calibrated-run"
    calibrated.mkdir()
    for name in ("model.safetensors", RunFolder.MODEL_META):
        (calibrated / name).write_bytes((tiny_run / name).read_bytes())
    meta = json.loads((calibrated / RunFolder.MODEL_META).read_text())
    meta["temperature"] = 2.5
    (calibrated / RunFolder.MODEL_META).write_text(json.dumps(meta))
    out = tmp_path / "timm"
    export_run(ExportConfig(str(calibrated), "timm", out=str(out)), say=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert config["resfit"]["temperature"] == 2.5
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    classifier = Classifier.load(calibrated, backend="torch", precision="fp32")
    batch = classifier.preprocess(sorted((tiny_imagefolder / "val").rglob("*.png"))[:4])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, classifier.logits(batch), atol=1e-5)


def test_tta_and_models_timm_lacks_are_refused_clearly(tiny_run, tmp_path):
    with pytest.raises(ExportError, match="test-time augmentation"):
        export_run(
            ExportConfig(str(tiny_run), "timm", out=str(tmp_path / "t"), tta="flip"), say=lambda _: None
        )
    fused = tmp_path / "fused-run"
    fused.mkdir()
    meta = json.loads((tiny_run / RunFolder.MODEL_META).read_text())
    (fused / RunFolder.MODEL_META).write_text(json.dumps({**meta, "architecture": "resnet18+resnet34"}))
    (fused / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="timm has no counterpart of 'resnet18\\+resnet34'"):
        export_run(ExportConfig(str(fused), "timm", out=str(tmp_path / "f")), say=lambda _: None)
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()


def test_crop_pct_gives_back_the_resize_under_timms_floor():
    for crop in range(32, 400):
        for resize in range(crop, 2 * crop):
            assert math.floor(crop / crop_pct(crop, resize)) == resize


@pytest.mark.parametrize("architecture", ["resnet50", "resnet101", "resnext50_32x4d"])
def test_timm_names_every_tensor_as_torchvision_does(architecture):
    from resfit.models import build_model

    ours = build_model(architecture, 3).state_dict()
    theirs = timm.create_model(architecture, pretrained=False, num_classes=3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
