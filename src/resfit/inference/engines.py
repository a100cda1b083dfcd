"""Fast CPU inference: the same logits from eager PyTorch, ONNX Runtime or OpenVINO, picked by what the CPU can do.

Every backend takes a preprocessed float32 batch (N, 3, H, W) as numpy and returns float32 logits (N, C):
preprocessing stays in one place (``Preprocessing``) and the backends only differ in how fast they run.

Which one is fastest depends on the CPU (on an AVX2 Zen 3 ONNX Runtime fp32 beat OpenVINO fp32 by 19%;
with native bf16 OpenVINO bf16 wins by far), so ``auto`` does not trust a table: ``choose_backend`` sets
the precision from the CPU (bf16 only where native) and names a fallback, and at the first load of a model
the Classifier times every installed engine side by side (``time_engines``) and keeps the fastest, with the
figures cached per machine and model (``measurement_path``).
OpenVINO runs with ``PERFORMANCE_HINT=LATENCY``: one request uses every core. THROUGHPUT splits the cores
into streams, which only pays off with several requests in flight; it is measured, not assumed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import atomic_write_json
from ..hardware import CpuInfo, cpu_precision

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
BACKEND_PRECISIONS = ("auto", "fp32", "bf16", "int8")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# Which precisions each backend can run on CPU.
# int8 needs the run's images to calibrate on and is kept only where it agrees with fp32: asked for, or
# timed by auto beside the other engines for serve and batch predict (INT8_ENGINE, classifier.int8_plan).
SUPPORTED_PRECISIONS = {
    "torch": ("fp32", "bf16"),
    "onnxruntime": ("fp32",),
    "openvino": ("fp32", "bf16", "int8"),
}
_PIP_NAMES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
# The gated int8 OpenVINO IR as one more engine for auto to time (only for serve and batch predict:
# InferenceConfig.int8; when it is quantized: classifier.int8_plan).
INT8_ENGINE = "openvino-int8"


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
        precision, reason = cpu_precision(cpu, "bf16" in SUPPORTED_PRECISIONS[name], name)
        why += "; " + reason
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


# --- auto, measured: the fastest engine on this machine, timed once and remembered -----------------------
# The engines are timed at the batch the caller will run (InferenceConfig.batch_size): the ranking changes
# with it (issue #17: with native bf16, torch led OpenVINO 37 to 25 img/s at 4 images and trailed it 1.43x
# at 16).
MEASURE_SECONDS = 1.0  # per engine, beyond the first rounds
MEASURE_MIN_ROUNDS = 2
MEASURE_MAX_CALLS = 25
# Environment variables that change which kernels the engines run: part of the cache key.
_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")


def measurable_engines(precision: str) -> list[str]:
    """The installed engines that run ``precision`` on CPU: the candidates ``auto`` times."""
    return [
        n
        for n in ("openvino", "onnxruntime", "torch")
        if is_available(n) and precision in SUPPORTED_PRECISIONS[n]
    ]


def time_engines(
    engines: dict[str, Callable[[np.ndarray], np.ndarray]], batch: np.ndarray
) -> dict[str, float]:
    """Median images/s of each engine on ``batch``, timed side by side in rounds that run every engine in
    turn, so a change in the machine's load falls on all of them alike. Each engine first runs the whole
    batch once untimed (first calls compile and allocate); in each round a one-image call precedes the timed
    call, to absorb the switch from the previous engine's thread pool at a sixteenth of a batch's cost.
    At least MEASURE_MIN_ROUNDS rounds, then up to MEASURE_SECONDS per engine in all: the cost is about
    (MEASURE_MIN_ROUNDS + 1) batches per engine on a slow machine."""
    for engine in engines.values():
        engine(batch)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    deadline = time.perf_counter() + MEASURE_SECONDS * len(engines)
    rounds = 0
    while rounds < MEASURE_MIN_ROUNDS or (time.perf_counter() < deadline and rounds < MEASURE_MAX_CALLS):
        for name, engine in engines.items():
            engine(batch[:1])
            started = time.perf_counter()
            engine(batch)
            seconds[name].append(time.perf_counter() - started)
        rounds += 1
    return {name: round(len(batch) / float(np.median(times)), 2) for name, times in seconds.items()}


def measurement_path(
    cache_dir: Path, cpu: CpuInfo, threads: int, precision: str, model_key: str, batch: int
) -> Path:
    """Where the timing of one model on this CPU is kept: keyed by everything that changes the ranking."""
    versions = {}
    for package in ("torch", "onnxruntime", "openvino"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    described = json.dumps(
        {
            "cpu": [cpu.model_name, cpu.avx2, cpu.avx512, cpu.native_bf16, cpu.physical_cores],
            "threads": threads,
            "precision": precision,
            "model": model_key,
            "batch": batch,
            "versions": versions,
            "isa": {name: os.environ.get(name) for name in _ISA_VARIABLES},
        },
        sort_keys=True,
    )
    return Path(cache_dir) / "engine-timings" / f"{hashlib.sha256(described.encode()).hexdigest()[:20]}.json"


def read_measurement(path: Path) -> dict[str, float] | None:
    """Engine -> images/s from an earlier measurement, or None when there is none (or it is unreadable)."""
    try:
        figures = json.loads(path.read_text())["images_per_second"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(figures, dict) or not all(isinstance(v, int | float) for v in figures.values()):
        return None
    return figures


def write_measurement(path: Path, figures: dict[str, float], cpu: CpuInfo, threads: int, batch: int) -> None:
    try:
        atomic_write_json(
            path,
            {"images_per_second": figures, "batch": batch, "cpu": cpu.describe(), "threads": threads},
        )
    except OSError:
        pass  # the measurement only saves time at the next load


def describe_measurement(
    figures: dict[str, float], precision: str, threads: int, cached: bool, batch: int
) -> str:
    ranked = sorted(figures.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{name} {value:.1f}" for name, value in ranked)
    when = "at an earlier first load (cached)" if cached else "just now"
    return (
        f"the fastest {precision} engine measured on this CPU {when}: {listed} img/s "
        f"(batch {batch}, {threads} threads)"
    )


def _auto_backend(cpu: CpuInfo) -> tuple[str, str]:
    if is_available("openvino"):
        return "openvino", "OpenVINO is the fastest CPU backend measured, in bf16 and in fp32"
    if is_available("onnxruntime"):
        return "onnxruntime", "OpenVINO is not installed; ONNX Runtime beats eager PyTorch on CPU (measured)"
    return "torch", "neither OpenVINO nor ONNX Runtime is installed"


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


@functools.cache
def openvino_core():
    """The process's one OpenVINO core, as OpenVINO advises: its CPU plugin gives the thread an alternate
    signal stack per core and frees it with the core, so cores freed out of order (an engine timed and
    dropped, another kept) leave the thread's stack pointing at freed memory and its next signal (Ctrl-C)
    a segmentation fault. One core lives as long as the process."""
    import openvino as ov

    return ov.Core()


class OpenVinoBackend:
    """OpenVINO on CPU; bf16 through INFERENCE_PRECISION_HINT, so the IR on disk stays fp32."""

    name = "openvino"

    def __init__(
        self, ir_path: str | Path, threads: int, precision: str = "fp32", performance_hint: str = "LATENCY"
    ):
        self.precision = precision
        self.performance_hint = performance_hint
        core = openvino_core()
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
