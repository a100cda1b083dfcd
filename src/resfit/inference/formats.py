"""The export formats an engine runs: writing a model to ONNX, OpenVINO IR, TorchScript or a timm folder, and
loading such a file back as an engine.

Every file carries what is needed to use it: the class names in index order and the preprocessing from
model.json (ONNX metadata_props, OpenVINO rt_info, a TorchScript extra file, timm's config.json: see
export_timm.py). The batch axis is dynamic; height and width are the run's crop size.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError, ResfitError
from ..export_timm import load_timm_folder, write_timm_folder
from ..fileio import atomic_write
from ..version import __version__
from .engines import OnnxRuntimeBackend, OpenVinoBackend, TorchBackend

FORMATS = ("onnx", "openvino", "torchscript", "timm")
FILE_NAMES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt", "timm": "timm"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_OPSET = 18
METADATA_PREFIX = "resfit."


def write_export(model: torch.nn.Module, meta: dict, fmt: str, path: Path, digest: str = "") -> Path:
    """The exported file(s) at ``path``, written atomically, with class names and preprocessing inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A copy: the caller's module may be an engine's too (channels_last), and .to() would change it in place.
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
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
