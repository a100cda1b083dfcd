"""Export a run's model to ONNX, OpenVINO IR or TorchScript, and prove on real images that it still agrees.

Every exported file carries what is needed to use it: the class names in index order and the
preprocessing from model.json (ONNX metadata_props, OpenVINO rt_info, a TorchScript extra file).
The batch axis is dynamic; height and width are the run's crop size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .backends import OnnxRuntimeBackend, OpenVinoBackend, TorchBackend
from .data.images import open_rgb
from .data.sources import discover
from .data.transforms import Preprocessing
from .errors import ImageReadError, ResfitError
from .fileio import atomic_write
from .runfolder import MODEL_WEIGHTS, load_model

FORMATS = ("onnx", "openvino", "torchscript")
FILE_NAMES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_OPSET = 18
DEFAULT_CHECK_IMAGES = 8
METADATA_PREFIX = "resfit."


class ExportError(ResfitError):
    """The model could not be exported, or the exported model disagrees with PyTorch."""

    exit_code = 7


@dataclass
class ExportConfig:
    """What to export where, and which real images prove the export right."""

    run_dir: str
    format: str = "onnx"
    out: str | None = None  # default: RUN_DIR/export/model.onnx | model.xml | model.pt
    check_images: list[str] = field(default_factory=list)  # default: validation images of the run's data
    num_check_images: int = DEFAULT_CHECK_IMAGES

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
    model, meta = load_model(Path(config.run_dir))
    preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    labels, batch = check_batch(config, meta, preprocessing)
    path = config.output_path()
    say(f"exporting {meta['architecture']} to {config.format}: {path}")
    write_export(model, meta, config.format, path, model_digest(Path(config.run_dir)))
    exported = load_exported(config.format, path, precision="fp32")
    parity = compare_logits(TorchBackend(model, "fp32")(batch), exported(batch), labels)
    say(parity.describe(config.format))
    if parity.disagreements:
        for part in (path, path.with_suffix(".bin")) if config.format == "openvino" else (path,):
            part.unlink(missing_ok=True)  # nobody should ship a file that failed its check
        raise ExportError(
            f"{path}: the exported model picks a different class than PyTorch on "
            f"{len(parity.disagreements)} check image(s), so it was removed: {', '.join(parity.disagreements[:5])}"
        )
    return ExportResult(path, config.format, parity, time.perf_counter() - started)


def write_export(model: torch.nn.Module, meta: dict, fmt: str, path: Path, digest: str = "") -> Path:
    """The exported file(s) at ``path``, written atomically, with class names and preprocessing inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    metadata = export_metadata(meta, digest)
    writers = {"onnx": _write_onnx, "openvino": _write_openvino, "torchscript": _write_torchscript}
    try:
        writers[fmt](model, meta, metadata, path)
    except ResfitError:
        raise
    except Exception as error:  # exporters raise many types; the user needs one clear line
        raise ExportError(f"{fmt} export of {meta['architecture']} to {path} failed: {error}") from error
    return path


def export_metadata(meta: dict, digest: str = "") -> dict[str, str]:
    """String key/values stored in the exported model: enough to classify without model.json."""
    values = {
        "format": "resfit-export",
        "resfit_version": __version__,
        "architecture": meta["architecture"],
        "class_names": json.dumps(list(meta["class_names"])),
        "preprocessing": json.dumps(meta["preprocessing"]),
        "input": f"{INPUT_NAME}: float32 (N, 3, H, W), RGB scaled to [0, 1] then normalised as in preprocessing",
        "output": f"{OUTPUT_NAME}: float32 (N, num_classes), before softmax, in class_names order",
    }
    if digest:
        values["model_sha256"] = digest
    return values


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The resfit entries of an ONNX file's metadata_props, without the prefix."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        entry.key[len(METADATA_PREFIX) :]: entry.value
        for entry in proto.metadata_props
        if entry.key.startswith(METADATA_PREFIX)
    }


def _example_input(meta: dict) -> torch.Tensor:
    size = int(meta["preprocessing"]["crop_size"])
    # Batch 2, not 1: torch.export would specialise a batch of 1 into the graph.
    return torch.zeros(2, 3, size, size)


def _write_onnx(model, meta: dict, metadata: dict[str, str], path: Path) -> None:
    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as workdir:
        raw = Path(workdir) / "raw.onnx"
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter (deprecations of its own internals)
            torch.onnx.export(
                model,
                (_example_input(meta),),
                str(raw),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch}},
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(raw))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    proto.doc_string = (
        f"{meta['architecture']} fine-tuned by resfit: classes {', '.join(meta['class_names'])}"
    )
    onnx.checker.check_model(proto)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))


