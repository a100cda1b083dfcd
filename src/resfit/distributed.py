"""Data parallelism through torchrun: which process this is, and the few collectives training needs.

``torchrun --nproc_per_node N -m resfit train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; without them resfit
runs as one process and every helper here is a no-op, so the single-process path is the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.enabled:
            return "single process"
        return f"DDP rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}, {self.backend})"


def process_device(device: str, environ: dict | None = None) -> str:
    """The device this process trains on: under torchrun on CUDA, the GPU of its LOCAL_RANK.

    ``device`` is the flag ("auto", "cpu", "cuda" or "cuda:N"), the same for every process. "cuda" and
    "auto" (when torch sees a GPU) become ``cuda:<LOCAL_RANK>``; an explicit ``cuda:N`` would put every
    process on one GPU, so it is refused when several processes share the machine.
    """
    environ = os.environ if environ is None else environ
    if int(environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return device
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if device != "cuda":
        if int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])) > 1:
            raise ConfigError(
                f"--device {device} under torchrun would put every process on one GPU: each process takes "
                "the GPU of its LOCAL_RANK, so pass --device cuda (or auto); pick GPUs with CUDA_VISIBLE_DEVICES"
            )
        return device
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
            "start at most one process per GPU (--nproc_per_node)"
        )
    return f"cuda:{local_rank}"


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); one process otherwise.

    ``device`` is this process's resolved device (see process_device); on CUDA it becomes the current
    GPU before NCCL starts, so NCCL's communicator and every bare .cuda() use it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, local_world_size, backend)


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def sum_across(context: DistContext, *values: float) -> list[float]:
    """Sum scalars over all processes (float64, so counts stay exact)."""
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if context.backend == "nccl":
        tensor = tensor.cuda()  # the current GPU: init_distributed made it this process's
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_rows(context: DistContext, rows: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Every process's ``rows`` (for dataset ``indices``), put back in dataset order, on every process."""
    if not context.enabled:
        return rows[np.argsort(indices, kind="stable")]
    parts: list = [None] * context.world_size
    dist.all_gather_object(parts, (rows, indices))
    all_rows = np.concatenate([p[0] for p in parts])
    all_indices = np.concatenate([p[1] for p in parts])
    return all_rows[np.argsort(all_indices, kind="stable")]


def broadcast_module(context: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers of ``module`` to every process."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches cut from one seeded permutation of the whole split, each global batch split across processes.

    With N processes each takes its slice of every global batch, so N processes with a per-process batch
    of B/N see exactly the batches one process with batch B sees: the same seed gives the same training.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        context: DistContext,
        seed: int,
        epoch: int,
        weights: np.ndarray | None = None,
    ):
        if global_batch % context.world_size:
            raise ConfigError(
                f"batch size {global_batch} must be divisible by the {context.world_size} processes"
            )
        self.context = context
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if weights is None:
            order = torch.randperm(size, generator=generator).numpy()
        else:  # class-balanced: an epoch of draws with replacement, in proportion to ``weights``
            draws = torch.as_tensor(weights, dtype=torch.float64)
            order = torch.multinomial(draws, size, replacement=True, generator=generator).numpy()
        self.batches = [order[i : i + global_batch] for i in range(0, size, global_batch)]
        # A last batch too small to give each process two images is dropped (BatchNorm needs two).
        if len(self.batches) > 1 and len(self.batches[-1]) < 2 * context.world_size:
            self.batches.pop()

    def global_batch_sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def __iter__(self):
        for batch in self.batches:
            yield np.array_split(batch, self.context.world_size)[self.context.rank].tolist()

    def __len__(self) -> int:
        return len(self.batches)
