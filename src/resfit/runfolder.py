"""The run folder's model files: model.safetensors (weights, no pickle) + model.json (everything to use them)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .data.transforms import Preprocessing
from .errors import ConfigError, RunFolderError
from .fileio import atomic_write, atomic_write_json
from .model_wrappers import EnsembleModel, TemperatureScaled, TTAWrapper, WithFeatures, check_tta, tta_sizes
from .models import build_model, check_architecture

FORMAT = "resfit-run"
FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
ENSEMBLE = (
    "ensemble"  # model.json "architecture" of a late-fusion ensemble; its members are listed in "members"
)
MAX_CLASSES = 100_000


def library_versions() -> dict[str, str]:
    import numpy
    import PIL

    from .version import __version__
    from .vision import torchvision

    return {
        "resfit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def save_weights(model: nn.Module, path: Path) -> None:
    """Float32, contiguous, torchvision key names: loadable by torchvision, safetensors, or --weights."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


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


def write_model(run_dir: Path, model: nn.Module, meta: dict) -> None:
    save_weights(model, run_dir / MODEL_WEIGHTS)
    atomic_write_json(run_dir / MODEL_META, meta)


def read_meta(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    meta_path = run_dir / MODEL_META
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder not found: {run_dir}")
    if not meta_path.is_file() or not (run_dir / MODEL_WEIGHTS).is_file():
        raise RunFolderError(
            f"{run_dir} has no trained model yet ({MODEL_META} and {MODEL_WEIGHTS} are written after the first epoch)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{meta_path}: cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{meta_path}: not valid JSON ({error})") from None
    check_meta(meta, meta_path)
    return meta


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
        where = ".".join(str(part) for part in first["loc"]) or "model.json"
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


def load_model(
    run_dir: Path, tta: str | None = None, calibrated: bool = True, features: bool = False
) -> tuple[nn.Module, dict]:
    """The trained model in eval mode on CPU, and its metadata; see ``with_tta`` for ``tta``.

    ``calibrated`` divides its logits by the run's fitted temperature; without it the module is exactly what
    model.safetensors holds (an ensemble is built from such members, so its weights file loads back).
    ``features`` appends the pooled features to the logits (model_wrappers.WithFeatures: the knn "unknown" score)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    model = build_from_meta(meta)
    try:
        state = load_file(str(run_dir / MODEL_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as error:
        raise RunFolderError(
            f"{run_dir / MODEL_WEIGHTS}: not a readable safetensors file ({error})"
        ) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RunFolderError(f"{run_dir / MODEL_WEIGHTS} does not match model.json: {error}") from error
    model, meta = with_tta(model.eval(), meta, tta)
    temperature = float(meta.get("temperature", 1.0))
    if calibrated and temperature != 1.0:  # fitted at the end of training: see calibration.py
        model = TemperatureScaled(model, temperature)
    if features:
        model = WithFeatures(model)
    return model.eval(), meta
