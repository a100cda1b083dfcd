"""The CPU's own measured arithmetic rate: the yardstick a path's useful work is held against.

A speed-up over eager PyTorch says little on its own: when the fastest engine already runs at the CPU's
measured fp32 matmul rate, no fp32 engine can go much faster, and only less or cheaper arithmetic (int8,
fewer trained blocks) can.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """The CPU's measured fp32 matmul rate at the current thread count (median of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates)


@torch.inference_mode()
def forward_gflop_per_image(model: torch.nn.Module, size: int) -> float:
    """Floating-point operations of one forward pass per image (PyTorch's own counter: convolutions and
    matmuls), the same arithmetic whichever engine runs it."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9
