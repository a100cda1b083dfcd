"""The run folder: every file a run holds, named once, and the one place that reads and writes them.

``RunFolder(path)`` names each file (model, config, history, reports, plots, resume state, tracking), owns
the read/write pairs, rebuilds the run's dataset from its saved split settings, and evaluates a finished
model into its reports. It took over runfolder.py (model.safetensors + model.json alone), so the folder
has one module, not two with near-identical names. Modules that compute what goes into a file (plots,
the temperature, the "unknown" rule, the range test) take the path or the ``RunFolder`` from here.
"""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file, save_file
from torch import nn

from .calibration import calibration_scores, scaled_logits
from .data.decoded_cache import holding
from .data.scan import REPORT_FILE, DataReport, load_dataset
from .data.sources import discover
from .data.splits import SPLIT_SEED, VAL_FRACTION, DatasetSource
from .data.transforms import Preprocessing
from .errors import ConfigError, RunFolderError
from .evaluate import evaluate_split, metrics_of_output
from .fileio import atomic_write, atomic_write_json, atomic_write_text
from .hardware import Runtime
from .metrics import misclassified_examples
from .model_wrappers import EnsembleModel, TemperatureScaled, TTAWrapper, WithFeatures, check_tta, tta_sizes
from .models import build_model, check_architecture
from .plots import plot_confusion_matrix, plot_misclassified
from .rejection import FEATURE_SCORES, RejectRule, needs_features

if TYPE_CHECKING:
    from .data.decoded_cache import DecodedImages

FORMAT = "resfit-run"
FORMAT_VERSION = 1
ENSEMBLE = (
    "ensemble"  # model.json "architecture" of a late-fusion ensemble; its members are listed in "members"
)
MAX_CLASSES = 100_000
HISTORY_COLUMNS = (
    "epoch",
    "stage",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "seconds",
    "elapsed",
    "images_per_s",
)
# Written only by runs that have them (--ema-keep better: which of the two models stood for the epoch).
OPTIONAL_HISTORY_COLUMNS = ("kept_weights", "average_val_acc", "network_val_acc")
SPLITS = ("val", "test")  # the splits a run reports on; val's files carry no suffix


