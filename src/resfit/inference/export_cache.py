"""The export cache: a run's model exported once per distinct weights (fp32 ONNX/OpenVINO, gated int8) for the
engines, so a second load of the same model on this machine starts at once.

A ``LoadedRun`` is read once per process (model, metadata, weights digest) and every export is made from it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.transforms import Preprocessing
from ..errors import ExportError, ImageReadError
from ..fileio import atomic_write_json
from ..run_folder import RunFolder, load_model
from ..version import __version__
from .engines import OpenVinoBackend, TorchBackend
from .formats import FILE_NAMES, load_exported, write_export


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
    source = RunFolder.listing(data, meta)
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
    with open(RunFolder(run_dir).weights_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedRun:
    """A run's model as the engines run it (its TTA and feature outputs applied), with its metadata: read once
    per process, and the source of every export made from it. The weights digest is computed on first use."""

    run_dir: Path
    model: torch.nn.Module
    meta: dict
    features: bool = False

    @classmethod
    def read(cls, run_dir: str | os.PathLike, tta: str | None = None, features: bool = False) -> LoadedRun:
        model, meta = load_model(Path(run_dir), tta, features=features)
        return cls(Path(run_dir), model, meta, features)

    @cached_property
    def digest(self) -> str:
        return model_digest(self.run_dir)


def cached_export(
    run: LoadedRun, fmt: str, cache_dir: Path, say: Callable[[str], None] | None = None
) -> Path:
    """The run exported to ``fmt`` under ``cache_dir/exports``, exporting once per distinct model and TTA.

    With ``run.features`` the engine's graph also outputs the pooled features (model_wrappers.WithFeatures)."""
    meta = run.meta
    described = json.dumps(
        [
            meta["architecture"],
            meta["class_names"],
            meta["preprocessing"],
            meta["tta"],
            meta.get("temperature", 1.0),
            meta.get("reject"),
            run.features,
            __version__,
        ]
    )
    key = hashlib.sha256((run.digest + described).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "exports" / f"{meta['architecture']}-{key}" / FILE_NAMES[fmt]
    if path.is_file():
        return path
    if say is not None:
        say(f"exporting the model to {fmt} once (cached in {path.parent})")
    write_export(run.model, meta, fmt, path, run.digest)
    _check_against_torch(run.model, meta, fmt, path)
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
# The gate is checked on validation images (which the accuracy control below also steers by) and on training
# images that were neither calibrated nor steered on, each alone: top-1 must match fp32 on >= 99.5% of both
# (at most 1 image in 200 flips). The classifier head (the MatMul) stays in fp32: the layer whose int8 error
# moves the answers most directly.
INT8_MIN_AGREEMENT = 0.995
INT8_CALIBRATION_IMAGES = 300
INT8_CHECK_IMAGES = 200  # per split checked (validation, training)
# Where plain int8 flips too many validation answers, NNCF's accuracy control puts the layers that flip most
# back in fp32, up to this many times: on the default ants/bees run 18 of 73 quantizers went back to fp32
# and validation agreement rose from 98.7% to 100%, with training images it never saw at 100% either way.
INT8_RESTORE_STEPS = 30
# NNCF ranks every quantizer group by the accuracy of the model with that group back in fp32, on this many
# validation images: the ones plain int8 flips first, then others. Left to NNCF it is the calibration size
# (so every validation image), and that ranking was most of the 678 s first load above. Measured side by
# side (benchmarks/int8_first_load.py, ResNet-50 at 224 px, quiet 2 cores, AVX2): 238 s against 367 s, the
# same 66 quantizers left int8 and the same agreement.
INT8_RANKING_IMAGES = 50


def int8_gate() -> dict:
    """What a cached verdict was reached under: a verdict under another gate is not reused."""
    return {
        "min_agreement": INT8_MIN_AGREEMENT,
        "checked_on": ["val", "train"],
        "head": "fp32",
        "accuracy_control": True,
        "version": 3,
    }


def int8_split(train: list, calibration: int = INT8_CALIBRATION_IMAGES, check: int = INT8_CHECK_IMAGES):
    """(calibration images, training images to check on), disjoint: with enough images the first
    ``calibration`` calibrate and the next ``check`` are checked; with fewer they alternate, so both
    halves keep every class (``run_images`` yields the classes in turn)."""
    if len(train) >= calibration + check:
        return train[:calibration], train[calibration : calibration + check]
    return train[0::2], train[1::2]


def cached_int8_export(
    run: LoadedRun,
    cache_dir: Path,
    say: Callable[[str], None] | None = None,
    ranking_images: int | None = INT8_RANKING_IMAGES,
) -> tuple[Path, str]:
    """(int8 IR, one-line summary of its agreement with fp32); quantizes once per model, refuses if it disagrees.

    The first time costs the quantization (up to 300 calibration images), the fp32 and int8 passes over up to
    400 check images and, where plain int8 flips too many, NNCF's accuracy control (its ranking of layers
    dominated: 678 s for the default ants/bees run on a busy 2-core machine); then nothing: the verdict is
    cached either way, so a refused model is not quantized again. ``ranking_images``: NNCF's ranking subset
    (None: NNCF's own choice, every validation image; benchmarks/int8_first_load.py compares them).
    """
    fp32_ir = cached_export(run, "openvino", cache_dir, say)
    path, verdict_path = _int8_paths(fp32_ir)
    verdict = _reached_verdict(fp32_ir)
    if verdict is not None:
        if not verdict["kept"]:
            raise ExportError(verdict["summary"])
        return path, verdict["summary"]
    if importlib.util.find_spec("nncf") is None:
        raise ExportError("int8 needs NNCF: pip install nncf")
    model, meta = run.model, run.meta
    transform = Preprocessing.from_dict(meta["preprocessing"]).eval_transform()
    classes = len(meta["class_names"])  # the logits; any columns after them are features

    def images_of(split: str, count: int, purpose: str) -> list:
        images = [transform(image) for _, image in run_images(meta, split, count, purpose)]
        if not images:
            raise ExportError(f"no readable {split} image in {meta['data']['path']} to {purpose}")
        return images

    train = images_of("train", INT8_CALIBRATION_IMAGES + INT8_CHECK_IMAGES, "calibrate int8 on")
    calibration, train_check = (torch.stack(part).numpy() for part in int8_split(train))
    checks = {
        "validation": torch.stack(images_of("val", INT8_CHECK_IMAGES, "check int8 against fp32 on")).numpy(),
        "training": train_check,
    }
    if say is not None:
        say(
            f"quantizing to int8 once: calibrating on {len(calibration)} training images, checking against "
            f"fp32 on {sum(map(len, checks.values()))} others (cached in {path.parent})"
        )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as workdir:
        staged = Path(workdir) / path.name
        fp32 = TorchBackend(model, "fp32")
        references = {split: fp32(images)[:, :classes] for split, images in checks.items()}
        expected = references["validation"].argmax(1)
        started = time.perf_counter()
        _quantize(fp32_ir, calibration, staged, checks["validation"], expected, classes, ranking_images)
        engine = OpenVinoBackend(staged, max(1, torch.get_num_threads()), "int8")
        agreements, worst = {}, 0.0
        for split, images in checks.items():
            reference = references[split]
            quantized = np.concatenate([engine(images[i : i + 32]) for i in range(0, len(images), 32)])
            quantized = quantized[:, :classes]
            agreements[split] = float((quantized.argmax(1) == reference.argmax(1)).mean())
            worst = max(worst, float(np.abs(quantized - reference).max()))
        kept = min(agreements.values()) >= INT8_MIN_AGREEMENT
        seconds = time.perf_counter() - started
        summary = (
            "int8 agreed with fp32 on "
            + " and ".join(f"{agreements[s]:.1%} of {len(checks[s])} {s} images" for s in checks)
            + f" (max |logit difference| {worst:.2f})"
        )
        if not kept:
            summary += f": below the {INT8_MIN_AGREEMENT:.1%} needed on each, so it is not used"
        if kept:
            os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(staged, path)
    atomic_write_json(
        verdict_path,
        {
            "kept": kept,
            "agreement": agreements,
            "images": {s: len(v) for s, v in checks.items()},
            "gate": int8_gate(),
            "summary": summary,
            "quantize_seconds": round(seconds, 1),
            "ranking_images": ranking_images,
        },
    )
    if say is not None:
        say(f"int8 quantized and checked in {seconds:.0f} s, once: {'kept' if kept else 'not kept'}")
    if not kept:
        raise ExportError(summary)
    return path, summary


def int8_verdict_is_reached(run: LoadedRun, cache_dir: Path) -> bool:
    """Whether this model's int8 verdict (kept or refused, under today's gate) is cached, so that
    ``cached_int8_export`` answers at once instead of quantizing for minutes."""
    return _reached_verdict(cached_export(run, "openvino", cache_dir)) is not None


def _int8_paths(fp32_ir: Path) -> tuple[Path, Path]:
    """(int8 IR, its verdict) beside the fp32 IR they come from."""
    return fp32_ir.with_name("model-int8.xml"), fp32_ir.with_name("model-int8.json")


def _reached_verdict(fp32_ir: Path) -> dict | None:
    """The cached verdict if it was reached under today's gate (and a kept IR is still there), else None."""
    path, verdict_path = _int8_paths(fp32_ir)
    verdict = _read_verdict(verdict_path)
    if verdict is None or verdict.get("gate") != int8_gate():
        return None
    return verdict if not verdict["kept"] or path.is_file() else None


def _read_verdict(path: Path) -> dict | None:
    """The cached int8 verdict, or None when there is none or it cannot be read (then it is reached again)."""
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(verdict, dict) or not {"kept", "summary"} <= set(verdict):
        return None
    return verdict


def _quantize(
    fp32_ir: Path,
    calibration: np.ndarray,
    out: Path,
    check: np.ndarray,
    expected: np.ndarray,
    classes: int,
    ranking_images: int | None,
) -> None:
    """NNCF post-training quantization of the fp32 IR to ``out`` (see ``_quantize_here``), in a process of
    its own: NNCF makes many short-lived OpenVINO cores, and cores freed out of order break this process's
    signal handling (why, in ``engines.openvino_core``); in a child they never touch ours.

    The child is a daemon: when the parent exits mid-quantization (Ctrl-C in ``serve``, which quantizes in
    the background) it is stopped, not waited for, and no verdict is written, so the next start begins again.
    """
    arrays, failure = out.with_name("int8-inputs.npz"), out.with_name("int8-failure.txt")
    np.savez(arrays, calibration=calibration, check=check, expected=expected)
    quantize = functools.partial(
        _quantize_here, str(fp32_ir), str(arrays), str(out), classes, ranking_images, 1.0 - INT8_MIN_AGREEMENT
    )
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of our threads or cores
    process = spawn.Process(target=_report_failure, args=(quantize, str(failure)), daemon=True)
    try:
        process.start()
        process.join()
        if process.exitcode < 0:  # a signal: this process exiting (daemon), or the OOM killer
            raise ExportError(
                f"int8 quantization was stopped before it finished (signal {-process.exitcode}); no verdict "
                "was kept, so the next load quantizes again"
            )
        if process.exitcode != 0:
            why = failure.read_text() if failure.is_file() else f"exit code {process.exitcode}"
            raise ExportError(f"int8 quantization failed: {' '.join(why.split())}")
    finally:
        arrays.unlink(missing_ok=True)
        failure.unlink(missing_ok=True)


def _report_failure(work: Callable[[], None], failure: str) -> None:
    """Run ``work`` in the quantizing child; an exception's one-line text goes to ``failure`` for the parent."""
    try:
        work()
    except BaseException as error:
        Path(failure).write_text(f"{type(error).__name__}: {error}")
        raise SystemExit(1) from None


def _quantize_here(
    fp32_ir: str, arrays: str, out: str, classes: int, ranking_images: int | None, max_drop: float
) -> None:
    """NNCF post-training quantization of the fp32 IR under accuracy control: where int8 flips more than
    ``max_drop`` of fp32's answers ``expected`` (class indices among the first ``classes`` outputs) on
    ``check`` (validation images), the layers that flip most go back to fp32, one group at a time (at most
    INT8_RESTORE_STEPS), ranked on ``ranking_images`` of them. Logs and progress kept off stdout."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    with np.load(arrays) as saved:
        calibration, check, expected = saved["calibration"], saved["check"], saved["expected"]

    def agreement(candidate, images) -> tuple[float, list[float]]:
        answers = np.concatenate([candidate(image)[0][:, :classes] for image in images]).argmax(1)
        same = (answers == expected[: len(answers)]).astype(float)
        return float(same.mean()), same.tolist()

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize_with_accuracy_control(
                ov.Core().read_model(str(fp32_ir)),
                nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
                nncf.Dataset([check[i : i + 1] for i in range(len(check))]),
                agreement,
                max_drop=max_drop,
                subset_size=len(calibration),
                preset=nncf.QuantizationPreset.PERFORMANCE,
                # the classifier head stays fp32 (see int8_gate); no MatMul at all is not an error
                ignored_scope=nncf.IgnoredScope(types=["MatMul"], validate=False),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=INT8_RESTORE_STEPS,
                    num_ranking_workers=1,
                    ranking_subset_size=ranking_images,
                ),
            )
    finally:
        logger.setLevel(level)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
