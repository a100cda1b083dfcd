"""The fused 50+101-style network, the late-fusion ensemble and test-time augmentation, on tiny synthetic runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import resfit
from resfit.cli import main
from resfit.data.transforms import Preprocessing
from resfit.ensemble import build_ensemble, choose_weights
from resfit.errors import ConfigError, WeightsError
from resfit.export import ExportConfig, export_run
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.model_wrappers import TTAWrapper, tta_sizes
from resfit.models import (
    FusedResNet,
    apply_pretrained,
    build_model,
    layerwise_param_groups,
    load_pretrained,
)
from resfit.run_folder import build_model_meta, load_model, write_model

EXACT = InferenceConfig(backend="torch", precision="fp32")


def _train(data: Path, out: Path, model: str = "resnet18", seed: int = 0, **extra) -> Path:
    """Head-only (epochs 0) at 42 px: resize 48, so a centre crop removes 3 px each side (symmetric)."""
    if not (out / "model.json").is_file():
        settings = dict(weights="none", epochs=0, img_size=42, batch_size=8, num_workers=0, quiet=True)
        config = resfit.TrainConfig(
            data=str(data), model=model, seed=seed, out=str(out), **(settings | extra)
        )
        resfit.train(config, say=lambda _: None)
    return out


@pytest.fixture(scope="module")
def runs(tiny_imagefolder, module_tmp) -> dict[str, Path]:
    base = module_tmp("ensemble-runs")
    return {
        "a": _train(tiny_imagefolder, base / "a", seed=0),
        "b": _train(tiny_imagefolder, base / "b", seed=1),
    }


def _symmetric_image(size: int = 48) -> Image.Image:
    left = np.random.default_rng(3).integers(0, 255, size=(size, size // 2, 3), dtype=np.uint8)
    return Image.fromarray(np.concatenate([left, left[:, ::-1]], axis=1))


# -- the fused network ---------------------------------------------------------------------------


def test_fused_model_forward_backward_trains_both_backbones():
    model = build_model("resnet18+resnet34", num_classes=3, dropout=0.2)
    assert isinstance(model, FusedResNet) and model.fc.in_features == 512 + 512
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    groups = layerwise_param_groups(model, head_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    lrs = {g["block"]: g["lr"] for g in groups}
    # Each backbone gets its own, identical layer-wise profile under the shared head.
    assert lrs["resnet18.stem"] == lrs["resnet34.stem"] == pytest.approx(1e-3 * 0.5**5)
    assert lrs["resnet18.layer4"] == lrs["resnet34.layer4"] == pytest.approx(1e-3 * 0.5)
    assert lrs["head"] == 1e-3


def test_fused_model_loads_one_source_per_backbone(tmp_path):
    files = []
    for arch in ("resnet18", "resnet34"):
        source_model = build_model(arch, 10)
        torch.save(source_model.state_dict(), tmp_path / f"{arch}.pth")
        files.append((source_model, tmp_path / f"{arch}.pth"))
    model = build_model("resnet18+resnet34", 4)
    source = load_pretrained("resnet18+resnet34", ",".join(str(path) for _, path in files))
    apply_pretrained(model, source)
    for backbone, (source_model, _) in zip(model.backbones, files, strict=True):
        assert torch.equal(backbone.layer3[0].conv1.weight, source_model.layer3[0].conv1.weight)
    assert source.to_dict()["kind"] == "fused" and len(source.to_dict()["members"]) == 2
    with pytest.raises(ConfigError, match="needs 2 weights"):
        load_pretrained("resnet18+resnet34", f"{files[0][1]},{files[1][1]},{files[1][1]}")
    with pytest.raises(WeightsError, match="do not match"):  # the sources in the wrong order
        apply_pretrained(model, load_pretrained("resnet18+resnet34", f"{files[1][1]},{files[0][1]}"))


def test_fused_model_save_load_round_trip(tmp_path):
    model = build_model("resnet18+resnet34", 2).eval()
    preprocessing = Preprocessing.for_size(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    write_model(tmp_path, model, build_model_meta("resnet18+resnet34", ["x", "y"], preprocessing, 0.0))
    loaded, meta = load_model(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))
    assert meta["architecture"] == "resnet18+resnet34" and meta["tta"] == "none"


def test_fused_model_fine_tunes_end_to_end(tiny_imagefolder, tmp_path):
    run = _train(tiny_imagefolder, tmp_path / "fused", model="resnet18+resnet34", epochs=1)
    history = (run / "history.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in history[1:]] == ["head", "finetune"]
    classifier = Classifier.load(run, config=EXACT)
    assert classifier.predict(_symmetric_image())[0][0] in ("blue", "red")


# -- test-time augmentation ----------------------------------------------------------------------


def test_flip_tta_of_a_symmetric_image_changes_nothing(runs):
    image = _symmetric_image()
    plain = Classifier.load(runs["a"], config=EXACT).predict_proba([image])
    flipped = Classifier.load(
        runs["a"], config=InferenceConfig(backend="torch", precision="fp32", tta="flip")
    )
    assert flipped.meta["tta"] == "flip"
    np.testing.assert_allclose(flipped.predict_proba([image]), plain, rtol=0, atol=1e-6)


def test_flip_tta_averages_the_two_orientations(runs):
    model, _ = load_model(runs["a"])
    tta, meta = load_model(runs["a"], tta="flip")
    images = torch.randn(4, 3, 42, 42)
    with torch.inference_mode():
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        np.testing.assert_allclose(tta(images).exp(), expected, atol=1e-6)
    assert meta["preprocessing"] == meta["base_preprocessing"]


def test_multiscale_tta_takes_a_larger_crop_of_the_same_view(runs):
    model, meta = load_model(runs["a"], tta="flip+multiscale")
    assert isinstance(model, TTAWrapper)
    base = meta["base_preprocessing"]
    assert meta["tta_sizes"] == tta_sizes("multiscale", base["crop_size"]) == [37, 42, 48]
    assert meta["preprocessing"]["crop_size"] == 48
    # Same field of view: the crop/resize ratio is kept.
    ratio = meta["preprocessing"]["resize_size"] / meta["preprocessing"]["crop_size"]
    assert ratio == pytest.approx(base["resize_size"] / base["crop_size"], rel=0.05)
    images = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        probs = model(images).exp()
        views = [images]
        for size in (37, 42):
            views.append(
                nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
            )
        views += [view.flip(-1) for view in views]
        expected = sum(model.model(view).softmax(1) for view in views) / len(views)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)


def test_tta_stored_at_training_is_used_everywhere_and_can_be_overridden(tiny_imagefolder, tmp_path):
    run = _train(tiny_imagefolder, tmp_path / "tta-run", tta="flip")
    assert json.loads((run / "model.json").read_text())["tta"] == "flip"
    assert Classifier.load(run, config=EXACT).meta["tta"] == "flip"
    assert Classifier.load(run, config=InferenceConfig(backend="torch", tta="none")).meta["tta"] == "none"
    with pytest.raises(ConfigError, match="unknown --tta"):
        load_model(run, tta="rotate")


def test_tta_exports_to_onnx_with_the_same_probabilities(runs, tmp_path):
    result = export_run(
        ExportConfig(str(runs["a"]), "onnx", out=str(tmp_path / "tta.onnx"), tta="flip+multiscale"),
        say=lambda _: None,
    )
    assert result.parity.top1_agreement == 1.0 and result.parity.max_abs_logit_diff < 1e-4


# -- the late-fusion ensemble --------------------------------------------------------------------


def test_ensemble_behaves_as_one_model(runs, tmp_path):
    out = tmp_path / "ens"
    result = build_ensemble([runs["a"], runs["b"]], out, say=lambda _: None)
    assert result.weights == [0.5, 0.5]
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "ensemble" and [m["weight"] for m in meta["members"]] == [0.5, 0.5]
    assert (out / "metrics.json").is_file() and (out / "confusion_matrix.png").is_file()
    images = [_symmetric_image(), Image.open(next((Path(meta["data"]["path"]) / "val" / "red").iterdir()))]
    members = [Classifier.load(runs[k], config=EXACT).predict_proba(images) for k in "ab"]
    ensemble = Classifier.load(out, config=EXACT)
    np.testing.assert_allclose(ensemble.predict_proba(images), (members[0] + members[1]) / 2, atol=1e-6)
    # evaluate, predict and export take it like any run folder.
    assert main(["evaluate", str(out), meta["data"]["path"], "--backend", "torch", "--json"]) == 0
    assert main(["predict", str(out), str(Path(meta["data"]["path"]) / "val"), "--backend", "torch"]) == 0
    parity = export_run(ExportConfig(str(out), "onnx"), say=lambda _: None).parity
    assert parity.top1_agreement == 1.0


def test_ensemble_weights_chosen_on_validation_prefer_the_better_member():
    labels = np.array([0, 1, 0, 1])
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7]])
    bad = np.full((4, 2), 0.5)
    weights = choose_weights([bad, good], labels)
    assert weights[1] > weights[0] and sum(weights) == pytest.approx(1.0)


def test_ensemble_refuses_runs_with_different_classes(runs, tiny_imagefolder, tmp_path, capsys):
    other_data = tmp_path / "other"
    shutil.copytree(tiny_imagefolder, other_data)
    for split in ("train", "val"):
        (other_data / split / "red").rename(other_data / split / "green")
    other = _train(other_data, tmp_path / "other-run")
    with pytest.raises(ConfigError, match="class lists differ.*only in"):
        build_ensemble([runs["a"], other], tmp_path / "bad", say=lambda _: None)
    assert main(["ensemble", str(runs["a"]), str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "class lists differ" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "model.json").exists()