@dataclass(frozen=True)
class RunFolder:
    """One run's folder on disk. Cheap to make: nothing is read until a method asks for it."""

    path: Path

    MODEL_WEIGHTS: ClassVar[str] = "model.safetensors"  # float32, torchvision key names, no pickle
    MODEL_META: ClassVar[str] = "model.json"  # everything needed to rebuild and use the weights
    TRAIN_CONFIG: ClassVar[str] = "train_config.json"  # every "auto" resolved: what --resume continues
    DATA_REPORT: ClassVar[str] = REPORT_FILE  # the scan's report (data/scan.py names it in its summary)
    HISTORY: ClassVar[str] = "history.csv"
    CURVES_PLOT: ClassVar[str] = "curves.png"
    RELIABILITY_PLOT: ClassVar[str] = "reliability.png"
    RISK_COVERAGE_PLOT: ClassVar[str] = "risk_coverage.png"
    REJECT_BANK: ClassVar[str] = "reject_bank.safetensors"  # training features for the knn "unknown" score
    LR_FIND: ClassVar[str] = "lr_find.json"
    LR_FIND_PLOT: ClassVar[str] = "lr_find.png"
    TRACKING: ClassVar[str] = (
        "tracking.json"  # which MLflow run this folder logs to, so --resume continues it
    )
    TENSORBOARD_DIR: ClassVar[str] = "tensorboard"
    MLFLOW_DIR: ClassVar[str] = "mlflow"  # the embedded default store: mlflow.db and artifacts/
    MEMBERS_DIR: ClassVar[str] = (
        "members"  # an ensemble's copies of its members' weights, where it keeps them
    )
    RESUME_DIR: ClassVar[str] = "resume"  # scratch: the last epoch's full state
    RESUME_STATE: ClassVar[str] = "state.json"
    START_WEIGHTS: ClassVar[str] = "start.safetensors"  # where fine-tuning started, for --wise-ft
    # per split: metrics{suffix}.json, confusion_matrix{suffix}.png, misclassified{suffix}.json/.png
    METRICS, CONFUSION_PLOT, MISCLASSIFIED, MISCLASSIFIED_PLOT = (
        ("metrics", ".json"),
        ("confusion_matrix", ".png"),
        ("misclassified", ".json"),
        ("misclassified", ".png"),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- names --------------------------------------------------------------------------------------
    @classmethod
    def split_suffix(cls, split: str) -> str:
        return "" if split == "val" else f"_{split}"

    @classmethod
    def named_files(cls, splits: tuple[str, ...] = SPLITS) -> set[str]:
        """Every top-level file and folder name a run may hold (the resume folder's own are below)."""
        per_split = {
            f"{stem}{cls.split_suffix(split)}{extension}"
            for split in splits
            for stem, extension in (
                cls.METRICS,
                cls.CONFUSION_PLOT,
                cls.MISCLASSIFIED,
                cls.MISCLASSIFIED_PLOT,
            )
        }
        return per_split | {
            cls.MODEL_WEIGHTS,
            cls.MODEL_META,
            cls.TRAIN_CONFIG,
            cls.DATA_REPORT,
            cls.HISTORY,
            cls.CURVES_PLOT,
            cls.RELIABILITY_PLOT,
            cls.RISK_COVERAGE_PLOT,
            cls.REJECT_BANK,
            cls.LR_FIND,
            cls.LR_FIND_PLOT,
            cls.TRACKING,
            cls.TENSORBOARD_DIR,
            cls.MLFLOW_DIR,
            cls.MEMBERS_DIR,
            cls.RESUME_DIR,
        }

    def _file(self, name: tuple[str, str], split: str) -> Path:
        stem, extension = name
        return self.path / f"{stem}{self.split_suffix(split)}{extension}"

    def metrics_file(self, split: str = "val") -> Path:
        return self._file(self.METRICS, split)

    def confusion_plot(self, split: str = "val") -> Path:
        return self._file(self.CONFUSION_PLOT, split)

    def misclassified_file(self, split: str = "val") -> Path:
        return self._file(self.MISCLASSIFIED, split)

    def misclassified_plot(self, split: str = "val") -> Path:
        return self._file(self.MISCLASSIFIED_PLOT, split)

    def epoch_weights_file(self, epoch: int) -> Path:
        return self.resume_dir / f"epoch-{epoch}.safetensors"

    def epoch_weights_files(self) -> list[Path]:
        return sorted(self.resume_dir.glob("epoch-*.safetensors"))

    @property
    def weights_file(self) -> Path:
        return self.path / self.MODEL_WEIGHTS

    @property
    def meta_file(self) -> Path:
        return self.path / self.MODEL_META

    @property
    def train_config_file(self) -> Path:
        return self.path / self.TRAIN_CONFIG

    @property
    def data_report_file(self) -> Path:
        return self.path / self.DATA_REPORT

    @property
    def history_file(self) -> Path:
        return self.path / self.HISTORY

    @property
    def curves_plot(self) -> Path:
        return self.path / self.CURVES_PLOT

    @property
    def reliability_plot(self) -> Path:
        return self.path / self.RELIABILITY_PLOT

    @property
    def risk_coverage_plot(self) -> Path:
        return self.path / self.RISK_COVERAGE_PLOT

    @property
    def bank_file(self) -> Path:
        return self.path / self.REJECT_BANK

    @property
    def lr_find_file(self) -> Path:
        return self.path / self.LR_FIND

    @property
    def lr_find_plot(self) -> Path:
        return self.path / self.LR_FIND_PLOT

    @property
    def tracking_file(self) -> Path:
        return self.path / self.TRACKING

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD_DIR

    @property
    def mlflow_dir(self) -> Path:
        return self.path / self.MLFLOW_DIR

    @property
    def members_dir(self) -> Path:
        return self.path / self.MEMBERS_DIR

    @property
    def resume_dir(self) -> Path:
        return self.path / self.RESUME_DIR

    @property
    def state_file(self) -> Path:
        return self.resume_dir / self.RESUME_STATE

    @property
    def start_weights_file(self) -> Path:
        return self.resume_dir / self.START_WEIGHTS

    def plot_files(self) -> list[Path]:
        return sorted(self.path.glob("*.png"))

    # -- state of the run ---------------------------------------------------------------------------
    @property
    def has_model(self) -> bool:
        """model.json is there (written after the weights, from the first epoch on)."""
        return self.meta_file.is_file()

    @property
    def is_started(self) -> bool:
        """train_config.json is there: a run was started here (finished or not)."""
        return self.train_config_file.is_file()

    @property
    def is_finished(self) -> bool:
        """metrics.json is there: training ended with the kept model evaluated."""
        return self.metrics_file("val").is_file()

    # -- JSON files ---------------------------------------------------------------------------------
    @staticmethod
    def _load_json(path: Path) -> object:
        """Whatever JSON the file holds; a missing, unreadable or damaged file is a RunFolderError."""
        if not path.is_file():
            raise RunFolderError(f"{path} is missing")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{path}: cannot be read ({error})") from None
        except json.JSONDecodeError as error:
            raise RunFolderError(f"{path}: not valid JSON ({error})") from None

    @classmethod
    def _read_json(cls, path: Path) -> dict:
        """A JSON object from the run folder (as _load_json, and not a list or a number)."""
        found = cls._load_json(path)
        if not isinstance(found, dict):
            raise RunFolderError(f"{path}: expected a JSON object, got {type(found).__name__}")
        return found

    def write_train_config(self, config: dict) -> None:
        atomic_write_json(self.train_config_file, config)

    def read_train_config(self) -> dict:
        """The run's config as trained (TrainConfig.from_dict makes it a config again)."""
        if not self.train_config_file.is_file():
            raise RunFolderError(f"{self.path} is not a resfit run folder (no {self.TRAIN_CONFIG})")
        return self._read_json(self.train_config_file)

    def write_data_report(self, report: dict) -> None:
        atomic_write_json(self.data_report_file, report)

    def read_data_report(self) -> dict:
        return self._read_json(self.data_report_file)

    def write_metrics(self, metrics: dict, split: str = "val") -> None:
        atomic_write_json(self.metrics_file(split), metrics)

    def read_metrics(self, split: str = "val") -> dict:
        return self._read_json(self.metrics_file(split))

    def write_lr_find(self, result: dict) -> None:
        atomic_write_json(self.lr_find_file, result)

    def read_lr_find(self) -> dict:
        return self._read_json(self.lr_find_file)

    def write_tracking(self, tracking: dict) -> None:
        atomic_write_json(self.tracking_file, tracking)

    def read_tracking(self) -> dict | None:
        """What tracking.json records, or None where there is none."""
        return self._read_json(self.tracking_file) if self.tracking_file.is_file() else None

    # -- history.csv ----------------------------------------------------------------------------------
    def write_history(self, history: list[dict]) -> None:
        """One row per epoch (floats to 6 places, a missing value empty); written whole, atomically."""
        buffer = io.StringIO()
        optional = [c for c in OPTIONAL_HISTORY_COLUMNS if any(c in row for row in history)]
        writer = csv.DictWriter(
            buffer, fieldnames=[*HISTORY_COLUMNS, *optional], extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            )
        atomic_write_text(self.history_file, buffer.getvalue())

    def read_history(self) -> list[dict[str, str]]:
        """history.csv's rows as strings (empty: no value); [] where there is no history yet."""
        if not self.history_file.is_file():
            return []
        try:
            with self.history_file.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise RunFolderError(f"{self.history_file}: cannot be read ({error})") from None

    def training_seconds(self) -> float | None:
        """The run's training time as history.csv recorded it (the last row's ``elapsed``), if any."""
        rows = [row for row in self.read_history() if row.get("elapsed")]
        if not rows:
            return None
        try:
            return float(rows[-1]["elapsed"])
        except ValueError:
            raise RunFolderError(
                f"{self.history_file}: elapsed {rows[-1]['elapsed']!r} is not a number"
            ) from None

    # -- tensors ------------------------------------------------------------------------------------
    @staticmethod
    def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @staticmethod
    def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
        """A safetensors file's tensors; a missing, truncated or foreign file is a RunFolderError."""
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise RunFolderError(f"{path}: not a readable safetensors file ({error})") from None

    def write_resume(self, epoch: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """resume/epoch-<k>.safetensors, then state.json naming it (the JSON last: a kill at any moment
        leaves the last complete epoch resumable); older epochs' files go."""
        weights = self.epoch_weights_file(epoch)
        self._write_tensors(weights, tensors)
        atomic_write_json(self.state_file, {"epoch": epoch, "tensors": weights.name, **state})
        for old in self.epoch_weights_files():
            if old != weights:
                old.unlink(missing_ok=True)

    def read_resume(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """state.json and the tensors it names."""
        if not self.state_file.is_file():
            raise RunFolderError(
                f"{self.path} has no resume state ({self.RESUME_DIR}/{self.RESUME_STATE}): "
                "it stopped before its first one was written (after the first epoch that ends "
                "--resume-every seconds into training)"
            )
        state = self._read_json(self.state_file)
        return state, self._read_tensors(self.resume_dir / state["tensors"])

    def write_start_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self._write_tensors(self.start_weights_file, tensors)

    def read_start_weights(self) -> dict[str, torch.Tensor]:
        if not self.start_weights_file.is_file():
            raise RunFolderError(
                f"{self.start_weights_file} is missing: --wise-ft needs the weights fine-tuning started from"
            )
        return self._read_tensors(self.start_weights_file)

    def write_bank(self, features: np.ndarray) -> None:
        """The knn "unknown" score's bank of training features, in float16."""
        bank = np.ascontiguousarray(features, dtype=np.float16)
        atomic_write(self.bank_file, lambda tmp: save_numpy_file({"features": bank}, tmp))

    def read_bank(self) -> np.ndarray:
        path = self.bank_file
        try:
            bank = load_numpy_file(str(path))["features"].astype(np.float32)
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            raise RunFolderError(
                f'{path}: the "unknown" rule\'s feature bank is unreadable ({error})'
            ) from None
        if bank.ndim != 2 or len(bank) == 0 or not np.isfinite(bank).all():
            raise RunFolderError(
                f"{path}: the feature bank must be a non-empty, finite (images, features) array"
            )
        return bank

    def remove_bank(self) -> None:
        self.bank_file.unlink(missing_ok=True)

    # -- the model ----------------------------------------------------------------------------------
    def write_model(self, model: nn.Module, meta: dict) -> None:
        """Float32, contiguous, torchvision key names (loadable by torchvision, safetensors, or --weights),
        then model.json: a folder with model.json always has the weights beside it."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        self._write_tensors(self.weights_file, tensors, metadata={"format": "pt"})
        self.write_meta(meta)

    def write_meta(self, meta: dict) -> None:
        atomic_write_json(self.meta_file, meta)

    def read_meta(self) -> dict:
        """model.json, checked (check_meta): a missing or damaged one is a RunFolderError naming the problem."""
        if not self.path.is_dir():
            raise RunFolderError(f"run folder not found: {self.path}")
        if not self.meta_file.is_file() or not self.weights_file.is_file():
            raise RunFolderError(
                f"{self.path} has no trained model yet ({self.MODEL_META} and {self.MODEL_WEIGHTS} are written "
                "after the first epoch)"
            )
        meta = self._load_json(self.meta_file)
        check_meta(meta, self.meta_file)
        return meta

    def load_model(
        self, tta: str | None = None, calibrated: bool = True, features: bool = False
    ) -> tuple[nn.Module, dict]:
        """The trained model in eval mode on CPU, and its metadata; see ``with_tta`` for ``tta``.

        ``calibrated`` divides its logits by the run's fitted temperature; without it the module is exactly
        what model.safetensors holds (an ensemble is built from such members, so its weights file loads back).
        ``features`` appends the pooled features to the logits (model_wrappers.WithFeatures: the knn score)."""
        meta = self.read_meta()
        model = build_from_meta(meta)
        state = self._read_tensors(self.weights_file)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise RunFolderError(f"{self.weights_file} does not match {self.MODEL_META}: {error}") from error
        model, meta = with_tta(model.eval(), meta, tta)
        temperature = float(meta.get("temperature", 1.0))
        if calibrated and temperature != 1.0:  # fitted at the end of training: see calibration.py
            model = TemperatureScaled(model, temperature)
        if features:
            model = WithFeatures(model)
        return model.eval(), meta

    def reject_rule(self, meta: dict) -> RejectRule | None:
        """The "unknown" rule model.json holds (None: it has none), with its bank where its score needs one."""
        rule = meta.get("reject")
        if not rule:
            return None
        return RejectRule.from_dict(rule, self.read_bank() if rule.get("score") in FEATURE_SCORES else None)

    # -- the run's dataset --------------------------------------------------------------------------
    @staticmethod
    def split_settings(meta: dict) -> dict:
        """How the run split its data (TrainConfig's defaults where it does not record them): the same
        val_fraction and seed hold out the same validation photos of a folder without a val split."""
        training = meta.get("training_config") or {}
        return {
            "val_fraction": training.get("val_fraction", VAL_FRACTION),
            "seed": training.get("seed", SPLIT_SEED),
        }

    @classmethod
    def listing(cls, data: str | Path, meta: dict) -> DatasetSource:
        """``data``'s classes and files, split as the run split it; no file is opened (data/sources.discover)."""
        return discover(data, **cls.split_settings(meta))

    def dataset(
        self, data: str | Path | None = None, meta: dict | None = None, progress: bool = False
    ) -> tuple[DatasetSource, DataReport]:
        """``data`` (default: the run's own, as model.json records it) scanned and split as the run split it;
        ``meta``: the run's model.json where the caller has read it already."""
        meta = meta if meta is not None else self.read_meta()
        data = data or (meta.get("data") or {}).get("path")
        if not data:
            raise ConfigError(f"{self.path} does not record its data: pass --data")
        return load_dataset(data, progress=progress, **self.split_settings(meta))

    # -- evaluation reports -------------------------------------------------------------------------
    def write_evaluation(
        self, metrics: dict, probs: np.ndarray, source: DatasetSource, report_as: str | None = None
    ) -> None:
        """metrics, confusion_matrix and misclassified (.json/.png) of one split; ``report_as`` names the
        split the files are named after (default: the split the metrics are of)."""
        split = metrics["split"]
        report_as = report_as or split
        labels = np.asarray(source.splits[split].labels)
        items = source.splits[split].items
        self.write_metrics(metrics, report_as)
        plot_confusion_matrix(metrics["confusion_matrix"], source.class_names, self.confusion_plot(report_as))
        wrong = misclassified_examples(labels, probs, items, source.class_names)
        atomic_write_json(self.misclassified_file(report_as), wrong)
        plot_misclassified(wrong, lambda item: source.read(item)[0], self.misclassified_plot(report_as))

    def evaluate_and_report(
        self,
        source: DatasetSource,
        runtime: Runtime,
        calibration: dict,
        rejection: dict,
        num_workers: int = 0,
        decoded: Mapping[str, DecodedImages] | None = None,
        raw_val_logits: np.ndarray | None = None,
    ) -> dict[str, dict]:
        """Evaluate the saved (calibrated) model exactly as `resfit evaluate` would, on val and then test
        where the data has one, and write each split's reports; val's metrics also get the temperature fit
        and the "unknown" rule's figures. Returns the metrics per split.

        ``decoded``: training's decoded-image caches; a split's is read instead of its files where it holds
        this model's eval resize (the same pixels, data/decoded_cache.py). ``raw_val_logits``: this model's
        uncalibrated logits on val, in order, where the caller has them (the temperature was fitted on
        them): divided by the temperature as the model would (calibration.scaled_logits), they stand in for a
        second pass over val."""
        meta = self.read_meta()
        splits = [split for split in SPLITS if split in source.splits]
        if any(split != "val" or raw_val_logits is None for split in splits):  # a pass is needed: load it
            # with the run's test-time augmentation, if it has one, and the features its "unknown" rule needs
            model, meta = self.load_model(features=needs_features(meta.get("reject")))
            model.to(runtime.device, memory_format=torch.channels_last)
            preprocessing = Preprocessing.from_dict(meta["preprocessing"])
            rule = self.reject_rule(meta)
            decoded = holding(decoded or {}, preprocessing)
        results = {}
        for split in splits:
            if split == "val" and raw_val_logits is not None:
                labels = np.asarray(source.splits["val"].labels)
                if len(raw_val_logits) != len(labels):
                    raise ValueError(f"{len(raw_val_logits)} val logits for {len(labels)} val photos")
                logits = scaled_logits(raw_val_logits, float(meta.get("temperature", 1.0)))
                metrics, probs = metrics_of_output(logits, labels, source.class_names, split)
            else:
                metrics, probs = evaluate_split(
                    model,
                    source,
                    split,
                    preprocessing,
                    runtime,
                    num_workers,
                    reject=rule if split != "val" else None,
                    decoded=decoded.get(split),
                )
            metrics["calibration"] = calibration_scores(probs, np.asarray(source.splits[split].labels))
            if split == "val":
                metrics["temperature_scaling"], metrics["rejection"] = calibration, rejection
            self.write_evaluation(metrics, probs, source)
            results[split] = metrics
        return results


# -- model.json -------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    import numpy
    import PIL

    from .torchvision_import import torchvision
    from .version import __version__

    return {
        "resfit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def build_model_meta(
    architecture: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    dropout: float,
    **extra,
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "dropout": dropout,
        "preprocessing": preprocessing.to_dict(),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


class _MemberMeta(BaseModel):
    """One member of an ensemble as its model.json lists it."""

    model_config = ConfigDict(extra="allow")
    architecture: StrictStr
    num_classes: StrictInt = Field(ge=1)
    dropout: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    preprocessing: dict
    weight: float = Field(ge=0, le=1, allow_inf_nan=False)


class _RejectMeta(BaseModel):
    """The "unknown" rule (rejection.RejectRule) as model.json stores it."""

    model_config = ConfigDict(extra="allow")
    score: Literal["knn", "msp", "energy"]
    threshold: float = Field(allow_inf_nan=False)
    target: StrictStr


class _ModelMeta(BaseModel):
    """What model.json must hold for resfit to rebuild and use the model (other fields are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    format_version: StrictInt = Field(ge=1)
    architecture: StrictStr
    num_classes: StrictInt = Field(ge=1, le=MAX_CLASSES)
    class_names: list[StrictStr]
    dropout: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    preprocessing: dict
    tta: StrictStr | None = None
    members: list[_MemberMeta] | None = None
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    reject: _RejectMeta | None = None


def check_meta(meta: object, meta_path: Path) -> None:
    """model.json's fields, types and value ranges; the first problem is a RunFolderError naming the field."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunFolderError(f'{meta_path}: not a resfit run (no "format": "{FORMAT}")')
    if isinstance(meta.get("format_version"), int) and meta["format_version"] > FORMAT_VERSION:
        raise RunFolderError(
            f"{meta_path}: format_version {meta['format_version']} is from a newer resfit "
            f"(this one reads up to {FORMAT_VERSION})"
        )
    try:
        parsed = _ModelMeta.model_validate(meta)
    except ValidationError as error:
        problems = error.errors()
        first = problems[0]
        where = ".".join(str(part) for part in first["loc"]) or meta_path.name
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RunFolderError(f"{meta_path}: {where}: {first['msg']}{more}") from None
    try:
        _check_consistent(parsed, meta)
    except ConfigError as error:
        raise RunFolderError(f"{meta_path}: {error}") from None


def _check_consistent(parsed: _ModelMeta, meta: dict) -> None:
    if len(parsed.class_names) != parsed.num_classes:
        raise ConfigError(
            f"class_names lists {len(parsed.class_names)} names but num_classes is {parsed.num_classes}"
        )
    if len(set(parsed.class_names)) != len(parsed.class_names):
        raise ConfigError("class_names: the same name appears twice")
    try:
        Preprocessing.from_dict(meta["preprocessing"])
    except ConfigError as error:
        raise ConfigError(f"preprocessing.{error}") from None
    _named("tta", check_tta, parsed.tta or "none")
    if parsed.architecture != ENSEMBLE:
        _named("architecture", check_architecture, parsed.architecture)
        return
    if not parsed.members or len(parsed.members) < 2:
        raise ConfigError("members: an ensemble lists at least two members")
    for index, member in enumerate(parsed.members):
        if member.architecture == ENSEMBLE:
            raise ConfigError(f"members.{index}: an ensemble member cannot itself be an ensemble")
        _named(f"members.{index}.architecture", check_architecture, member.architecture)
        if member.num_classes != parsed.num_classes:
            raise ConfigError(f"members.{index}.num_classes: {member.num_classes}, not {parsed.num_classes}")
        try:
            Preprocessing.from_dict(member.preprocessing)
        except ConfigError as error:
            raise ConfigError(f"members.{index}.preprocessing.{error}") from None


def _named(field: str, check, value) -> None:
    """Run a ConfigError-raising check, with the field's name in front of its message."""
    try:
        check(value)
    except ConfigError as error:
        raise ConfigError(f"{field}: {error}") from None


def build_from_meta(meta: dict) -> nn.Module:
    """The untrained module model.json describes: one network, a fused one, or an ensemble of members."""
    if meta["architecture"] == ENSEMBLE:
        members = meta["members"]
        return EnsembleModel(
            [build_from_meta(member) for member in members],
            [float(member["weight"]) for member in members],
            (meta["preprocessing"]["mean"], meta["preprocessing"]["std"]),
            [(m["preprocessing"]["mean"], m["preprocessing"]["std"]) for m in members],
        )
    return build_model(meta["architecture"], meta["num_classes"], float(meta.get("dropout", 0.0)))


def with_tta(model: nn.Module, meta: dict, tta: str | None) -> tuple[nn.Module, dict]:
    """``model`` wrapped in the test-time augmentation ``tta`` asks for (None: the run's stored setting).

    The returned meta's "preprocessing" is what the returned module's input must be (multi-scale TTA
    takes a larger crop of the same field of view); the run's own is kept as "base_preprocessing".
    """
    mode = check_tta(tta if tta is not None else meta.get("tta") or "none")
    meta = dict(meta, tta=mode)
    if mode == "none":
        return model, meta
    base = Preprocessing.from_dict(meta["preprocessing"])
    sizes = tta_sizes(mode, base.crop_size)
    largest = max(sizes)
    resize = round(base.resize_size * largest / base.crop_size)
    wrapped_input = Preprocessing(largest, resize, base.mean, base.std, base.interpolation)
    meta.update(
        base_preprocessing=meta["preprocessing"], preprocessing=wrapped_input.to_dict(), tta_sizes=sizes
    )
    return TTAWrapper(model, mode, sizes), meta


# The short forms most callers want.
def read_meta(run_dir: str | Path) -> dict:
    return RunFolder(run_dir).read_meta()


def load_model(
    run_dir: str | Path, tta: str | None = None, calibrated: bool = True, features: bool = False
) -> tuple[nn.Module, dict]:
    return RunFolder(run_dir).load_model(tta, calibrated, features)


def write_model(run_dir: str | Path, model: nn.Module, meta: dict) -> None:
    RunFolder(run_dir).write_model(model, meta)
