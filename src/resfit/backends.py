"""Fast CPU inference: the same logits from eager PyTorch, ONNX Runtime or OpenVINO, picked by what the CPU can do.

Every backend takes a preprocessed float32 batch (N, 3, H, W) as numpy and returns float32 logits (N, C):
preprocessing stays in one place (``Preprocessing``) and the backends only differ in how fast they run.

Which one is fastest depends on the CPU, so ``choose_backend`` encodes a rule measured side by side by
``benchmarks/inference_backends.py`` (2-core runs, ResNet-50 at 224 px, batch 16):
- native bf16 (AVX512_BF16 / AMX): OpenVINO with bf16 inference precision, by far the fastest;
- AVX2 without native bf16: OpenVINO fp32 (bf16 would be emulated and slow);
- without OpenVINO: ONNX Runtime fp32, then eager PyTorch (bf16 autocast where native).
OpenVINO runs with ``PERFORMANCE_HINT=LATENCY``: one request uses every core. THROUGHPUT splits the cores
into streams, which only pays off with several requests in flight; it is measured, not assumed.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .hardware import CpuInfo

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
BACKEND_PRECISIONS = ("auto", "fp32", "bf16", "int8")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# Which precisions each backend can run on CPU.
# int8 is opt-in: it needs the run's images to calibrate on and is kept only where it agrees with fp32.
SUPPORTED_PRECISIONS = {
    "torch": ("fp32", "bf16"),
    "onnxruntime": ("fp32",),
    "openvino": ("fp32", "bf16", "int8"),
}
_PIP_NAMES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs the model, at which precision, and why: printed so nobody has to guess."""

    name: str
    precision: str
    reason: str
    performance_hint: str = "LATENCY"  # OpenVINO only

    def describe(self) -> str:
        return f"backend {self.name} ({self.precision}): {self.reason}"


def is_available(name: str) -> bool:
    """Whether the backend's package is installed (torch always is)."""
    if name == "torch":
        return True
    return importlib.util.find_spec(_PIP_NAMES[name]) is not None


def choose_backend(
    cpu: CpuInfo,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    performance_hint: str = "LATENCY",
) -> BackendChoice:
    """The measured rule for ``auto``; an explicit backend or precision is honoured or refused clearly."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in BACKEND_PRECISIONS + ("fp16",):
        raise ConfigError(f"unknown precision {precision!r}: choose one of {', '.join(BACKEND_PRECISIONS)}")
    if performance_hint not in PERFORMANCE_HINTS:
        raise ConfigError(f"unknown performance hint {performance_hint!r}: choose LATENCY or THROUGHPUT")
    if device != "cpu":
        if backend not in ("auto", "torch"):
            raise ConfigError(f"--backend {backend} runs on CPU only; on {device} use --backend torch")
        return BackendChoice("torch", precision, f"{device} runs eager PyTorch", performance_hint)
    if precision == "fp16":
        raise ConfigError("fp16 is for CUDA; on CPU use --precision bf16 or fp32")
    if backend == "auto":
        name, why = _auto_backend(cpu)
    else:
        if not is_available(backend):
            raise ConfigError(
                f"--backend {backend} needs the {_PIP_NAMES[backend]} package: pip install {_PIP_NAMES[backend]}"
            )
        name, why = backend, "asked for"
    if precision == "auto":
        precision = "bf16" if cpu.native_bf16 and "bf16" in SUPPORTED_PRECISIONS[name] else "fp32"
        why += "; " + _precision_reason(cpu, name, precision)
    elif precision not in SUPPORTED_PRECISIONS[name]:
        raise ConfigError(
            f"{name} runs {', '.join(SUPPORTED_PRECISIONS[name])} on CPU, not {precision}: "
            "use --precision fp32 or another --backend"
        )
    elif precision == "int8":
        why += "; int8 asked for (calibrated on the run's training images, checked against fp32)"
    elif precision == "bf16" and not cpu.native_bf16:
        why += "; bf16 asked for without native bf16 here: expect it to be slow"
    return BackendChoice(name, precision, why, performance_hint)


def _auto_backend(cpu: CpuInfo) -> tuple[str, str]:
    if is_available("openvino"):
        return "openvino", "OpenVINO is the fastest CPU backend measured, in bf16 and in fp32"
    if is_available("onnxruntime"):
        return "onnxruntime", "OpenVINO is not installed; ONNX Runtime beats eager PyTorch on CPU (measured)"
    return "torch", "neither OpenVINO nor ONNX Runtime is installed"


def _precision_reason(cpu: CpuInfo, name: str, precision: str) -> str:
    if precision == "bf16":
        return "bf16 because the CPU has it natively (--precision fp32 for exact fp32 logits)"
    if not cpu.native_bf16:
        return "fp32 because bf16 would be emulated (slow) on this CPU"
    return f"fp32 because {name} has no bf16 path on CPU"


class TorchBackend:
    """Eager PyTorch: channels_last, bf16 autocast where asked; the reference every export is checked against."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", device: str = "cpu"):
        self.precision = precision
        self.device = device
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        images = images.contiguous(memory_format=torch.channels_last)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(device_type, dtype=self._dtype, enabled=self._dtype is not None):
            logits = self.model(images)
        return logits.float().cpu().numpy()


class OnnxRuntimeBackend:
    """ONNX Runtime's CPU provider with every graph optimisation on and one thread per physical core."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_path: str | Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are noise to users
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


class OpenVinoBackend:
    """OpenVINO on CPU; bf16 through INFERENCE_PRECISION_HINT, so the IR on disk stays fp32."""

    name = "openvino"

    def __init__(
        self, ir_path: str | Path, threads: int, precision: str = "fp32", performance_hint: str = "LATENCY"
    ):
        import openvino as ov

        self.precision = precision
        self.performance_hint = performance_hint
        core = ov.Core()
        config = {
            # An int8 IR runs its quantized layers in int8 and keeps the rest in fp32.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": performance_hint,
            "INFERENCE_NUM_THREADS": threads,
        }
        self.compiled = core.compile_model(str(ir_path), "CPU", config)
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self._lock = threading.Lock()  # an infer request serves one caller at a time

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            if self.streams == 1 or len(batch) < 2:
                return self._requests[0].infer({0: batch})[0].astype(np.float32, copy=True)
            # THROUGHPUT: one slice of the batch per stream, run side by side.
            chunks = [c for c in np.array_split(batch, min(self.streams, len(batch))) if len(c)]
            requests = self._requests[: len(chunks)]
            for request, chunk in zip(requests, chunks, strict=True):
                request.start_async({0: chunk})
            outputs = []
            for request in requests:
                request.wait()
                outputs.append(request.get_output_tensor(0).data.astype(np.float32, copy=True))
            return np.concatenate(outputs)
