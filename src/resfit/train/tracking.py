"""Opt-in experiment tracking (``--log tensorboard,mlflow``): the run's config, epochs, results and files.

The run folder stays the record of truth; a tracker copies it into TensorBoard or MLflow so runs can be
browsed and compared there. Only the trainer's rank 0 opens one. The backends are imported only when
asked for, and a backend that fails mid-run is dropped with one warning: tracking never costs a training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..run_folder import SPLITS, RunFolder

TRACKERS = ("tensorboard", "mlflow")
# the Python package each backend needs (torch.utils.tensorboard writes through the tensorboard package)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
DEFAULT_EXPERIMENT = "resfit"
# Not copied as artifacts: the resume state is scratch (model.safetensors is the kept model), and the
# embedded MLflow store would be copied into itself.
NOT_ARTIFACTS = (RunFolder.RESUME_DIR, RunFolder.MLFLOW_DIR)
# Not logged as scalars: the row's step and its stage's name (the epoch is the step already).
NOT_SCALARS = ("epoch", "stage")


class Tracker(Protocol):
    """What the trainer tells a tracking backend, in this order."""

    def log_params(self, params: dict) -> None: ...

    def log_epoch(self, row: dict) -> None: ...

    def log_final(self, run_dir: Path) -> None: ...

    def close(self, status: str) -> None: ...  # status: "FINISHED" or "FAILED"


def tracker_names(log: str | Iterable[str] | None) -> list[str]:
    """``--log`` as a list: "tensorboard,mlflow", ["mlflow"] and None all work; duplicates dropped."""
    parts = log.split(",") if isinstance(log, str) else list(log or [])
    names = []
    for part in parts:
        name = str(part).strip().lower()
        if name and name not in names:
            names.append(name)
    return names


def check_trackers(log, mlflow_uri: str | None) -> None:
    """--log names only known trackers, and --mlflow-uri comes with --log mlflow."""
    names = tracker_names(log)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--log {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
    if mlflow_uri and "mlflow" not in names:
        raise ConfigError("--mlflow-uri is for --log mlflow: add it, or drop --mlflow-uri")


def require_tracker_packages(log) -> None:
    """Each tracker's package is installed: checked on every process before a run starts."""
    for name in tracker_names(log):
        package = TRACKER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"--log {name} needs the {package} package: pip install 'resfit[track]'")


