"""What a dataset is once found: its classes, and which items belong to which split.

sources.py finds them in the user's layout; every later stage (scan, caches, training, evaluation) takes a
``DatasetSource``. Its own module, so readers of one layout (shards.py) need not import the finder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .arrow_images import ArrowImages
from .cifar import CifarArrays
from .images import DEFAULT_MAX_PIXELS, open_rgb

CIFAR_PREFIX = "cifar10:"
# Where the data has no validation split, this share of each class is held out, drawn with this seed.
VAL_FRACTION = 0.2
SPLIT_SEED = 0
SHARD_INDEX = "shards.json"  # shards.INDEX_FILE


@dataclass
class Split:
    """One split: parallel lists of items (absolute paths, CIFAR keys or dataset rows) and class indices."""

    items: list[str]
    labels: list[int]

    def subset(self, indices: list[int]) -> Split:
        return Split([self.items[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class DatasetSource:
    """Where the images are, what the classes are called, and which items belong to which split."""

    root: Path
    layout: str  # "imagefolder" | "flat" | "csv" | "cifar10" | "hf-disk" | "parquet" | "shards"
    class_names: list[str]
    splits: dict[str, Split]
    notes: list[str]
    max_pixels: int = DEFAULT_MAX_PIXELS  # the limit the scan accepted these files under
    cifar: CifarArrays | None = field(default=None, repr=False, compare=False)
    # Encoded images read by item key: hf-disk and parquet rows (ArrowImages), tar shards (shards.ShardImages).
    arrow: ArrowImages | None = field(default=None, repr=False, compare=False)

    def read(self, item: str) -> tuple[Image.Image, list[str]]:
        """RGB image and conversion notes for one item of any split."""
        if self.layout == "cifar10":
            return Image.fromarray(self._cifar_pixels(item)), []
        if self.arrow is not None:
            return self.arrow.read(item, self.max_pixels)
        return open_rgb(item, self.max_pixels)

    def _cifar_pixels(self, item: str) -> np.ndarray:
        if self.cifar is None:
            raise DataError(f"{self.root}: CIFAR-10 arrays are not loaded, cannot read {item}")
        prefix, split, index = (item.split(":") + ["", ""])[:3]
        images = {"train": self.cifar.train_images, "test": self.cifar.test_images}.get(split)
        if prefix + ":" != CIFAR_PREFIX or images is None or not index.isdigit() or int(index) >= len(images):
            raise DataError(f"not a CIFAR-10 item key: {item!r} (expected e.g. 'cifar10:train:123')")
        return images[int(index)]