def _write_openvino(model, meta: dict, metadata: dict[str, str], path: Path) -> None:
    """Through ONNX, OpenVINO's best-trodden path in; the IR keeps fp32 weights (bf16 is a runtime hint)."""
    import openvino as ov

    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR is an .xml file (with a .bin beside it), got {path}")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".openvino-export-") as workdir:
        onnx_path = Path(workdir) / "model.onnx"
        _write_onnx(model, meta, metadata, onnx_path)
        ov_model = ov.convert_model(str(onnx_path))
        for key, value in metadata.items():
            ov_model.set_rt_info(value, ["resfit", key])
        staged = Path(workdir) / path.name
        ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        # The .bin first: an .xml in place always has its weights beside it.
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)


def _write_torchscript(model, meta: dict, metadata: dict[str, str], path: Path) -> None:
    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        traced = torch.jit.trace(model, _example_input(meta), check_trace=False)
        extra = {"resfit.json": json.dumps(metadata)}
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files=extra))


def load_exported(
    fmt: str, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A backend that runs an exported file: numpy batch in, numpy logits out."""
    threads = threads or max(1, torch.get_num_threads())
    if fmt == "onnx":
        return OnnxRuntimeBackend(path, threads)
    if fmt == "openvino":
        return OpenVinoBackend(path, threads, precision)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TorchBackend(torch.jit.load(str(path), map_location="cpu"), precision)
    raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")


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
    data = (meta.get("data") or {}).get("path")
    if not data or not Path(data).exists():
        raise ExportError(
            f"the run's data ({data or 'not recorded in model.json'}) is not here to check the export on: "
            "pass --check-images with a few real images"
        )
    training = meta.get("training_config") or {}
    source = discover(data, val_fraction=training.get("val_fraction", 0.2), seed=training.get("seed", 0))
    split = source.splits.get("val") or next(iter(source.splits.values()))
    by_class: dict[int, list[str]] = {}
    for item, label in sorted(zip(split.items, split.labels, strict=True)):
        by_class.setdefault(label, []).append(item)
    queues = [by_class[label] for label in sorted(by_class)]
    images: list[tuple[str, Image.Image]] = []
    while len(images) < count and any(queues):
        for queue in queues:
            if queue and len(images) < count:
                item = queue.pop(0)
                try:
                    images.append((item, source.read(item)[0]))
                except ImageReadError:
                    continue  # the scan would have skipped it too
    if not images:
        raise ExportError(f"no readable image in {data} to check the export on: pass --check-images")
    return images


def model_digest(run_dir: Path) -> str:
    """sha256 of model.safetensors: exports in the cache are keyed by the exact weights."""
    digest = hashlib.sha256()
    with open(run_dir / MODEL_WEIGHTS, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_export(
    run_dir: str | os.PathLike, fmt: str, cache_dir: Path, say: Callable[[str], None] | None = None
) -> Path:
    """The run exported to ``fmt`` under ``cache_dir/exports``, exporting once per distinct model file."""
    run_dir = Path(run_dir)
    model, meta = load_model(run_dir)
    digest = model_digest(run_dir)
    described = json.dumps([meta["architecture"], meta["class_names"], meta["preprocessing"], __version__])
    key = hashlib.sha256((digest + described).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "exports" / f"{meta['architecture']}-{key}" / FILE_NAMES[fmt]
    if path.is_file():
        return path
    if say is not None:
        say(f"exporting the model to {fmt} once (cached in {path.parent})")
    write_export(model, meta, fmt, path, digest)
    _check_against_torch(model, meta, fmt, path)
    return path


def _check_against_torch(model: torch.nn.Module, meta: dict, fmt: str, path: Path) -> None:
    """A cheap guard for on-the-fly exports: fp32 logits on a fixed input must match PyTorch's."""
    size = int(meta["preprocessing"]["crop_size"])
    batch = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    reference = TorchBackend(model, "fp32")(batch)
    exported = load_exported(fmt, path, "fp32")(batch)
    tolerance = 1e-3 * (1.0 + float(np.abs(reference).max()))
    if float(np.abs(reference - exported).max()) > tolerance:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise ExportError(f"the {fmt} export of {meta['architecture']} does not reproduce PyTorch's logits")
