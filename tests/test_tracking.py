"""--log tensorboard,mlflow: read back through TensorBoard's reader and MLflow's client, against the run folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_after_epoch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_export import train_tiny_run

from resfit.cli import main
from resfit.train import tracking
from resfit.train.tracking import Tracking

EPOCHS = 2
FAST = ["--model", "resnet18", "--weights", "none", "--img-size", "32", "--batch-size", "8"]
FAST += ["--workers", "0", "--quiet", "--resume-every", "0"]


def tiny_train_args(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["train", str(data), *FAST, "--epochs", str(epochs), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tracked_run(tiny_imagefolder, module_tmp) -> Path:
    """One tiny CLI training (head stage + 2 epochs) logged to both trackers with their defaults."""
    out = module_tmp("tracked") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        assert main(tiny_train_args(tiny_imagefolder, out, "--log", "tensorboard,mlflow")) == 0
    return out


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(history: list[dict], name: str) -> list[tuple[int, float]]:
    return [(int(row["epoch"]), float(row[name])) for row in history if row[name] != ""]


def test_tensorboard_event_file_holds_every_epoch(tracked_run):
    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    history = read_history(tracked_run)
    assert [int(row["epoch"]) for row in history] == list(range(EPOCHS + 1))
    tags = events.Tags()
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds"):
        assert name in tags["scalars"], (name, tags["scalars"])
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        expected = column(history, name)
        assert [step for step, _ in logged] == [epoch for epoch, _ in expected], name  # one per epoch
        for (_, value), (_, wanted) in zip(logged, expected, strict=True):
            assert value == pytest.approx(wanted, rel=1e-5, abs=1e-6), name
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    (final,) = events.Scalars("final/val/accuracy")
    assert final.value == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert "plots/curves" in tags["images"] and "plots/confusion_matrix" in tags["images"]
    assert "config/text_summary" in tags["tensors"]


def test_mlflow_store_holds_params_epochs_metrics_and_run_folder(tracked_run):
    client = embedded_client(tracked_run)
    experiment = client.get_experiment_by_name("resfit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert json.loads((tracked_run / "tracking.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    params = run.data.params
    resolved = json.loads((tracked_run / "train_config.json").read_text())
    assert params["model"] == "resnet18" and params["epochs"] == str(EPOCHS)
    assert params["img_size"] == "32" and float(params["lr"]) == resolved["lr"]  # the resolved config
    history = read_history(tracked_run)
    for name in ("val_acc", "val_loss", "train_loss", "lr", "images_per_s"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        expected = column(history, name)
        assert [step for step, _ in logged] == [epoch for epoch, _ in expected], name  # one per epoch
        # history.csv keeps 6 decimals: a value below 0.05 is off by up to 5e-7 there
        assert [value for _, value in logged] == pytest.approx(
            [value for _, value in expected], rel=1e-5, abs=1e-6
        )
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert run.data.metrics["final/val/accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["final/val/loss"] == pytest.approx(metrics["loss"])
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"model.json", "model.safetensors", "metrics.json", "history.csv", "curves.png"} <= artifacts
    assert "resume" not in artifacts and "mlflow" not in artifacts  # scratch state, and the store itself
    local = Path(client.download_artifacts(run.info.run_id, "model.json", str(tracked_run.parent)))
    assert json.loads(local.read_text()) == json.loads((tracked_run / "model.json").read_text())


def embedded_client(run_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}")


def test_a_killed_and_resumed_run_continues_the_same_tracking(tiny_imagefolder, tmp_path):
    run_dir = tmp_path / "killed"
    cli = [sys.executable, "-m", "resfit", *tiny_train_args(tiny_imagefolder, run_dir, epochs=3)]
    cli += ["--log", "mlflow,tensorboard"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    process = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    kill_after_epoch(process, run_dir)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(
        [sys.executable, "-m", "resfit", "train", "--resume", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stdout, resumed.stdout
    client = embedded_client(run_dir)
    (run,) = client.search_runs([client.get_experiment_by_name("resfit").experiment_id])
    assert run.info.status == "FINISHED" and "final/val/accuracy" in run.data.metrics
    epochs = [epoch for epoch, _ in column(read_history(run_dir), "val_acc")]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
    assert steps == epochs == list(range(len(epochs)))  # each epoch once, across the kill
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val_acc")] == epochs


@pytest.mark.slow
def test_only_rank_0_logs_under_torchrun(tiny_imagefolder, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # --track: torchrun's own parser stops at --log (an abbreviation of its --log-dir to it)
    args = tiny_train_args(tiny_imagefolder, run_dir, "--track", "tensorboard,mlflow", "--precision", "fp32")
    two = subprocess.run(
        [*torchrun, "-m", "resfit", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("tracking: mlflow") == 1 and "warning" not in two.stdout, two.stdout
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    client = embedded_client(run_dir)
    (run,) = client.search_runs([client.get_experiment_by_name("resfit").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
    assert steps == list(range(EPOCHS + 1))


def test_unknown_tracker_is_one_line_and_exit_2(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_imagefolder, out, "--log", "tensorboard,wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("resfit: error:") and "wandb" in err, err
    assert not out.exists()


def test_mlflow_uri_needs_log_mlflow(tiny_imagefolder, tmp_path, capsys):
    args = tiny_train_args(tiny_imagefolder, tmp_path / "run", "--mlflow-uri", "sqlite:///x.db")
    assert main(args) == 2
    assert "--log mlflow" in capsys.readouterr().err


def test_missing_package_is_refused_before_training(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tracking.TRACKER_PACKAGES, "mlflow", "resfit_no_such_package")
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_imagefolder, out, "--log", "mlflow")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'resfit[track]'" in err, err
    assert not out.exists()


def test_without_log_nothing_is_tracked(tiny_imagefolder, tmp_path_factory):
    run_dir = train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")
    assert (run_dir / "model.json").is_file()
    for name in ("tensorboard", "mlflow", "mlruns", "tracking.json", "mlflow.db"):
        assert not (run_dir / name).exists(), name


def test_a_store_that_will_not_open_costs_one_warning_not_the_run(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    args = tiny_train_args(tiny_imagefolder, out, "--log", "mlflow", "--mlflow-uri", unwritable, epochs=0)
    assert main(args) == 0
    assert (out / "model.json").is_file()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "mlflow tracking" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), warnings


class _Recorder:
    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on = [], fail_on

    def _call(self, name: str) -> None:
        if name == self.fail_on:
            raise OSError("disk full")
        self.calls.append(name)

    def log_params(self, params):
        self._call("params")

    def log_epoch(self, row):
        self._call("epoch")

    def log_final(self, run_dir):
        self._call("final")

    def close(self, status):
        self._call("close")


def test_a_backend_that_fails_mid_run_is_dropped_and_the_others_go_on(tmp_path):
    said = []
    healthy, failing = _Recorder(), _Recorder(fail_on="epoch")
    trackers = Tracking({"tensorboard": healthy, "mlflow": failing}, said.append)
    trackers.log_params({"model": "resnet18"})
    for epoch in range(3):
        trackers.log_epoch({"epoch": epoch, "val_acc": 0.5})
    trackers.log_final(tmp_path)
    trackers.close()
    assert healthy.calls == ["params", "epoch", "epoch", "epoch", "final", "close"]
    assert failing.calls == ["params"]
    assert len(said) == 1 and "mlflow tracking stopped" in said[0] and "disk full" in said[0]
