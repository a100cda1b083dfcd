"""The "unknown" answer: the rule's arithmetic, and a real out-of-distribution photo through CLI and service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_export import train_real_run

from resfit.errors import ConfigError
from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.rejection import confidence_scores, fit_rule, parse_target, risk_coverage
from resfit.run_folder import RunFolder
from resfit.serve import create_app

HYMENOPTERA = ("data", "hymenoptera")


def test_a_coverage_target_answers_that_share_of_the_validation_photos():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 3
    labels = rng.integers(0, 3, 200)
    rule = fit_rule(logits, labels, "coverage:0.9", "msp")
    answered, _ = rule.accepts(logits)
    assert answered.sum() == 180 and rule.coverage == pytest.approx(0.9)


def test_a_precision_target_keeps_the_largest_confident_share_that_reaches_it():
    # 10 confident right answers, then 10 less confident ones of which half are wrong
    logits = np.array([[5.0 - i * 0.2, 0.0] for i in range(20)])
    labels = np.array([0] * 10 + [0, 1] * 5)
    rule = fit_rule(logits, labels, "precision:0.95", "msp")
    assert rule.accuracy_answered >= 0.95 and 10 <= round(rule.coverage * 20) <= 11
    unreachable = fit_rule(logits, np.ones(20, dtype=int), "precision:0.5", "msp")
    assert unreachable.coverage == 0.0  # no share reaches it: everything is "unknown"


@pytest.mark.parametrize("text", ["coverage", "coverage:1.5", "recall:0.9", "precision:abc", "coverage:0"])
def test_bad_targets_are_refused(text):
    with pytest.raises(ConfigError, match="reject-target"):
        parse_target(text)
    assert parse_target("none") is None and parse_target("precision:0.99") == ("precision", 0.99)


def test_knn_scores_photos_far_from_the_bank_lower():
    bank = np.eye(4, 8, dtype=np.float32)
    near = bank[:2] + 0.01
    far = -bank[:2]
    scores = confidence_scores(np.zeros((4, 2)), "knn", np.r_[near, far], bank, k=1)
    assert scores[:2].min() > scores[2:].max()
    with pytest.raises(ConfigError, match="features"):
        confidence_scores(np.zeros((1, 2)), "knn")


def test_risk_coverage_puts_mistakes_ranked_last_under_the_smallest_area():
    correct = np.array([True] * 8 + [False] * 2)
    good = risk_coverage(np.arange(10, 0, -1), correct)["aurc"]
    bad = risk_coverage(np.arange(10), correct)["aurc"]
    assert good < bad and good == pytest.approx(np.mean([0] * 8 + [1 / 9, 2 / 10]))


@pytest.fixture(scope="module")
def ants_bees_run(shared_dir, tmp_path_factory) -> Path:
    """ResNet-50 from the Imagenette source on ants/bees, head stage (~30 s), the default "unknown" rule."""
    return train_real_run(shared_dir, tmp_path_factory.getbasetemp())


def flower_photos(shared_dir: Path, count: int = 24) -> list[Path]:
    folders = sorted(shared_dir.joinpath("data", "flowers5", "val").iterdir())
    return [p for folder in folders for p in sorted(folder.glob("*.jpg"))[: count // len(folders)]]


@pytest.mark.slow
def test_flower_photos_get_unknown_from_an_ants_bees_model_through_cli_and_service(
    ants_bees_run, shared_dir, tmp_path
):
    meta = json.loads((ants_bees_run / "model.json").read_text())
    rule = meta["reject"]
    assert (
        rule["score"] == "knn"
        and rule["target"] == "coverage:0.95"
        and (ants_bees_run / RunFolder.REJECT_BANK).is_file()
    )
    assert 0.9 <= rule["coverage"] <= 1.0  # 95% of the 153 validation photos are answered
    flowers = flower_photos(shared_dir)
    ants = sorted(shared_dir.joinpath(*HYMENOPTERA, "val", "ants").glob("*.jpg"))[:8]
    env_cache = {"RESFIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "resfit", "predict", str(ants_bees_run), *map(str, flowers + ants), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env_cache},
        check=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == len(flowers) + len(ants)
    flower_rows, ant_rows = rows[: len(flowers)], rows[len(flowers) :]
    unknown_flowers = [r for r in flower_rows if r["predicted"] == "unknown"]
    # benchmarks/ood.py: this model rejects about a third of flowers5 photos (6 of these 20) and 5% of its val
    assert len(unknown_flowers) >= 3, [r["score"]["value"] for r in flower_rows]
    assert all(r["unknown"] and r["best_guess"] in ("ants", "bees") for r in unknown_flowers)
    assert sum(r["predicted"] == "unknown" for r in ant_rows) <= 2
    # the service answers the same photo the same way, with its score
    target = unknown_flowers[0]
    with TestClient(
        create_app(Classifier.load(ants_bees_run, config=InferenceConfig(backend="torch")))
    ) as client:
        reply = client.post(
            "/predict", files={"file": ("flower.jpg", Path(target["path"]).read_bytes())}
        ).json()
        assert reply["predicted"] == "unknown" and reply["score"]["name"] == "knn"
        assert reply["score"]["value"] < reply["score"]["threshold"]
        assert client.get("/model").json()["reject"]["score"] == "knn"
    # and --no-reject always names a class
    plain = subprocess.run(
        [
            sys.executable,
            "-m",
            "resfit",
            "predict",
            str(ants_bees_run),
            target["path"],
            "--json",
            "--no-reject",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env_cache},
        check=True,
    )
    assert json.loads(plain.stdout)["predicted"] in ("ants", "bees")


@pytest.mark.slow
def test_every_engine_gives_the_same_unknown_verdicts(ants_bees_run, shared_dir, tmp_path):
    photos = (
        flower_photos(shared_dir, 10)
        + sorted(shared_dir.joinpath(*HYMENOPTERA, "val", "bees").glob("*.jpg"))[:6]
    )
    verdicts, scores = {}, {}
    for backend in ("torch", "onnxruntime", "openvino"):
        config = InferenceConfig(backend=backend, precision="fp32", cache_dir=str(tmp_path / "cache"))
        classifier = Classifier.load(ants_bees_run, config=config)
        _, answers = classifier.predict_answers(photos)
        verdicts[backend] = [a.unknown for a in answers]
        scores[backend] = np.array([a.score for a in answers])
    assert any(verdicts["torch"]) and not all(verdicts["torch"])
    for backend in ("onnxruntime", "openvino"):
        np.testing.assert_allclose(scores[backend], scores["torch"], atol=1e-4, err_msg=backend)


def test_a_run_without_a_rule_always_answers(tiny_imagefolder, tmp_path):
    """12 validation photos cannot place a threshold: no rule is stored and predictions name a class."""
    from test_export import train_tiny_run

    run = train_tiny_run(tiny_imagefolder, tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert "reject" not in meta and "only 12 validation images" in metrics["rejection"]["not_chosen_because"]
    classifier = Classifier.load(run, config=InferenceConfig(backend="torch"))
    images = sorted((tiny_imagefolder / "val").rglob("*.png"))[:3]
    predictions = list(classifier.predict_paths(map(str, images)))
    assert [p.to_dict()["predicted"] in ("red", "blue") for p in predictions] == [True] * 3


@pytest.mark.slow
def test_an_ensemble_is_calibrated_as_the_model_it_is_and_answers_unknown_by_msp(ants_bees_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from resfit.ensemble import build_ensemble

    # members made 4x overconfident (head weights scaled): their average needs a temperature near 4
    members = []
    for name in ("first", "second"):
        member = tmp_path / name
        shutil.copytree(ants_bees_run, member)
        state = load_file(str(member / "model.safetensors"))
        state["fc.weight"], state["fc.bias"] = state["fc.weight"] * 4, state["fc.bias"] * 4
        save_file(state, str(member / "model.safetensors"))
        members.append(member)
    build_ensemble(members, tmp_path / "ensemble", None, "equal", say=lambda _: None)
    meta = json.loads((tmp_path / "ensemble" / "model.json").read_text())
    assert 2.0 < meta["temperature"] < 8.0
    assert meta["reject"]["score"] == "msp" and 0.9 <= meta["reject"]["coverage"] <= 1.0
    fit = json.loads((tmp_path / "ensemble" / "metrics.json").read_text())["temperature_scaling"]
    assert fit["after"]["nll"] < fit["before"]["nll"] - 0.05


@pytest.mark.parametrize("bank", [np.zeros((0, 8)), np.zeros(8), np.full((3, 8), np.nan)])
def test_a_damaged_feature_bank_is_a_run_folder_error(tmp_path, bank):
    from safetensors.numpy import save_file

    from resfit.errors import RunFolderError

    save_file({"features": bank.astype(np.float16)}, str(tmp_path / RunFolder.REJECT_BANK))
    with pytest.raises(RunFolderError, match="non-empty, finite"):
        RunFolder(tmp_path).read_bank()
    (tmp_path / RunFolder.REJECT_BANK).write_bytes(b"\x00" * 7)  # truncated
    with pytest.raises(RunFolderError, match="unreadable"):
        RunFolder(tmp_path).read_bank()
    with pytest.raises(RunFolderError, match="from another model"):
        confidence_scores(np.zeros((1, 2)), "knn", np.ones((1, 4)), np.ones((3, 8)))
