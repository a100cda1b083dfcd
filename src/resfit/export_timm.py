"""`resfit export --format timm`: a folder that timm loads as its own model, class names and preprocessing intact.

timm's ResNets (resnet18 to resnet152, resnext50_32x4d, resnext101_32x8d) use torchvision's parameter
names, key for key, so the folder's model.safetensors is the run's weights as they are, and config.json
is timm's pretrained config in the form the Hub uses (architecture, num_classes, label_names, and
pretrained_cfg with input_size, mean, std, crop_pct, interpolation). Loading it is one call:
``timm.create_model("local-dir:FOLDER", pretrained=True)``.

The fitted temperature is divided into the head (fc.weight / T, fc.bias / T), so timm's logits are
resfit's calibrated logits and a softmax of them gives the same probabilities; config.json's "resfit"
entry records it. Test-time augmentation is not part of a timm model: the folder holds the plain network.
A fused model (resnet50+resnet101) or an ensemble has no timm counterpart and is refused.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .errors import ExportError
from .fileio import atomic_write_json
from .model_wrappers import TemperatureScaled
from .models import ARCHITECTURES
from .version import __version__

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
NETWORK_STRIDE = 32  # a ResNet's last feature map is the input size / 32


def check_timm_exportable(meta: dict) -> None:
    """Refuse what timm has no model for, before anything is written."""
    architecture = meta["architecture"]
    if architecture not in ARCHITECTURES:
        raise ExportError(
            f"timm has no counterpart of {architecture!r} (a fused model or an ensemble): "
            f"--format timm takes one of {', '.join(ARCHITECTURES)}"
        )


def write_timm_folder(model: nn.Module, meta: dict, folder: Path, digest: str = "") -> Path:
    """config.json + model.safetensors in ``folder``, replaced whole (a staged folder, then a rename)."""
    check_timm_exportable(meta)
    network, temperature = _unwrap(model)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in network.state_dict().items()}
    if temperature != 1.0:
        tensors["fc.weight"] = tensors["fc.weight"] / temperature
        tensors["fc.bias"] = tensors["fc.bias"] / temperature
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".timm-export-"))
    try:
        save_file(tensors, str(staged / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(
            staged / CONFIG_FILE, timm_config(meta, tensors["fc.weight"].shape[1], temperature, digest)
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return folder


def timm_config(meta: dict, num_features: int, temperature: float, digest: str = "") -> dict:
    """timm's config.json for the run: what timm.data.resolve_data_config reads back as the preprocessing."""
    prep = meta["preprocessing"]
    crop, resize = int(prep["crop_size"]), int(prep["resize_size"])
    pool = math.ceil(crop / NETWORK_STRIDE)
    config = {
        "architecture": meta["architecture"],
        "num_classes": len(meta["class_names"]),
        "num_features": num_features,
        "global_pool": "avg",
        "label_names": list(meta["class_names"]),
        "pretrained_cfg": {
            "tag": "resfit",
            "custom_load": False,
            "input_size": [3, crop, crop],
            "fixed_input_size": False,
            "interpolation": prep["interpolation"],
            "crop_pct": crop_pct(crop, resize),
            "crop_mode": "center",
            "mean": list(prep["mean"]),
            "std": list(prep["std"]),
            "num_classes": len(meta["class_names"]),
            "pool_size": [pool, pool],
            "first_conv": "conv1",
            "classifier": "fc",
        },
        "resfit": {
            "format": "resfit-timm-export",
            "resfit_version": __version__,
            "temperature": temperature,
            "temperature_note": "already divided into fc.weight and fc.bias: a softmax gives calibrated probabilities",
            "tta": "not applied (a timm model is the plain network)",
            "stored_tta": meta.get("tta") or "none",
            "preprocessing": prep,
        },
    }
    if float(meta.get("dropout", 0.0)) > 0:
        config["model_args"] = {"drop_rate": float(meta["dropout"])}
    if digest:
        config["resfit"]["model_sha256"] = digest
    return config


def crop_pct(crop: int, resize: int) -> float:
    """crop / resize, nudged down where float rounding would make timm's floor(crop / crop_pct) one short."""
    value = crop / resize
    while math.floor(crop / value) < resize:
        value = math.nextafter(value, 0.0)
    return value


def import_timm():
    """timm, which checks every timm export by loading it; asked for before anything is written."""
    try:
        import timm
    except ImportError:
        raise ExportError("exporting to timm needs timm, whose load is the check: pip install timm") from None
    return timm


def load_timm_folder(folder: Path) -> nn.Module:
    """The folder as timm builds it (the check that the export works)."""
    timm = import_timm()
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as error:  # timm raises many types for a config or weights it cannot use
        raise ExportError(f"timm cannot load {folder}: {error}") from error


def _unwrap(model: nn.Module) -> tuple[nn.Module, float]:
    """The plain torchvision ResNet inside, and the temperature around it (1.0 if none)."""
    temperature = 1.0
    if isinstance(model, TemperatureScaled):
        model, temperature = model.model, model.temperature
    if not hasattr(model, "fc") or not isinstance(model.fc, nn.Linear):
        raise ExportError(f"--format timm takes a plain ResNet, got {type(model).__name__}")
    return model, temperature
