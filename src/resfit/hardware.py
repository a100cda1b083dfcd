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
PRECISION_HELP = (
    "auto: mixed precision where the device runs it natively (bf16 on such CPUs and GPUs, else fp16 on a GPU), "
    "else fp32"
)


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    physical_cores: int
    logical_cpus: int
    avx2: bool
    avx512: bool
    native_bf16: bool  # AVX512_BF16 or AMX-BF16: bf16 matmuls run in hardware
    isa_cap: str = ""  # ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY below what the CPU has, as set

    def describe(self) -> str:
        isa = "AVX-512" if self.avx512 else "AVX2" if self.avx2 else "no AVX2"
        bf16 = "native bf16 (AVX512_BF16/AMX)" if self.native_bf16 else "no native bf16 (emulated, slow)"
        capped = f" (capped by {self.isa_cap})" if self.isa_cap else ""
        return f"{self.model_name}, {self.physical_cores} physical cores, {isa}, {bf16}{capped}"


# ONEDNN_MAX_CPU_ISA values that leave out AVX-512 (and so its bf16 instructions), and ATen's below avx512.
_ONEDNN_BELOW_AVX512 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}
_ATEN_BELOW_AVX512 = {"default", "avx2"}


def apply_isa_cap(avx2: bool, avx512: bool, native_bf16: bool, environ=os.environ) -> tuple[bool, bool, str]:
    """(avx512, native_bf16, cap) as the libraries will use them under an instruction-set cap.

    ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine is how an AVX2-only laptop is
    stood in for: oneDNN and ATen then run no AVX-512 (nor bf16) kernels, so bf16 is emulated and must not be
    picked as if native. (ONNX Runtime's own kernels ignore the cap: benchmarks/isa_cap.py.)
    """
    onednn = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    aten = environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    caps = []
    if onednn in _ONEDNN_BELOW_AVX512 and (avx512 or native_bf16):
        caps.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
    if aten in _ATEN_BELOW_AVX512 and avx512:
        caps.append(f"ATEN_CPU_CAPABILITY={aten}")
    if not caps:
        return avx512, native_bf16, ""
    return False, False, ", ".join(caps)


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
    avx512, native_bf16, cap = apply_isa_cap(avx2, avx512, native_bf16)
    return CpuInfo(model_name, max(1, physical), logical, avx2, avx512, native_bf16, cap)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: the device, the precision, why, and the thread count.

    ``device`` is a torch device string: "cpu", or "cuda:N" with the index always written out, so the
    GPU whose name is printed is the one that trains.
    """

    device: str
    precision: str
    reason: str
    threads: int
    cpu: CpuInfo
    gpu_name: str | None = None

    @property
    def device_type(self) -> str:
        """ "cpu" or "cuda": what torch.autocast and GradScaler take."""
        return torch.device(self.device).type

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (whose small gradients would underflow); a no-op for fp32 and bf16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.precision == "fp16")

    def describe(self) -> str:
        where = (
            f"CUDA {self.device} ({self.gpu_name})"
            if self.device_type == "cuda"
            else f"CPU ({self.cpu.describe()})"
        )
        return f"{where}; {self.threads} threads; precision {self.precision}: {self.reason}"

    def to_dict(self) -> dict:
        info = asdict(self)
        info["description"] = self.describe()
        return info


def parse_device(device: str) -> str:
    """ "auto", "cpu", "cuda" or "cuda:N" (N >= 0), as given; anything else is refused."""
    if device in ("auto", "cpu", "cuda"):
        return device
    index = device.removeprefix("cuda:")
    if device.startswith("cuda:") and index.isdigit():
        return f"cuda:{int(index)}"
    raise ConfigError(f"unknown device {device!r}: choose auto, cpu, cuda or cuda:N (a GPU index)")


def cuda_device(device: str) -> str:
    """ "cuda" (the current GPU) or "cuda:N" as "cuda:N", checked against the GPUs torch sees."""
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but torch sees no CUDA device")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device == "cuda" else int(device.removeprefix("cuda:"))
    if index >= count:
        raise ConfigError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return f"cuda:{index}"


def gpu_has_native_bf16(device: str) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) or newer. Older GPUs emulate bf16, slowly, and
    torch.cuda.is_bf16_supported() still says yes there (it counts emulation), so it is not asked."""
    major, _minor = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8


def cpu_precision(cpu: CpuInfo, engine_has_bf16: bool = True, engine: str = "torch") -> tuple[str, str]:
    """The one CPU precision rule (training and every inference engine): bf16 where the CPU runs it
    natively and the engine has a bf16 path, else fp32; with the reason in words."""
    if cpu.native_bf16 and engine_has_bf16:
        return "bf16", "bf16 because the CPU has it natively (--precision fp32 for exact fp32 results)"
    if not cpu.native_bf16:
        return "fp32", "fp32 because bf16 would be emulated (slow) on this CPU"
    return "fp32", f"fp32 because {engine} has no bf16 path on CPU"


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick device and precision from what is present; explicit requests are honoured or refused clearly."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    device = parse_device(device)
    cpu = detect_cpu()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = cpu.physical_cores
    if device.startswith("cuda"):
        device = cuda_device(device)
        gpu_name = torch.cuda.get_device_name(torch.device(device))
        bf16_ok = gpu_has_native_bf16(device)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(torch.device(device)))
        if precision == "auto":
            precision = "bf16" if bf16_ok else "fp16"
            reason = "CUDA AMP, " + (
                "the GPU has native bf16"
                if bf16_ok
                else f"fp16 with a grad scaler (compute capability {capability}: no native bf16)"
            )
        elif precision == "bf16" and not bf16_ok:
            raise ConfigError(
                f"--precision bf16: {gpu_name} ({device}, compute capability {capability}) has no native "
                "bf16 (it needs 8.0, Ampere, or newer): use --precision fp16 (AMP with a grad scaler) or fp32"
            )
        else:
            reason = "asked for"
        return Runtime(device, precision, reason, threads, cpu, gpu_name)
    if precision == "auto":
        precision, reason = cpu_precision(cpu)
        reason += "; channels_last layout"
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


def apply_device(runtime: Runtime) -> None:
    """Make the runtime's GPU the current one, so whatever allocates on "the" GPU (NCCL, pinned-memory
    copies, a bare .cuda()) uses it too; on CPU, the threads."""
    apply_threads(runtime)
    if runtime.device_type == "cuda":
        torch.cuda.set_device(torch.device(runtime.device))


def default_num_workers(runtime: Runtime, processes: int = 1) -> int:
    """DataLoader workers. On a 2-core CPU none: a worker's decoding preempts one of the model's two
    compute threads and the other waits for it at every synchronisation, so loading in the training
    process is faster (measured: 1.4-2.0x faster fine-tuning at 96-128 px, 1.6x at 224 px; benchmarks/RESULTS.md).

    On a GPU the model does not need the CPU, and decoding JPEGs there is what usually starves a fast GPU:
    every core this process's share of the machine has, but one for the training process itself.
    ``processes``: the training processes sharing this machine's cores (torchrun's LOCAL_WORLD_SIZE).
    """
    if runtime.device_type == "cuda":
        return max(1, runtime.cpu.logical_cpus // max(1, processes) - 1)
    return 0 if runtime.cpu.logical_cpus <= 2 else min(4, runtime.cpu.logical_cpus // 2)


def pin_memory(runtime: Runtime) -> bool:
    """Page-locked loader batches on CUDA: their copies to the GPU can then run asynchronously
    (non_blocking=True), overlapping the step; on CPU there is nothing to copy."""
    return runtime.device_type == "cuda"
