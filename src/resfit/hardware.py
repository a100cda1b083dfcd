"""What this machine can do, detected rather than assumed: bf16 is fast only where the CPU has it natively.

On an AVX2-only CPU bf16 autocast is emulated and several times slower than fp32, so a wrong guess
costs hours. The chosen device, precision, threads and the reason are printed and stored with the run.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    physical_cores: int
    logical_cpus: int
    avx2: bool
    avx512: bool
    native_bf16: bool  # AVX512_BF16 or AMX-BF16: bf16 matmuls run in hardware

    def describe(self) -> str:
        isa = "AVX-512" if self.avx512 else "AVX2" if self.avx2 else "no AVX2"
        bf16 = "native bf16 (AVX512_BF16/AMX)" if self.native_bf16 else "no native bf16 (emulated, slow)"
        return f"{self.model_name}, {self.physical_cores} physical cores, {isa}, {bf16}"


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def detect_cpu() -> CpuInfo:
    """Read the CPU's flags from /proc/cpuinfo (Linux), falling back to what torch reports."""
    text = _cpuinfo_text()
    flags: set[str] = set()
    model_name = platform.processor() or platform.machine()
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name":
            model_name = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
            cores.add((physical_id, core_id))
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = min(len(cores), logical) if cores else logical
    capability = torch.backends.cpu.get_cpu_capability()
    if flags:
        avx2 = "avx2" in flags
        avx512 = "avx512f" in flags
        native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    else:  # not Linux: ask torch
        avx2 = capability in ("AVX2", "AVX512")
        avx512 = capability == "AVX512"
        native_bf16 = bool(getattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: False)())
    return CpuInfo(model_name, max(1, physical), logical, avx2, avx512, native_bf16)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: the device, the precision, why, and the thread count."""

    device: str
    precision: str
    reason: str
    threads: int
    cpu: CpuInfo
    gpu_name: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device, dtype=dtype, enabled=dtype is not None)

    def describe(self) -> str:
        where = f"CUDA ({self.gpu_name})" if self.device == "cuda" else f"CPU ({self.cpu.describe()})"
        return f"{where}; {self.threads} threads; precision {self.precision}: {self.reason}"

    def to_dict(self) -> dict:
        info = asdict(self)
        info["description"] = self.describe()
        return info


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick device and precision from what is present; explicit requests are honoured or refused clearly."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}: choose auto, cpu or cuda")
    cpu = detect_cpu()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    threads = cpu.physical_cores
    if device.startswith("cuda"):
        gpu_name = torch.cuda.get_device_name(torch.device(device))
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            precision = "bf16" if bf16_ok else "fp16"
            reason = "CUDA AMP, " + ("the GPU supports bf16" if bf16_ok else "fp16 with a grad scaler")
        else:
            reason = "asked for"
        return Runtime("cuda", precision, reason, threads, cpu, gpu_name)
    if precision == "auto":
        if cpu.native_bf16:
            precision, reason = "bf16", "the CPU has native bf16, so bf16 autocast + channels_last"
        else:
            precision, reason = (
                "fp32",
                "the CPU has no native bf16 (it would be emulated), so fp32 + channels_last",
            )
    elif precision == "fp16":
        raise ConfigError("fp16 is for CUDA; on CPU use --precision bf16 or fp32")
    else:
        reason = "asked for" + (
            " (no native bf16 here: expect it to be slow)"
            if precision == "bf16" and not cpu.native_bf16
            else ""
        )
    return Runtime("cpu", precision, reason, threads, cpu)


def apply_threads(runtime: Runtime) -> None:
    """One compute thread per physical core: hyper-threads and oversubscription only add contention."""
    if runtime.device == "cpu" and torch.get_num_threads() != runtime.threads:
        torch.set_num_threads(runtime.threads)


def default_num_workers(runtime: Runtime) -> int:
    """DataLoader workers. On a 2-core CPU none: a worker's decoding preempts one of the model's two
    compute threads and the other waits for it at every synchronisation, so loading in the training
    process is faster (measured: 1.4-2.0x faster fine-tuning at 96-128 px, 1.6x at 224 px; benchmarks/RESULTS.md)."""
    if runtime.device == "cuda":
        return min(8, max(1, runtime.cpu.logical_cpus - 1))
    return 0 if runtime.cpu.logical_cpus <= 2 else min(4, runtime.cpu.logical_cpus // 2)
