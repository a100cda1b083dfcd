"""The CPU's own measured arithmetic rate: the yardstick a path's useful work is held against.

A speed-up over eager PyTorch says little on its own: when the fastest engine already runs at the CPU's
measured fp32 matmul rate, no fp32 engine can go much faster, and only less or cheaper arithmetic (int8,
fewer trained blocks) can.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Variables that cap the instruction sets PyTorch uses (the AVX2 stand-in); ONNX Runtime ignores them.
_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """The CPU's measured fp32 matmul rate at the current thread count: the faster of PyTorch's and ONNX
    Runtime's 4096x4096 matmul (median of ``repeats`` each; see matmul_rates)."""
    return max(matmul_rates(size, repeats).values())


def matmul_rates(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """fp32 matmul GFLOP/s by library. PyTorch's goes through MKL, which on an AMD CPU with AVX-512 ran at half
    the rate ONNX Runtime's MLAS reached (205 against 406 GFLOP/s on a 2-core Zen 5, 2026-12-07): alone it
    understates such a CPU. ONNX Runtime is left out under an instruction-set cap, which it ignores."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    rates = {"torch": _median_rate(lambda: torch.mm(a, b), size, repeats)}
    if not any(os.environ.get(name) for name in _ISA_CAPS) and importlib.util.find_spec("onnxruntime"):
        rates["onnxruntime"] = _onnxruntime_rate(a.numpy(), b.numpy(), repeats)
    return rates


def _median_rate(call, size: int, repeats: int) -> float:
    call()  # the first call allocates and picks kernels
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates)


def _onnxruntime_rate(a, b, repeats: int) -> float:
    import onnxruntime
    from onnx import TensorProto, helper

    size = a.shape[0]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return _median_rate(lambda: session.run(None, {"a": a, "b": b}), size, repeats)


@torch.inference_mode()
def forward_gflop_per_image(model: torch.nn.Module, size: int) -> float:
    """Floating-point operations of one forward pass per image (PyTorch's own counter: convolutions and
    matmuls), the same arithmetic whichever engine runs it."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9
