"""Resume: the state round-trips exactly, and a run killed with SIGKILL ends as if it never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_after_epoch
from safetensors import SafetensorError

from resfit.models import build_model
from resfit.train import TrainConfig, train
from resfit.train.state import load_state, restore, save_state


def test_state_round_trips_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    optimizer.step()
    save_state(tmp_path, 1, model, optimizer, {"history": [], "best_val_acc": 0.5})
    expected_next = torch.rand(3)

    other = build_model("resnet18", 3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    torch.manual_seed(123)
    state, tensors = load_state(tmp_path)
    restore(other, other_optimizer, state, tensors)
    assert state["epoch"] == 1 and state["best_val_acc"] == 0.5
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The optimizer moments came back: the same next step gives the same weights.
    for net, opt in ((model, optimizer), (other, other_optimizer)):
        opt.zero_grad()
        net(images).sum().backward()
        opt.step()
    assert torch.equal(model.fc.weight, other.fc.weight)
    assert not list(tmp_path.glob("resume/*.tmp"))


def _subset(shared_dir: Path, root: Path, per_class: int) -> Path:
    """A small copy of real photos (ants/bees) so the test is quick; ../shared stays untouched."""
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for cls in ("ants", "bees"):
            target = root / split / cls
            target.mkdir(parents=True)
            for src in sorted((shared_dir / "data" / "hymenoptera" / split / cls).glob("*.jpg"))[:count]:
                (target / src.name).symlink_to(src)
    return root


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(shared_dir, tmp_path):
    data = _subset(shared_dir, tmp_path / "data", per_class=40)
    flags = dict(
        model="resnet18", weights="none", epochs=3, img_size=64, batch_size=16, num_workers=0, seed=7
    )
    reference = train(
        TrainConfig(data=str(data), out=str(tmp_path / "whole"), quiet=True, **flags), say=lambda _: None
    )

    run_dir = tmp_path / "killed"
    cli = [
        sys.executable,
        "-m",
        "resfit",
        "train",
        str(data),
        "--resume-every",
        "0",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        "3",
        "--img-size",
        "64",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--seed",
        "7",
        "--out",
        str(run_dir),
        "--quiet",
    ]
    process = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_epoch(process, run_dir)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "metrics.json").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "resfit", "train", "--resume", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["accuracy"] == reference.metrics["accuracy"]
    assert metrics["confusion_matrix"] == reference.metrics["confusion_matrix"]
    assert metrics["loss"] == pytest.approx(reference.metrics["loss"], abs=1e-6)
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 1 + 3  # header, head stage, three epochs


def test_a_disk_that_fills_mid_run_is_one_line_and_resume_finishes_the_run(
    tiny_imagefolder, tmp_path, capsys
):
    """The disk fills as epoch 2's resume state is written: exit 8 with one line saying how to go on, the
    epoch before is intact, and once there is room `--resume` ends the run as one that never stopped."""
    from resfit import run_folder
    from resfit.cli import main

    real_save = run_folder.save_file
    run_dir = tmp_path / "run"
    flags = ["--model", "resnet18", "--weights", "none", "--epochs", "3", "--img-size", "32"]
    flags += ["--resume-every", "0"]
    flags += ["--batch-size", "8", "--workers", "0", "--seed", "3", "--quiet"]

    def fills_at_epoch_2(tensors, filename, metadata=None):
        if Path(filename).parent.name == "resume" and ".epoch-2." in Path(filename).name:
            Path(filename).write_bytes(b"partial")  # what the writer had put down when the disk filled
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder, "save_file", fills_at_epoch_2)
        assert main(["train", str(tiny_imagefolder), *flags, "--out", str(run_dir)]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and f"--resume {run_dir}" in err[0], err
    assert json.loads((run_dir / "resume" / "state.json").read_text())["epoch"] == 1
    assert not list((run_dir / "resume").glob(".*.tmp"))

    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    reference = tmp_path / "whole"
    assert main(["train", str(tiny_imagefolder), *flags, "--out", str(reference)]) == 0
    resumed, whole = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert resumed["confusion_matrix"] == whole["confusion_matrix"]
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)


def test_a_resumed_run_that_keeps_its_head_stage_is_calibrated_from_the_feature_cache(tmp_path, monkeypatch):
    """The head stage's val outputs are held in the process that computed them; once a run is resumed they
    are gone, and where the head stage's model is still the kept one (here fine-tuning at lr 1e-12 never
    beats it) calibration reads them back from the feature cache instead of a pass over val, and fits the
    temperature of the run that never stopped. With native bf16 (where the run trains in bf16) the head must
    run under autocast there as in a pass: in fp32 it moved T by 3e-4."""
    import importlib

    from conftest import _write_learnable_images

    from resfit import run_folder
    from resfit.cli import main

    data = tmp_path / "data"
    _write_learnable_images(data / "train", per_class=12, size=40, seed=0)
    _write_learnable_images(data / "val", per_class=16, size=40, seed=1)  # 32: enough to fit a temperature
    for i in range(3):  # confident mistakes, so that the temperature is a fitted one
        (data / "val" / "blue" / f"blue_{i:03d}.png").rename(data / "val" / "red" / f"moved_blue_{i:03d}.png")
        (data / "val" / "red" / f"red_{i:03d}.png").rename(data / "val" / "blue" / f"moved_red_{i:03d}.png")
    flags = ["--model", "resnet18", "--weights", "none", "--epochs", "2", "--img-size", "32", "--lr", "1e-12"]
    flags += ["--resume-every", "0"]
    flags += ["--batch-size", "8", "--workers", "0", "--seed", "3", "--quiet"]
    assert main(["train", str(data), *flags, "--out", str(tmp_path / "whole")]) == 0

    real_save, run_dir = run_folder.save_file, tmp_path / "run"

    def fills_at_epoch_2(tensors, filename, metadata=None):
        if Path(filename).parent.name == "resume" and ".epoch-2." in Path(filename).name:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder, "save_file", fills_at_epoch_2)
        assert main(["train", str(data), *flags, "--out", str(run_dir)]) == 8
    loop = importlib.import_module("resfit.train.loop")  # resfit.train is also the function's name
    passes: list[str] = []
    real_pass = loop.predict_logits
    monkeypatch.setattr(
        loop,
        "predict_logits",
        lambda m, loader, *a, **k: passes.append(loader.dataset.split) or real_pass(m, loader, *a, **k),
    )
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert passes == ["val", "val"], passes  # epoch 2's validation of the EMA and the network; no more

    resumed, whole = (json.loads((d / "model.json").read_text()) for d in (run_dir, tmp_path / "whole"))
    assert resumed["best"]["epoch"] == whole["best"]["epoch"] == 0  # the head stage's model is kept
    assert whole["temperature"] != 1.0  # a fitted one, so that a wrong read of the cache would show
    assert resumed["temperature"] == pytest.approx(whole["temperature"], rel=1e-4)
