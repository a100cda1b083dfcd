"""The feature cache: reused for the same backbone and images, never for changed ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import _write_learnable_images

from resfit.data.feature_cache import FeatureCache, content_fingerprint, feature_key, weights_fingerprint
from resfit.data.sources import discover
from resfit.models import build_model
from resfit.train import TrainConfig, loop, train


def test_key_changes_with_weights_preprocessing_precision_and_content(tiny_imagefolder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    source = discover(data)
    model = build_model("resnet18", 2)
    weights = weights_fingerprint(model)
    content = content_fingerprint(source, "train")
    prep = {"crop_size": 32}
    key = feature_key(weights, prep, "bf16", content)
    assert key == feature_key(
        weights_fingerprint(model), prep, "bf16", content_fingerprint(discover(data), "train")
    )
    model.fc.weight.data += 1  # the head does not change the features
    assert weights_fingerprint(model) == weights
    model.layer1[0].conv1.weight.data[0, 0, 0, 0] += 1e-3
    assert weights_fingerprint(model) != weights
    assert feature_key(weights, {"crop_size": 48}, "bf16", content) != key
    assert feature_key(weights, prep, "fp32", content) != key
    first = sorted((data / "train" / "red").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # same name, other bytes
    assert content_fingerprint(discover(data), "train") != content


def test_cache_round_trip_and_corrupt_file(tmp_path):
    cache = FeatureCache(tmp_path)
    features, labels = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32), np.arange(5)
    assert cache.get("k") is None
    cache.put("k", features, labels)
    got_features, got_labels = cache.get("k")
    assert np.array_equal(got_features, features) and np.array_equal(got_labels, labels)
    (tmp_path / "k.safetensors").write_bytes(b"garbage")
    assert cache.get("k") is None


def test_second_run_reuses_features_with_the_same_result(tiny_imagefolder, tmp_path):
    lines: list[str] = []
    settings = dict(
        model="resnet18", weights="none", epochs=0, img_size=32, batch_size=8, num_workers=0, quiet=True
    )
    first = train(
        TrainConfig(data=str(tiny_imagefolder), out=str(tmp_path / "a"), **settings), say=lines.append
    )
    assert not any("from the cache" in line for line in lines)
    second = train(
        TrainConfig(data=str(tiny_imagefolder), out=str(tmp_path / "b"), **settings), say=lines.append
    )
    assert sum("from the cache" in line for line in lines) == 2  # train and val
    assert first.metrics == second.metrics


def test_a_kept_head_stage_is_calibrated_from_its_cached_features(tmp_path, monkeypatch):
    """--epochs 0 keeps the head stage's model: the knn rule's bank reads the features the head stage cached
    instead of running the network over train again, with the same result (calibration's val outputs are
    held from the head stage either way)."""
    data = tmp_path / "data"
    _write_learnable_images(data / "train", per_class=12, size=40, seed=0)
    _write_learnable_images(data / "val", per_class=12, size=40, seed=1)  # 24: enough for a rule
    settings = dict(model="resnet18", weights="none", epochs=0, img_size=32, batch_size=8, num_workers=0)
    settings |= dict(quiet=True, reject_score="knn")
    passes: list[int] = []
    real_pass = loop.predict_logits
    monkeypatch.setattr(loop, "predict_logits", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    results = {}
    for cached in (False, True):
        config = TrainConfig(
            data=str(data), out=str(tmp_path / f"run{cached}"), feature_cache=cached, **settings
        )
        passes.clear()
        results[cached] = (train(config, say=lambda _: None), len(passes))
    assert results[False][1] == 1 and results[True][1] == 0  # train for the bank; val never again
    meta = {c: json.loads((tmp_path / f"run{c}" / "model.json").read_text()) for c in (False, True)}
    assert meta[True]["temperature"] == pytest.approx(meta[False]["temperature"], rel=1e-4)
    assert meta[True]["reject"]["score"] == meta[False]["reject"]["score"] == "knn"
    assert meta[True]["reject"]["threshold"] == pytest.approx(meta[False]["reject"]["threshold"], abs=1e-4)
    assert results[True][0].metrics["accuracy"] == results[False][0].metrics["accuracy"]
