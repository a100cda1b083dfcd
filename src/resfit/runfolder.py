"""The run folder's model files: model.safetensors (weights, no pickle) + model.json (everything to use them)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data.transforms import Preprocessing
from .errors import RunFolderError
from .fileio import atomic_write, atomic_write_json
from .models import build_model
from .wrappers import EnsembleModel, TTAWrapper, check_tta, tta_sizes

FORMAT = "resfit-run"
FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
ENSEMBLE = (
    "ensemble"  # model.json "architecture" of a late-fusion ensemble; its members are listed in "members"
)


def library_versions() -> dict[str, str]:
    import numpy
    import PIL

    from . import __version__
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
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{meta_path}: not valid JSON ({error})") from error
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RunFolderError(f"{meta_path}: not a resfit run (or from a newer resfit)")
    return meta


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


def load_model(run_dir: Path, tta: str | None = None) -> tuple[nn.Module, dict]:
    """The trained model in eval mode on CPU, and its metadata; see ``with_tta`` for ``tta``."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    model = build_from_meta(meta)
    state = load_file(str(run_dir / MODEL_WEIGHTS))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RunFolderError(f"{run_dir / MODEL_WEIGHTS} does not match model.json: {error}") from error
    model, meta = with_tta(model.eval(), meta, tta)
    return model.eval(), meta
