"""The `export` command: a run's model to ONNX, OpenVINO IR, TorchScript or a timm folder (inference/formats.py),
proved on real images to agree.

Export a run's model to ONNX, OpenVINO IR, TorchScript or a timm folder, and prove on real images that it agrees.

Every exported file carries what is needed to use it: the class names in index order and the
preprocessing from model.json (ONNX metadata_props, OpenVINO rt_info, a TorchScript extra file, timm's
config.json: see export_timm.py). The batch axis is dynamic; height and width are the run's crop size.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import open_rgb
from .data.transforms import Preprocessing
from .errors import ExportError, ImageReadError
from .export_timm import check_timm_exportable, import_timm
from .inference.engines import TorchBackend
from .inference.export_cache import model_digest, run_images
from .inference.formats import FILE_NAMES, FORMATS, load_exported, write_export
from .model_wrappers import TTA_HELP, TTA_MODES
from .run_folder import load_model, read_meta
from .settings import setting

DEFAULT_CHECK_IMAGES = 8


@dataclass
class ExportConfig:
    """What to export where, and which real images prove the export right."""

    run_dir: str  # the command's positional RUN_DIR
    format: str = setting("onnx", choices=FORMATS, help="what to write")
    out: str | None = setting(
        None,
        help="output file, or folder for timm (default RUN_DIR/export/model.onnx|model.xml|model.pt|timm)",
    )
    check_images: list[str] = setting(
        default_factory=list,
        nargs="+",
        metavar="PATH",
        help="images or folders to check parity on (default: images from the run's validation data)",
    )
    num_check_images: int = setting(DEFAULT_CHECK_IMAGES, help="how many validation images by default")
    tta: str | None = setting(
        None,
        choices=TTA_MODES,
        help=f"{TTA_HELP}; default: the run's stored setting, baked into the exported graph",
    )

    def output_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.run_dir) / "export" / FILE_NAMES[self.format]


@dataclass
class ParityReport:
    """How close the exported model's logits are to eager fp32 PyTorch on the check images."""

    images: list[str]
    max_abs_logit_diff: float
    top1_agreement: float
    disagreements: list[str]

    def describe(self, what: str = "export") -> str:
        agreed = round(self.top1_agreement * len(self.images))
        return (
            f"{what} vs PyTorch fp32 on {len(self.images)} images: max |logit difference| "
            f"{self.max_abs_logit_diff:.2e}, top-1 agreement {agreed}/{len(self.images)}"
        )


@dataclass
class ExportResult:
    path: Path
    format: str
    parity: ParityReport
    seconds: float


def export_run(config: ExportConfig, say: Callable[[str], None] = print) -> ExportResult:
    """Write the exported model, then fail unless it picks the same top-1 class as PyTorch on every check image."""
    if config.format not in FORMATS:
        raise ExportError(f"unknown export format {config.format!r}: choose one of {', '.join(FORMATS)}")
    if config.num_check_images < 1:
        raise ExportError(f"need at least one check image, got {config.num_check_images}")
    started = time.perf_counter()
    model, meta = _load_for(config, say)
    preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    labels, batch = check_batch(config, meta, preprocessing)
    path = config.output_path()
    say(f"exporting {meta['architecture']} to {config.format}: {path}")
    write_export(model, meta, config.format, path, model_digest(Path(config.run_dir)))
    exported = load_exported(config.format, path, precision="fp32")
    parity = compare_logits(TorchBackend(model, "fp32")(batch), exported(batch), labels)
    say(parity.describe(config.format))
    if parity.disagreements:
        if config.format == "timm":
            shutil.rmtree(path, ignore_errors=True)  # nobody should ship a folder that failed its check
        for part in (path, path.with_suffix(".bin")) if config.format == "openvino" else (path,):
            part.unlink(missing_ok=True)  # nobody should ship a file that failed its check
        raise ExportError(
            f"{path}: the exported model picks a different class than PyTorch on "
            f"{len(parity.disagreements)} check image(s), so it was removed: {', '.join(parity.disagreements[:5])}"
        )
    return ExportResult(path, config.format, parity, time.perf_counter() - started)


def _load_for(config: ExportConfig, say: Callable[[str], None]) -> tuple[torch.nn.Module, dict]:
    """The model the export holds; a timm folder holds the plain network, whatever TTA the run stores."""
    if config.format != "timm":
        return load_model(Path(config.run_dir), config.tta)
    stored_meta = read_meta(Path(config.run_dir))
    check_timm_exportable(stored_meta)
    import_timm()
    if config.tta not in (None, "none"):
        raise ExportError(f"a timm model cannot hold test-time augmentation: drop --tta {config.tta}")
    stored = stored_meta.get("tta") or "none"
    model, meta = load_model(Path(config.run_dir), "none")
    if stored != "none":
        say(
            f"note: the run's stored TTA ({stored}) is not part of a timm model: the folder holds the plain network"
        )
    return model, {**meta, "tta": stored}


def compare_logits(reference: np.ndarray, exported: np.ndarray, labels: list[str]) -> ParityReport:
    """Max absolute logit difference and top-1 agreement of ``exported`` against ``reference``."""
    if reference.shape != exported.shape:
        raise ExportError(f"exported model returns shape {exported.shape}, PyTorch {reference.shape}")
    same = reference.argmax(axis=1) == exported.argmax(axis=1)
    return ParityReport(
        images=list(labels),
        max_abs_logit_diff=float(np.abs(reference - exported).max()),
        top1_agreement=float(same.mean()),
        disagreements=[label for label, ok in zip(labels, same, strict=True) if not ok],
    )


def check_batch(
    config: ExportConfig, meta: dict, preprocessing: Preprocessing
) -> tuple[list[str], np.ndarray]:
    """The check images, preprocessed exactly as predict does: (labels, float32 batch)."""
    if config.check_images:
        images = [(path, _read_check_image(path)) for path in config.check_images]
    else:
        images = default_check_images(meta, config.num_check_images)
    transform = preprocessing.eval_transform()
    batch = torch.stack([transform(image) for _, image in images]).numpy()
    return [label for label, _ in images], batch


def _read_check_image(path: str) -> Image.Image:
    try:
        return open_rgb(path)[0]
    except ImageReadError as error:
        raise ExportError(f"check image {error.path}: {error.reason}") from None


def default_check_images(meta: dict, count: int) -> list[tuple[str, Image.Image]]:
    """Up to ``count`` readable images from the run's own validation split, taking each class in turn."""
    images = list(run_images(meta, "val", count, purpose="check the export on"))
    if not images:
        raise ExportError(
            f"no readable image in {meta['data']['path']} to check the export on: pass --check-images"
        )
    return images