def flat_params(config: dict) -> dict[str, str]:
    """A config as tracker params: strings, lists as JSON, so the params read back as train_config.json."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in config.items()}


def epoch_scalars(row: dict) -> dict[str, float]:
    """The numbers of one history row (losses, accuracies, lr, images/s, seconds); stages lacking one skip it."""
    values = {key: value for key, value in row.items() if key not in NOT_SCALARS}
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def final_scalars(run_dir: Path) -> dict[str, float]:
    """metrics.json's (and metrics_test.json's) top-level numbers, as ``final/<split>/<name>``."""
    scalars, folder = {}, RunFolder(run_dir)
    for split in SPLITS:
        if not folder.metrics_file(split).is_file():
            continue
        for key, value in folder.read_metrics(split).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                scalars[f"final/{split}/{key}"] = float(value)
    return scalars


class TensorBoardTracker:
    """``torch.utils.tensorboard``'s SummaryWriter: scalars per epoch, the config as text, the plots as images."""

    def __init__(self, log_dir: Path, resuming: bool):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run replays its history from epoch 0, so TensorBoard hides what the killed one wrote.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=0 if resuming else None)
        self.last_step = 0

    def log_params(self, params: dict) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in flat_params(params).items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + rows)
        self.writer.flush()

    def log_epoch(self, row: dict) -> None:
        self.last_step = int(row["epoch"])
        for key, value in epoch_scalars(row).items():
            self.writer.add_scalar(key, value, global_step=self.last_step)
        self.writer.flush()  # a kill -9 loses at most the epoch in progress, as with history.csv

    def log_final(self, run_dir: Path) -> None:
        for key, value in final_scalars(run_dir).items():
            self.writer.add_scalar(key, value, global_step=self.last_step)
        for path in RunFolder(run_dir).plot_files():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"plots/{path.stem}", pixels, global_step=self.last_step, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def mlflow_tracking_uri(run_dir: Path, mlflow_uri: str | None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the run folder.

    SQLite, not a ./mlruns folder: MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set.
    """
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(RunFolder(run_dir).mlflow_dir / 'mlflow.db').resolve()}"


class MlflowTracker:
    """An MLflow run through ``MlflowClient``: params, metrics per epoch, final metrics, the run folder."""

    def __init__(self, run_dir: Path, mlflow_uri: str | None, resuming: bool):
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_tracking_uri(run_dir, mlflow_uri)
        embedded = not (mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        folder = RunFolder(run_dir)
        if embedded:
            folder.mlflow_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._previous_run(run_dir) if resuming else None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # the embedded store keeps its artifacts beside its database, in the run folder
                location = (folder.mlflow_dir / "artifacts").resolve().as_uri() if embedded else None
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            run = self.client.create_run(
                experiment_id, run_name=run_dir.name, tags={"resfit.run_dir": str(run_dir.resolve())}
            )
            self.run_id = run.info.run_id
            folder.write_tracking({"mlflow": {"tracking_uri": self.uri, "run_id": self.run_id}})
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        # the epochs this run has (val_acc is in every history row): a resumed run's replay skips them
        self.logged_epochs = {m.step for m in self.client.get_metric_history(self.run_id, "val_acc")}
        self.last_step = 0

    def _previous_run(self, run_dir: Path) -> str | None:
        """The run an interrupted training logged to, if it went to this same store."""
        tracking = RunFolder(run_dir).read_tracking()
        if tracking is None:
            return None
        previous = tracking.get("mlflow", {})
        return previous.get("run_id") if previous.get("tracking_uri") == self.uri else None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # A resumed run logged them already (MLflow refuses to change a param): add only the missing ones.
        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(key, value) for key, value in flat_params(params).items() if key not in logged]
        if fresh:
            self.client.log_batch(self.run_id, params=fresh)

    def _log_metrics(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, row: dict) -> None:
        self.last_step = int(row["epoch"])
        if self.last_step not in self.logged_epochs:
            self._log_metrics(epoch_scalars(row), self.last_step)
            self.logged_epochs.add(self.last_step)

    def log_final(self, run_dir: Path) -> None:
        self._log_metrics(final_scalars(run_dir), self.last_step)
        for path in sorted(run_dir.iterdir()):
            if path.name in NOT_ARTIFACTS or path.name.startswith("."):
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Tracking:
    """The trackers of one run behind one call each; a backend that raises is dropped with one warning."""

    def __init__(self, trackers: dict[str, Tracker], say: Callable[[str], None]):
        self.trackers = dict(trackers)
        self.say = say

    @classmethod
    def off(cls) -> Tracking:
        return cls({}, lambda _message: None)

    def _each(self, action: str, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except (
                Exception
            ) as error:  # a tracking backend's failure (server down, disk full) must not end training
                del self.trackers[name]
                reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                self.say(f"warning: {name} tracking stopped ({action} failed: {reason}); training continues")

    def log_params(self, params: dict) -> None:
        self._each("logging the config", lambda tracker: tracker.log_params(params))

    def log_epoch(self, row: dict) -> None:
        self._each(f"logging epoch {row['epoch']}", lambda tracker: tracker.log_epoch(row))

    def log_final(self, run_dir: Path) -> None:
        self._each("logging the results", lambda tracker: tracker.log_final(run_dir))

    def close(self, status: str = "FINISHED") -> None:
        self._each("closing", lambda tracker: tracker.close(status))
        self.trackers.clear()


def open_tracking(
    log, mlflow_uri: str | None, run_dir: Path, resuming: bool, say: Callable[[str], None]
) -> Tracking:
    """The trackers ``--log`` names, opened on the run folder; one that cannot start is skipped with a warning."""
    check_trackers(log, mlflow_uri)
    require_tracker_packages(log)
    openers = {
        "tensorboard": lambda: TensorBoardTracker(RunFolder(run_dir).tensorboard_dir, resuming),
        "mlflow": lambda: MlflowTracker(run_dir, mlflow_uri, resuming),
    }
    trackers: dict[str, Tracker] = {}
    for name in tracker_names(log):
        try:
            trackers[name] = openers[name]()
        except ImportError as error:  # installed but broken (a version clash): the user can fix that
            raise ConfigError(
                f"--log {name}: importing it failed ({error}): pip install 'resfit[track]'"
            ) from error
        except Exception as error:  # an unreachable server, a store that will not open: train without it
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            say(f"warning: {name} tracking not started ({reason}); training continues without it")
            continue
        where = RunFolder(run_dir).tensorboard_dir if name == "tensorboard" else trackers[name].uri
        say(f"tracking: {name} -> {where}")
    return Tracking(trackers, say)
