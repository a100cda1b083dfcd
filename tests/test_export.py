"""Export to ONNX, OpenVINO IR and TorchScript: same top-1 as PyTorch on images, metadata inside, clear errors.

The real-run fixtures here (a ResNet-50 head fitted on ants/bees from the Imagenette source) are shared
with test_serve.py and test_page_browser.py: the run is trained once per session into the session's
base temp folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import resfit
from resfit.cli import main
from resfit.errors import RunFolderError
from resfit.export import ExportConfig, ExportError, export_run
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.inference.formats import load_exported, read_onnx_metadata

HYMENOPTERA = ("data", "hymenoptera")


def train_tiny_run(data: Path, out: Path, seed: int = 0) -> Path:
    """A resnet18 head fitted on the synthetic red/blue images at 32 px: seconds, for unit tests."""
    if not (out / "model.json").is_file():
        config = resfit.TrainConfig(
            data=str(data),
            model="resnet18",
            weights="none",
            epochs=0,
            img_size=32,
            batch_size=8,
            num_workers=0,
            seed=seed,
            quiet=True,
            out=str(out),
        )
        resfit.train(config, say=lambda _: None)
    return out


def train_real_run(shared_dir: Path, base: Path) -> Path:
    """ResNet-50 from the Imagenette source, head stage only (~20 s), once per test session."""
    out = base / "deploy-real-resnet50"
    if not (out / "model.json").is_file():
        config = resfit.TrainConfig(
            data=str(shared_dir.joinpath(*HYMENOPTERA)),
            model="resnet50",
            weights=str(shared_dir / "weights" / "resnet50-imagenette.pth"),
            epochs=0,
            num_workers=0,
            quiet=True,
            out=str(out),
        )
        resfit.train(config, say=lambda _: None)
    return out


def real_run_cache(base: Path) -> Path:
    """One export cache for the real run across the session: its int8 verdict (minutes on a CPU without
    native bf16) and its exports are reached once, by whichever test comes first."""
    return base / "real-run-cache"


def confident_val_images(
    classifier: Classifier, shared_dir: Path, per_class: int = 1
) -> list[tuple[Path, str]]:
    """Validation photos the model gets right with the widest margin: (path, true class) per class."""
    chosen = []
    for name in classifier.class_names:
        paths = sorted(shared_dir.joinpath(*HYMENOPTERA, "val", name).glob("*.jpg"))[:24]
        probs = classifier.predict_proba(paths)
        index = classifier.class_names.index(name)
        order = np.argsort(-probs[:, index])
        chosen += [(paths[i], name) for i in order[:per_class] if probs[i].argmax() == index]
    return chosen


@pytest.fixture(scope="module")
def tiny_run(tiny_imagefolder, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")


@pytest.fixture(scope="module")
def real_run(shared_dir, tmp_path_factory) -> Path:
    return train_real_run(shared_dir, tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torchscript"])
def test_tiny_export_agrees_with_pytorch(tiny_run, tmp_path, fmt):
    out = tmp_path / {"onnx": "m.onnx", "openvino": "m.xml", "torchscript": "m.pt"}[fmt]
    result = export_run(ExportConfig(str(tiny_run), fmt, out=str(out)), say=lambda _: None)
    assert result.path == out and out.is_file()
    assert result.parity.top1_agreement == 1.0 and not result.parity.disagreements
    assert result.parity.max_abs_logit_diff < 1e-3
    assert len(result.parity.images) == 8  # default: images of the run's own validation split
    assert {Path(p).parent.name for p in result.parity.images} == {"blue", "red"}


def test_onnx_carries_class_names_and_preprocessing_and_any_batch(tiny_run, tmp_path, tiny_imagefolder):
    out = tmp_path / "model.onnx"
    export_run(ExportConfig(str(tiny_run), "onnx", out=str(out)), say=lambda _: None)
    meta = json.loads((tiny_run / "model.json").read_text())
    props = read_onnx_metadata(out)
    assert json.loads(props["class_names"]) == meta["class_names"] == ["blue", "red"]
    assert json.loads(props["preprocessing"]) == meta["preprocessing"]
    assert props["architecture"] == "resnet18"
    # Dynamic batch: the same file runs 1 and 5 images, and agrees with the Classifier's own logits.
    classifier = Classifier.load(tiny_run, backend="torch", precision="fp32")
    images = sorted((tiny_imagefolder / "val").rglob("*.png"))[:5]
    batch = classifier.preprocess(images)
    session = load_exported("onnx", out)
    np.testing.assert_allclose(session(batch), classifier.logits(batch), atol=1e-4)
    np.testing.assert_allclose(session(batch[:1]), classifier.logits(batch[:1]), atol=1e-4)


def test_export_defaults_to_the_run_folder_and_checks_given_images(tiny_run, tiny_imagefolder, capsys):
    images = sorted((tiny_imagefolder / "val" / "red").glob("*.png"))[:2]
    assert main(["export", str(tiny_run), "--format", "onnx", "--check-images", *map(str, images)]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 2/2" in out and "max |logit difference|" in out
    assert (tiny_run / "export" / "model.onnx").is_file()


def test_export_fails_when_top1_disagrees(tiny_run, tmp_path, monkeypatch):
    import resfit.export as export_module

    def flipped(fmt, path, precision="fp32", threads=None):
        real = load_exported(fmt, path, precision, threads)
        return lambda batch: real(batch)[:, ::-1].copy()

    monkeypatch.setattr(export_module, "load_exported", flipped)
    with pytest.raises(ExportError, match="different class than PyTorch"):
        export_run(ExportConfig(str(tiny_run), "onnx", out=str(tmp_path / "m.onnx")), say=lambda _: None)
    assert not (tmp_path / "m.onnx").exists()


def test_export_errors_are_clear(tiny_run, tmp_path, capsys):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_run(ExportConfig(str(tiny_run), "tflite"))
    with pytest.raises(RunFolderError, match="no/such/run"):
        export_run(ExportConfig("/no/such/run", "onnx"))
    with pytest.raises(ExportError, match="must be an .xml|is an .xml file"):
        export_run(
            ExportConfig(str(tiny_run), "openvino", out=str(tmp_path / "model.bin")), say=lambda _: None
        )
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    with pytest.raises(ExportError, match="notes.txt: not an image"):
        export_run(ExportConfig(str(tiny_run), "onnx", check_images=[str(not_an_image)]))
    # A run whose data has moved: the message says how to proceed.
    moved = tmp_path / "moved-run"
    shutil.copytree(tiny_run, moved, ignore=shutil.ignore_patterns("export", "resume"))
    meta = json.loads((moved / "model.json").read_text())
    meta["data"]["path"] = str(tmp_path / "gone")
    (moved / "model.json").write_text(json.dumps(meta))
    assert main(["export", str(moved)]) == ExportError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--check-images" in err and "gone" in err


def test_backends_load_exports_from_the_cache_once(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    first = Classifier.load(tiny_run, config=InferenceConfig(backend="onnxruntime", cache_dir=str(cache)))
    exported = sorted(cache.glob("exports/*/model.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    Classifier.load(tiny_run, config=InferenceConfig(backend="onnxruntime", cache_dir=str(cache)))
    assert exported[0].stat().st_mtime_ns == stamp  # reused, not exported again
    assert first.choice.name == "onnxruntime"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_real_run_export_agrees_on_validation_photos(real_run, tmp_path, fmt, capsys):
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.xml")
    assert (
        main(["export", str(real_run), "--format", fmt, "--out", str(out), "--num-check-images", "16"]) == 0
    )
    printed = capsys.readouterr().out
    assert "top-1 agreement 16/16" in printed
    assert out.is_file()
    if fmt == "onnx":
        assert json.loads(read_onnx_metadata(out)["class_names"]) == ["ants", "bees"]


@pytest.mark.slow
def test_real_run_backends_agree_with_fp32_torch(real_run, shared_dir, tmp_path_factory):
    """Every backend at fp32 and the default precision (and int8 where kept) picks the fp32 class on 24 photos."""
    paths = [
        p
        for name in ("ants", "bees")
        for p in sorted(shared_dir.joinpath(*HYMENOPTERA, "val", name).glob("*.jpg"))[:12]
    ]
    reference = Classifier.load(real_run, backend="torch", precision="fp32")
    batch = reference.preprocess(paths)
    expected = reference.logits(batch)
    cases = [(b, p) for b in ("onnxruntime", "openvino", "auto") for p in ("fp32", "auto")]
    for backend, precision in cases + [("openvino", "int8")]:
        cache = real_run_cache(tmp_path_factory.getbasetemp())
        config = InferenceConfig(backend=backend, precision=precision, cache_dir=str(cache))
        try:
            classifier = Classifier.load(real_run, config=config)
        except ExportError as error:
            # int8 is kept only if it matches fp32 on >= 99.5% of validation and of training images; this
            # run has many near-ties (measured: 96.7% here), so a refusal that says why is a correct outcome too.
            assert precision == "int8" and "below the 99.5% needed on each" in str(error)
            continue
        logits = classifier.logits(batch)
        agreement = float((logits.argmax(1) == expected.argmax(1)).mean())
        assert agreement >= 0.95, (backend, precision, agreement)
        if precision == "fp32":
            assert np.abs(logits - expected).max() < 1e-2, (backend, precision)
