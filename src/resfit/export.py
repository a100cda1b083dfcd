"""Export a run's model to ONNX, OpenVINO IR, TorchScript or a timm folder, and prove on real images that it agrees.

Every exported file carries what is needed to use it: the class names in index order and the
preprocessing from model.json (ONNX metadata_props, OpenVINO rt_info, a TorchScript extra file, timm's
config.json: see export_timm.py). The batch axis is dynamic; height and width are the run's crop size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
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
from .errors import ExportError, ImageReadError, ResfitError
from .export_timm import check_timm_exportable, import_timm, load_timm_folder, write_timm_folder
from .fileio import atomic_write, atomic_write_json
from .runfolder import MODEL_WEIGHTS, load_model, read_meta

FORMATS = ("onnx", "openvino", "torchscript", "timm")
FILE_NAMES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt", "timm": "timm"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_OPSET = 18
DEFAULT_CHECK_IMAGES = 8
METADATA_PREFIX = "resfit."


@dataclass
class ExportConfig:
    """What to export where, and which real images prove the export right."""

    run_dir: str
    format: str = "onnx"
    out: str | None = None  # default: RUN_DIR/export/model.onnx | model.xml | model.pt | timm/ (a folder)
    check_images: list[str] = field(default_factory=list)  # default: validation images of the run's data
    num_check_images: int = DEFAULT_CHECK_IMAGES
    tta: str | None = None  # None: the run's stored test-time augmentation, baked into the exported graph

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


def write_export(model: torch.nn.Module, meta: dict, fmt: str, path: Path, digest: str = "") -> Path:
    """The exported file(s) at ``path``, written atomically, with class names and preprocessing inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    metadata = export_metadata(meta, digest)
    writers = {
        "onnx": _write_onnx,
        "openvino": _write_openvino,
        "torchscript": _write_torchscript,
        "timm": lambda model, meta, metadata, path: write_timm_folder(model, meta, path, digest),
    }
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
        "output": f"{OUTPUT_NAME}: float32 (N, num_classes), before softmax, in class_names order"
        + (" (log of averaged probabilities: a softmax gives them back)" if _averages(meta) else ""),
        "tta": meta.get("tta", "none"),
        # already divided into the output: a softmax of it is the calibrated probability
        "temperature": str(meta.get("temperature", 1.0)),
        # the run's "unknown" rule on this output (rejection.py): msp = max softmax, energy = logsumexp;
        # answer "unknown" when the score is below the threshold ("null": always answer)
        "reject": json.dumps(meta.get("reject")),
    }
    if digest:
        values["model_sha256"] = digest
    return values


def _averages(meta: dict) -> bool:
    return meta["architecture"] == "ensemble" or meta.get("tta", "none") != "none"


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
                dynamic_shapes=({0: batch},),
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
    if fmt == "timm":
        return TorchBackend(load_timm_folder(Path(path)), precision)
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
    images = list(run_images(meta, "val", count, purpose="check the export on"))
    if not images:
        raise ExportError(
            f"no readable image in {meta['data']['path']} to check the export on: pass --check-images"
        )
    return images


def run_images(meta: dict, split: str, count: int, purpose: str) -> Iterator[tuple[str, Image.Image]]:
    """Up to ``count`` readable images of one split of the run's own data, each class in turn."""
    data = (meta.get("data") or {}).get("path")
    if not data or not Path(data).exists():
        raise ExportError(
            f"the run's data ({data or 'not recorded in model.json'}) is not here to {purpose}: "
            + (
                "pass --check-images with a few real images"
                if split == "val"
                else "use --precision fp32 or bf16"
            )
        )
    training = meta.get("training_config") or {}
    source = discover(data, val_fraction=training.get("val_fraction", 0.2), seed=training.get("seed", 0))
    chosen = source.splits.get(split) or next(iter(source.splits.values()))
    by_class: dict[int, list[str]] = {}
    for item, label in sorted(zip(chosen.items, chosen.labels, strict=True)):
        by_class.setdefault(label, []).append(item)
    queues = [by_class[label] for label in sorted(by_class)]
    given = 0
    while given < count and any(queues):
        for queue in queues:
            if queue and given < count:
                item = queue.pop(0)
                try:
                    image = source.read(item)[0]
                except ImageReadError:
                    continue  # the scan would have skipped it too
                given += 1
                yield item, image


