"""The learning-rate range test: a sweep that leaves no trace, a readable suggestion, --lr auto and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from resfit.cli import build_parser, main
from resfit.distributed import DistContext
from resfit.errors import ConfigError
from resfit.models import set_backbone_trainable
from resfit.run_folder import RunFolder
from resfit.train import TrainConfig, loop, lr_find, resume, train
from resfit.train.lr_find import (
    MIN_STEPS,
    range_test,
    read_range_test,
    suggest_lr,
    sweep_lrs,
    write_range_test,
)

SMALL = dict(model="resnet18", weights="none", img_size=32, batch_size=8, num_workers=0, quiet=True)
SMALL_FLAGS = ["--model", "resnet18", "--weights", "none", "--img-size", "32", "--batch-size", "8"]
SMALL_FLAGS += ["--workers", "0", "--quiet"]
AUTO = SMALL | {"lr": "auto", "epochs": 1, "resume_every": 0}


def quiet(_message: str) -> None:
    pass


def prepared_trainer(data, run_dir, **overrides) -> loop.Trainer:
    """A Trainer in its stage-2 situation: prepared, head fitted on frozen features."""
    config = TrainConfig(data=str(data), lr="auto", **(SMALL | overrides))
    trainer = loop.Trainer(config, run_dir, resuming=False, say=quiet)
    trainer.prepare()
    set_backbone_trainable(trainer.model, False)
    trainer.fit_head()
    return trainer


def test_sweep_leaves_the_model_and_the_rngs_as_they_were(tiny_imagefolder, tmp_path):
    # BatchNorm in training mode: its running statistics would move if they were not put back.
    trainer = prepared_trainer(tiny_imagefolder, tmp_path / "run", bn="train")
    model = trainer.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()

    result = range_test(trainer, steps=25)

    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # bitwise
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], numpy_rng[1])
    assert trainer.config.lr == "auto"  # the sweep borrowed it for the optimizer and gave it back

    lrs = np.array(result.lrs)
    assert MIN_STEPS <= len(lrs) <= 25 and len(result.losses) == len(lrs) == len(result.smoothed)
    assert np.all(np.diff(lrs) > 0) and lrs[0] == pytest.approx(1e-6)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert lrs[0] <= result.suggestion <= 1.0
    assert result.rule and result.reason and result.settings["batch_size"] == 8

    json_path, plot_path = write_range_test(result, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert {"lrs", "losses", "suggestion", "rule", "reason"} <= set(saved)
    assert read_range_test(tmp_path / "out").suggestion == result.suggestion
    with Image.open(plot_path) as image:
        assert image.format == "PNG" and image.width > 300


def test_the_rule_reads_the_end_of_the_floor_and_falls_back_on_flat_curves():
    lrs = sweep_lrs(1e-6, 1.0, 100)
    rng = np.random.default_rng(0)
    noise = np.exp(0.05 * rng.standard_normal(100))
    # Flat (a fitted head) until ~3e-3, then the loss climbs fast: a tenth of 3e-3 or a little less.
    blow_up = 0.4 + 0.4 * np.clip(np.log10(lrs / 3e-3), 0, None) ** 2 * 10
    suggestion, reason, fallback, floor_end = suggest_lr(lrs[:85], (blow_up * noise)[:85], 1e-3, True)
    assert not fallback and 1e-4 <= suggestion <= 4e-4 and floor_end == pytest.approx(10 * suggestion)
    assert "within 10%" in reason

    flat = 0.4 * noise
    suggestion, reason, fallback, floor_end = suggest_lr(lrs, flat, 1e-3)
    assert fallback and suggestion == 1e-3 and floor_end is None and "flat or too noisy" in reason

    suggestion, reason, fallback, _ = suggest_lr(lrs[:5], flat[:5], 1e-2, True)
    assert fallback and suggestion == 1e-2 and "after 5 steps" in reason

    rising = 0.4 * np.exp(np.log10(lrs / 1e-6))  # worse from the very first step
    suggestion, reason, fallback, _ = suggest_lr(lrs[:60], rising[:60], 1e-3, True)
    assert not fallback and suggestion == pytest.approx(1e-5) and "clamped" in reason


@pytest.fixture(autouse=True)
def short_sweep(monkeypatch):
    """--lr auto sweeps 20 steps here instead of 100: the same code, done sooner."""
    monkeypatch.setattr(lr_find, "STEPS", 20)


@pytest.fixture(scope="module")
def auto_run(tiny_imagefolder, module_tmp):
    """One finished run with --lr auto (its own cache folder: module fixtures precede the autouse one)."""
    root = module_tmp("auto")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESFIT_CACHE", str(root / "cache"))
        patch.setattr(lr_find, "STEPS", 20)
        result = train(TrainConfig(data=str(tiny_imagefolder), out=str(root / "run"), **AUTO), say=quiet)
    return root / "run", result


def test_lr_auto_records_its_number_and_trains_like_that_number(auto_run, tiny_imagefolder, tmp_path):
    run_dir, auto = auto_run
    recorded = json.loads((run_dir / "train_config.json").read_text())["lr"]
    found = json.loads((run_dir / RunFolder.LR_FIND).read_text())
    assert isinstance(recorded, float) and recorded == found["suggestion"]
    assert (run_dir / RunFolder.LR_FIND_PLOT).is_file()
    assert json.loads((run_dir / "model.json").read_text())["training_config"]["lr"] == recorded

    # The test left no trace: the same seed with the number given by hand trains identically.
    config = TrainConfig(data=str(tiny_imagefolder), out=str(tmp_path / "given"), **(AUTO | {"lr": recorded}))
    given = train(config, say=quiet)
    assert [row["train_loss"] for row in auto.history] == [row["train_loss"] for row in given.history]
    assert [row["val_loss"] for row in auto.history] == [row["val_loss"] for row in given.history]


def test_a_run_killed_during_the_test_resumes_to_the_same_run(
    auto_run, tiny_imagefolder, tmp_path, monkeypatch
):
    run_dir, whole = auto_run

    def killed(_trainer):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "auto_lr", killed)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(data=str(tiny_imagefolder), out=str(tmp_path / "killed"), **AUTO), say=quiet)
    assert json.loads((tmp_path / "killed" / "train_config.json").read_text())["lr"] == "auto"
    resumed = resume(tmp_path / "killed", say=quiet)
    assert [row["val_loss"] for row in resumed.history] == [row["val_loss"] for row in whole.history]
    lrs = [
        json.loads((folder / "train_config.json").read_text())["lr"]
        for folder in (run_dir, tmp_path / "killed")
    ]
    assert isinstance(lrs[1], float) and lrs[1] == lrs[0]


def test_resuming_a_run_does_not_repeat_its_test(auto_run):
    run_dir, _ = auto_run
    said: list[str] = []
    before = (run_dir / RunFolder.LR_FIND).stat().st_mtime_ns
    resume(run_dir, say=said.append)
    assert (run_dir / RunFolder.LR_FIND).stat().st_mtime_ns == before
    assert not any("range test" in line for line in said)


def test_cli_lr_find_on_data_and_on_a_run_folder(tiny_imagefolder, tmp_path, capsys):
    assert (
        main(["lr-find", str(tiny_imagefolder), *SMALL_FLAGS, "--steps", "20", "--out", str(tmp_path / "a")])
        == 0
    )
    out = capsys.readouterr().out
    assert "suggested --lr" in out and str(tmp_path / "a" / RunFolder.LR_FIND_PLOT) in out
    assert (tmp_path / "a" / RunFolder.LR_FIND).is_file() and not (
        tmp_path / "a" / "train_config.json"
    ).exists()

    run_dir = tmp_path / "run"
    train(
        TrainConfig(data=str(tiny_imagefolder), out=str(run_dir), epochs=0, **(SMALL | {"img_size": 48})),
        say=quiet,
    )
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert (
        main(["lr-find", str(run_dir), "--steps", "20", "--batch-size", "4", "--out", str(tmp_path / "b")])
        == 0
    )
    settings = json.loads((tmp_path / "b" / RunFolder.LR_FIND).read_text())["settings"]
    assert settings["img_size"] == 48 and settings["model"] == "resnet18"  # the run's settings...
    assert settings["batch_size"] == 4  # ...with the flags given on top
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # the run folder was only read


def test_lr_flag_and_config_accept_auto_or_a_positive_number(tiny_imagefolder):
    parser = build_parser()
    assert parser.parse_args(["train", "data", "--lr", "auto"]).lr == "auto"
    assert parser.parse_args(["train", "data", "--lr", "3e-4"]).lr == 3e-4
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "data", "--lr", "fast"])
    TrainConfig(data="data", lr="auto").validate()
    for bad in ("fast", 0.0, -1e-3):
        with pytest.raises(ConfigError, match="lr must be"):
            TrainConfig(data="data", lr=bad).validate()


def test_lr_auto_is_refused_under_torchrun(tiny_imagefolder, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "init_distributed", lambda device: DistContext(0, 2, 0, 2, "gloo"))
    monkeypatch.setattr(loop, "barrier", lambda context: None)
    config = TrainConfig(data=str(tiny_imagefolder), out=str(tmp_path / "run"), lr="auto", **SMALL)
    with pytest.raises(ConfigError, match="resfit lr-find"):
        loop.Trainer(config, tmp_path / "run", resuming=False, say=quiet).prepare()
