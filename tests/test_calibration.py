"""Temperature scaling: fitted on held-out logits, stored in model.json, applied alike by every backend."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_export import train_tiny_run

from resfit.batched_inference import softmax
from resfit.calibration import calibration_scores, choose_temperature, fit_temperature, why_not_calibrated
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.run_folder import RunFolder
from resfit.serve import create_app


def test_fit_recovers_the_temperature_that_overconfident_logits_were_scaled_by():
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 1.5, size=(4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(honest)])  # labels drawn from softmax(honest)
    overconfident = honest * 3.0
    temperature = fit_temperature(overconfident, labels)
    assert 2.7 < temperature < 3.3
    before = calibration_scores(softmax(overconfident), labels)
    after = calibration_scores(softmax(overconfident / temperature), labels)
    assert after["nll"] < before["nll"] - 0.1 and after["ece"] < before["ece"] / 2
    assert (softmax(overconfident / temperature).argmax(1) == overconfident.argmax(1)).all()


def test_training_records_the_calibration_and_refuses_to_fit_on_too_few_photos(tiny_imagefolder, tmp_path):
    run = train_tiny_run(tiny_imagefolder, tmp_path / "run")
    meta = json.loads((run / RunFolder.MODEL_META).read_text())
    fit = json.loads((run / "metrics.json").read_text())["temperature_scaling"]
    # 12 validation photos cannot pin a temperature down: it stays 1, and the run says why
    assert meta["temperature"] == fit["temperature"] == 1.0
    assert "only 12 validation images" in fit["not_fitted_because"]
    assert fit["after"] == fit["before"] and (run / "reliability.png").stat().st_size > 1000


def test_a_temperature_is_not_fitted_where_the_data_cannot_tell():
    logits = np.array([[3.0, -3.0], [-2.0, 2.0]] * 40)
    labels = np.array([0, 1] * 40)  # no mistakes: the NLL falls forever as T -> 0
    assert why_not_calibrated(logits, labels).startswith("no mistakes")
    assert fit_temperature(logits, labels) == 1.0


@pytest.fixture(scope="module")
def scaled_run(tiny_imagefolder, tmp_path_factory, module_tmp) -> Path:
    """The tiny run with a temperature far from 1, so a backend that ignored it would show."""
    base = train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")
    run = module_tmp("scaled") / "run"
    shutil.copytree(base, run)
    meta = json.loads((run / RunFolder.MODEL_META).read_text())
    meta["temperature"] = 2.5
    (run / RunFolder.MODEL_META).write_text(json.dumps(meta))
    return run


def test_every_backend_and_the_service_apply_the_temperature(scaled_run, tiny_imagefolder, tmp_path):
    images = sorted((tiny_imagefolder / "val").rglob("*.png"))
    meta = json.loads((scaled_run / RunFolder.MODEL_META).read_text())
    unscaled = tmp_path / "unscaled"
    shutil.copytree(scaled_run, unscaled)
    (unscaled / RunFolder.MODEL_META).write_text(json.dumps(meta | {"temperature": 1.0}))
    raw = Classifier.load(unscaled, config=InferenceConfig(backend="torch", precision="fp32"))
    expected = softmax(raw.logits(raw.preprocess(images)) / 2.5)
    for backend in ("torch", "onnxruntime", "openvino"):
        config = InferenceConfig(backend=backend, precision="fp32", cache_dir=str(tmp_path / "cache"))
        classifier = Classifier.load(scaled_run, config=config)
        np.testing.assert_allclose(classifier.predict_proba(images), expected, atol=1e-4, err_msg=backend)
    config = InferenceConfig(backend="openvino", precision="fp32", cache_dir=str(tmp_path / "cache"))
    with TestClient(create_app(Classifier.load(scaled_run, config=config))) as client:
        response = client.post("/predict", files={"file": ("x.png", images[0].read_bytes())})
        top = response.json()["top_k"][0]["probability"]
        assert top == pytest.approx(float(expected[0].max()), abs=1e-4)
        assert client.get("/model").json()["temperature"] == 2.5


def test_val_metrics_from_the_fitted_logits_equal_a_pass_of_the_calibrated_model(
    scaled_run, tiny_imagefolder, tmp_path, monkeypatch
):
    """Training reports val from the uncalibrated logits the temperature was fitted on, divided by it: the
    same numbers as the calibrated model run over val again (T = 2.5, so a missed division would show)."""
    from resfit.batched_inference import eval_loader, predict_logits
    from resfit.calibration import scaled_logits
    from resfit.data.dataset import ImageDataset
    from resfit.data.transforms import Preprocessing
    from resfit.hardware import resolve_runtime

    runtime = resolve_runtime("cpu", "fp32")
    loads: list[int] = []
    real_load = RunFolder.load_model
    monkeypatch.setattr(RunFolder, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    reports = {}
    for name in ("pass", "held"):
        run = tmp_path / name
        shutil.copytree(scaled_run, run)
        folder = RunFolder(run)
        source, _ = folder.dataset(str(tiny_imagefolder))
        raw_model, meta = folder.load_model(calibrated=False)
        raw_model.to(memory_format=torch.channels_last)  # as training validates it: the same kernels
        val = ImageDataset(source, "val", Preprocessing.from_dict(meta["preprocessing"]).eval_transform())
        raw, _ = predict_logits(raw_model, eval_loader(val, 0), runtime)
        calibrated, _ = folder.load_model()
        calibrated.to(memory_format=torch.channels_last)
        scaled, _ = predict_logits(calibrated, eval_loader(val, 0), runtime)
        np.testing.assert_array_equal(scaled_logits(raw, 2.5), scaled)  # float32 division, both ways
        held = raw if name == "held" else None
        loaded_before = len(loads)
        reports[name] = folder.evaluate_and_report(source, runtime, {}, {}, raw_val_logits=held)["val"]
        assert len(loads) - loaded_before == (0 if held is not None else 1)  # no test split: no model needed
    assert reports["held"]["calibration"] == reports["pass"]["calibration"]
    assert reports["held"]["loss"] == reports["pass"]["loss"]
    assert reports["held"]["confusion_matrix"] == reports["pass"]["confusion_matrix"]
    with pytest.raises(ValueError, match="val logits for"):
        folder.evaluate_and_report(source, runtime, {}, {}, raw_val_logits=raw[:-1])


def test_an_ensemble_of_calibrated_runs_loads_back(scaled_run, tmp_path):
    """Members are taken as their weights file holds them, so the ensemble's own weights file loads."""
    from resfit.ensemble import build_ensemble

    second = tmp_path / "second"
    shutil.copytree(scaled_run, second)
    build_ensemble([scaled_run, second], tmp_path / "ensemble", None, "equal", say=lambda _: None)
    classifier = Classifier.load(tmp_path / "ensemble", config=InferenceConfig(backend="torch"))
    assert classifier.meta["architecture"] == "ensemble"


def _three_class_logits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(0, 1.5, size=(count, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(honest)])
    return honest, labels


def test_an_overconfident_model_is_softened_and_an_underconfident_one_is_left_alone():
    honest, labels = _three_class_logits(600)
    temperature, reason = choose_temperature(honest * 2.0, labels)
    assert reason is None and 1.7 < temperature < 2.3
    # sharpening (T < 1) raised the NLL of held-out photos where it was measured: T stays 1, saying why
    temperature, reason = choose_temperature(honest / 2.0, labels)
    assert temperature == 1.0 and "would sharpen" in reason


def test_the_prior_pulls_a_temperature_from_few_photos_towards_1_more_than_from_many():
    honest, labels = _three_class_logits(2000, seed=1)

    def pull(count: int) -> float:
        """How far the prior moves log T towards 0, fitted on the first ``count`` photos."""
        plain = fit_temperature(honest[:count] * 2.5, labels[:count])
        with_prior = fit_temperature(honest[:count] * 2.5, labels[:count], prior_sd=0.5)
        assert 1.0 < with_prior < plain
        return math.log(plain) - math.log(with_prior)

    assert pull(2000) < pull(40) / 10