def model_digest(run_dir: Path) -> str:
    """sha256 of model.safetensors: exports in the cache are keyed by the exact weights."""
    digest = hashlib.sha256()
    with open(run_dir / MODEL_WEIGHTS, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_export(
    run_dir: str | os.PathLike,
    fmt: str,
    cache_dir: Path,
    say: Callable[[str], None] | None = None,
    tta: str | None = None,
    features: bool = False,
) -> Path:
    """The run exported to ``fmt`` under ``cache_dir/exports``, exporting once per distinct model and TTA.

    ``features``: the engine's graph also outputs the pooled features (rejection.WithFeatures)."""
    run_dir = Path(run_dir)
    model, meta = load_model(run_dir, tta, features=features)
    digest = model_digest(run_dir)
    described = json.dumps(
        [
            meta["architecture"],
            meta["class_names"],
            meta["preprocessing"],
            meta["tta"],
            meta.get("temperature", 1.0),
            meta.get("reject"),
            features,
            __version__,
        ]
    )
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


# int8: OpenVINO IR quantized by NNCF, calibrated on the run's training images, kept only where it agrees.
INT8_MIN_AGREEMENT = 0.99
INT8_CALIBRATION_IMAGES = 300
INT8_CHECK_IMAGES = 200


def cached_int8_export(
    run_dir: str | os.PathLike,
    cache_dir: Path,
    say: Callable[[str], None] | None = None,
    tta: str | None = None,
    features: bool = False,
) -> tuple[Path, str]:
    """(int8 IR, one-line summary of its agreement with fp32); quantizes once per model, refuses if it disagrees.

    Calibration uses up to 300 training images of the run's own data; the check uses up to 200
    validation images, and the int8 model is kept only if its top-1 matches fp32 on >= 99% of them.
    The verdict is cached either way, so a refused model is not quantized again on every load.
    """
    fp32_ir = cached_export(run_dir, "openvino", cache_dir, say, tta, features)
    path, verdict_path = fp32_ir.with_name("model-int8.xml"), fp32_ir.with_name("model-int8.json")
    if verdict_path.is_file():
        verdict = json.loads(verdict_path.read_text())
        if not verdict["kept"]:
            raise ExportError(verdict["summary"])
        if path.is_file():
            return path, verdict["summary"]
    try:
        import nncf
    except ImportError:
        raise ExportError("--precision int8 needs NNCF: pip install nncf") from None
    model, meta = load_model(Path(run_dir), tta, features=features)
    transform = Preprocessing.from_dict(meta["preprocessing"]).eval_transform()
    classes = len(meta["class_names"])  # the logits; any columns after them are features

    def batch_of(split: str, count: int, purpose: str) -> np.ndarray:
        tensors = [transform(image) for _, image in run_images(meta, split, count, purpose)]
        if not tensors:
            raise ExportError(f"no readable {split} image in {meta['data']['path']} to {purpose}")
        return torch.stack(tensors).numpy()

    calibration = batch_of("train", INT8_CALIBRATION_IMAGES, "calibrate int8 on")
    check = batch_of("val", INT8_CHECK_IMAGES, "check int8 against fp32 on")
    if say is not None:
        say(
            f"quantizing to int8 once: calibrating on {len(calibration)} training images (cached in {path.parent})"
        )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as workdir:
        staged = Path(workdir) / path.name
        _quantize(nncf, fp32_ir, calibration, staged)
        threads = max(1, torch.get_num_threads())
        reference = TorchBackend(model, "fp32")(check)
        quantized = np.concatenate(
            [
                OpenVinoBackend(staged, threads, "int8")(chunk)
                for chunk in np.array_split(check, max(1, len(check) // 32))
            ]
        )
        quantized, reference = quantized[:, :classes], reference[:, :classes]
        agreement = float((quantized.argmax(1) == reference.argmax(1)).mean())
        kept = agreement >= INT8_MIN_AGREEMENT
        summary = (
            f"int8 agreed with fp32 on {agreement:.1%} of {len(check)} validation images "
            f"(max |logit difference| {float(np.abs(quantized - reference).max()):.2f})"
        )
        if not kept:
            summary += f": below the {INT8_MIN_AGREEMENT:.0%} needed, so it is not used; use --precision fp32 or bf16"
        if kept:
            os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(staged, path)
    atomic_write_json(
        verdict_path, {"kept": kept, "agreement": agreement, "images": len(check), "summary": summary}
    )
    if not kept:
        raise ExportError(summary)
    return path, summary


def _quantize(nncf, fp32_ir: Path, calibration: np.ndarray, out: Path) -> None:
    """NNCF post-training quantization of the fp32 IR; its progress bars and logs kept off stdout."""
    import openvino as ov

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(
                ov.Core().read_model(str(fp32_ir)),
                nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
                subset_size=len(calibration),
                preset=nncf.QuantizationPreset.PERFORMANCE,
            )
    finally:
        logger.setLevel(level)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
