"""Training from shards: each process streams its own train shards through a seeded shuffle buffer.

An epoch's order is a pure function of (seed, epoch, rank, worker): the shard list is permuted by
(seed, epoch), process r takes every world_size-th shard, DataLoader worker w every num_workers-th of
those, and each worker's samples pass a shuffle buffer seeded by all four. So every epoch differs, a run
resumed at an epoch boundary replays exactly what the interrupted one would have, and no process needs
another's shards. Each worker drops its last partial batch, and every process runs the same number of
steps (the fewest any process can fill), as DistributedDataParallel requires.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from itertools import islice

import torch

from ..distributed import DistContext
from ..errors import ConfigError, ImageReadError
from .images import open_rgb
from .shards import METADATA_EXTENSIONS

log = logging.getLogger(__name__)
SHUFFLE_BUFFER = 1000  # samples (encoded bytes) each worker holds to shuffle: ~100 MB of 100 kB photos


def epoch_assignment(
    shard_count: int, seed: int, epoch: int, world_size: int, workers: int
) -> list[list[list[int]]]:
    """[rank][worker] -> the shard indices it streams this epoch: disjoint, together every shard once."""
    if shard_count < world_size:
        raise ConfigError(
            f"{shard_count} train shard(s) for {world_size} processes: each process needs one; "
            "write smaller shards (resfit shard --shard-size / --shard-samples)"
        )
    order = list(range(shard_count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_rank = [order[rank::world_size] for rank in range(world_size)]
    return [[shards[worker::workers] for worker in range(workers)] for shards in per_rank]


class ShardEpoch:
    """One epoch of streamed training, in the shape the training loop wants of a batch sampler: its number
    of steps, each step's global batch size, and the DataLoader that yields exactly those steps."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        batch: int,
        context: DistContext,
        seed: int,
        epoch: int,
        num_workers: int,
    ):
        self.shards, self.batch, self.context = shards, batch, context
        self.seed, self.epoch = seed, epoch
        self.workers = max(1, num_workers)
        self.num_workers = num_workers
        self.assignment = epoch_assignment(len(shards), seed, epoch, context.world_size, self.workers)
        # Every process can count every process's full batches, so all agree on the step count.
        self.steps = min(
            sum(sum(shards[i][1] for i in worker) // batch for worker in rank) for rank in self.assignment
        )
        if self.steps == 0:
            raise ConfigError(
                f"batch {batch} is larger than what a DataLoader worker streams of the train shards: "
                "lower --batch-size or --num-workers"
            )

    def __len__(self) -> int:
        return self.steps

    def global_batch_sizes(self) -> list[int]:
        return [self.batch * self.context.world_size] * self.steps

    def my_shards(self) -> list[list[str]]:
        """This process's shard URLs, per DataLoader worker."""
        return [[self.shards[i][0] for i in worker] for worker in self.assignment[self.context.rank]]

    def loader(self, dataset: StreamedShards, pin_memory: bool) -> EpochBatches:
        dataset.start_epoch(self)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
        )
        return EpochBatches(loader, self.steps)


class EpochBatches:
    """The DataLoader cut at the epoch's step count (a process with more samples stops with the others)."""

    def __init__(self, loader: torch.utils.data.DataLoader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        return islice(iter(self.loader), self.steps)


class StreamedShards(torch.utils.data.IterableDataset):
    """(image tensor, label) from this process's train shards, in the epoch's seeded order.

    Like ImageDataset, a sample's augmentation is seeded by (seed, epoch, its position in the split), and
    its bytes are decoded by images.open_rgb; a sample that fails to decode is logged and replaced by the
    next good one, so the step count stays what every process agreed on.
    """

    def __init__(self, transform: Callable, max_pixels: int, shuffle_buffer: int = SHUFFLE_BUFFER):
        self.transform = transform
        self.max_pixels = max_pixels
        self.shuffle_buffer = shuffle_buffer
        self.augment_seed: int | None = None
        self.urls: list[list[str]] = []
        self.order_seed = 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.augment_seed = (seed * 1_000_003 + epoch * 100_003) % (1 << 62)

    def start_epoch(self, plan: ShardEpoch) -> None:
        self.urls = plan.my_shards()
        self.order_seed = (plan.seed * 1_000_003 + plan.epoch * 100_003 + plan.context.rank * 1009) % (
            1 << 62
        )

    def samples(self, worker: int) -> Iterator[dict]:
        """Raw webdataset samples of one worker's shards, through its seeded shuffle buffer."""
        import webdataset  # the `shards` extra

        rng = random.Random(self.order_seed + worker)
        pipeline = webdataset.DataPipeline(
            webdataset.SimpleShardList(self.urls[worker]),
            webdataset.tarfile_to_samples(),
            webdataset.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if worker >= len(self.urls):
            return
        owed = 0  # samples that failed to decode, each replaced by the next good one
        for sample in self.samples(worker):
            position, label = int(sample["__key__"].rsplit("/", 1)[-1]), int(sample["cls"])
            image_key = next(k for k in sample if not k.startswith("__") and k not in METADATA_EXTENSIONS)
            try:
                image, _ = open_rgb(
                    sample[image_key], self.max_pixels, label=f"{sample['__url__']}::{position}"
                )
            except ImageReadError as error:
                log.warning("skipping a sample during training: %s", error)
                owed += 1
                continue
            for _ in range(1 + owed):
                yield self._transform(image, position), label
            owed = 0

    def _transform(self, image, position: int) -> torch.Tensor:
        if self.augment_seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.augment_seed + position)
            return self.transform(image)
