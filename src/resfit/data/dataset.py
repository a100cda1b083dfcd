"""A torch Dataset over one split of a DatasetSource; a file that breaks mid-training is skipped, not fatal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import DataError, ImageReadError
from .splits import DatasetSource

if TYPE_CHECKING:
    from .decoded_cache import DecodedImages

log = logging.getLogger(__name__)
# How many neighbours to try before giving up on a run of unreadable files.
_MAX_SUBSTITUTES = 16


class ImageDataset(torch.utils.data.Dataset):
    """Yields (image tensor, label). Files were checked up front; one that changed since is replaced by a neighbour.

    With ``decoded`` (the split's DecodedImages), images come pre-resized from that cache instead of
    being decoded from their files; everything else is the same.
    """

    def __init__(
        self, source: DatasetSource, split: str, transform: Callable, decoded: DecodedImages | None = None
    ):
        self.source = source
        self.split = split
        self.items = source.splits[split].items
        self.labels = source.splits[split].labels
        self.transform = transform
        self.augment_seed: int | None = None
        if decoded is not None and len(decoded) != len(self.items):
            raise DataError(f"decoded cache has {len(decoded)} images, the {split} split {len(self.items)}")
        self.decoded = decoded

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Tie each image's random augmentation to (seed, epoch, index), not to a process's RNG stream.

        Then the same image gets the same crop whichever worker or DDP process loads it, and a resumed
        epoch replays exactly.
        """
        self.augment_seed = (seed * 1_000_003 + epoch * 100_003) % (1 << 62)

    def _transform(self, image, index: int) -> torch.Tensor:
        if self.augment_seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.augment_seed + index)
            return self.transform(image)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(_MAX_SUBSTITUTES):
            i = (index + attempt) % len(self.items)
            try:
                if self.decoded is not None:
                    image = self.decoded.image(i)
                else:
                    image, _ = self.source.read(self.items[i])
            except (ImageReadError, OSError) as error:
                log.warning("skipping %s during %s: %s", self.items[i], self.split, error)
                continue
            return self._transform(image, i), self.labels[i]
        raise ImageReadError(
            self.items[index], f"this and the next {_MAX_SUBSTITUTES - 1} files are unreadable"
        )
