"""A folder of WebDataset tar shards (written by `resfit shard`) as a dataset: the index and reading by item.

The folder holds, per split, a series of tars (``train-000000.tar``...) whose members are each image's
original encoded bytes (``<key>.<ext>``), its class index (``<key>.cls``) and its original path
(``<key>.json``); ``shards.json`` names the classes, the shards with their sample counts and sizes, and the
scan's verdicts from when the shards were written; ``<split>-index.jsonl`` lists every sample (key, label,
shard, byte offset, size, original path), so labels and counts are known without opening a tar.

Training streams the train shards (shard_stream.py). Everything else (the head stage's features, validation,
calibration, evaluation) reads a sample by its byte offset in its local tar, so each such pass sees the
split in the index's order and every position-keyed part of resfit works unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError, ImageReadError
from .images import EncodedImages
from .splits import SHARD_INDEX, DatasetSource, Split

INDEX_FILE = SHARD_INDEX
FORMAT = "resfit-shards"
VERSION = 1
ITEM_SEPARATOR = "::"
METADATA_EXTENSIONS = ("cls", "json")  # every other member of a sample is its image


def is_shard_folder(root: Path) -> bool:
    return root.is_dir() and (root / INDEX_FILE).is_file()


def shard_pattern(split: str) -> str:
    """The tar names of one split's series, for webdataset.ShardWriter: train-000000.tar, train-000001.tar..."""
    return f"{split}-%06d.tar"


def listing_name(split: str) -> str:
    return f"{split}-index.jsonl"


def sample_key(position: int) -> str:
    """A sample's key is its position in the split's listing: no dots (webdataset splits names on them)."""
    return f"{position:09d}"


def read_index(root: Path) -> dict:
    """shards.json, checked to be this format and version; raises DataError."""
    path = root / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the shard index {path}: {error}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f'{path} is not a resfit shard index (no "format": "{FORMAT}")')
    if index.get("version") != VERSION:
        raise DataError(
            f"{path} is shard format version {index.get('version')}, this resfit reads {VERSION}: "
            "write the shards again with `resfit shard`"
        )
    return index


class ShardImages(EncodedImages):
    """Reads one sample's encoded bytes by its byte offset inside its tar: random access for the passes
    that go through a split by position. Items are ``<tar path>::<key>::<original path>``."""

    def __init__(self, root: Path, locations: dict[str, tuple[str, int, int]], index: dict):
        self.root = root
        self.locations = locations  # item -> (tar path, offset of the image's bytes, their size)
        self.index = index

    @property
    def skipped(self) -> list[dict]:
        """The files the scan refused when the shards were written (they are in no shard)."""
        return list(self.index.get("skipped", []))

    @property
    def converted(self) -> list[dict]:
        return list(self.index.get("converted", []))

    def encoded(self, item: str) -> bytes:
        location = self.locations.get(item)
        if location is None:
            raise ImageReadError(item, f"not a sample of the shards in {self.root}")
        tar, offset, size = location
        try:
            with open(tar, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as error:
            raise ImageReadError(item, f"cannot read shard {tar}: {error.strerror or error}") from None
        if len(data) != size:
            raise ImageReadError(item, f"shard {tar} is shorter than its index says (truncated?)")
        return data


def discover_shards(root: Path) -> DatasetSource:
    """The shard folder as a DatasetSource (layout "shards"): splits and labels from the index's listings."""
    index = read_index(root)
    class_names = list(index["class_names"])
    splits: dict[str, Split] = {}
    locations: dict[str, tuple[str, int, int]] = {}
    for split, entry in index["splits"].items():
        tars = [str(root / shard["file"]) for shard in entry["shards"]]
        items, labels = [], []
        for key, label, shard, offset, size, path in _listing(root, split):
            if not 0 <= label < len(class_names) or not 0 <= shard < len(tars):
                raise DataError(
                    f"{root / listing_name(split)}: sample {key} has label {label}, shard {shard}"
                )
            item = ITEM_SEPARATOR.join((tars[shard], key, path))
            items.append(item)
            labels.append(label)
            locations[item] = (tars[shard], offset, size)
        if len(items) != entry["samples"]:
            raise DataError(
                f"{root / listing_name(split)} lists {len(items)} samples, shards.json {entry['samples']}"
            )
        splits[split] = Split(items, labels)
    if "train" not in splits or "val" not in splits:
        raise DataError(f"{root / INDEX_FILE} has no train or no val split")
    note = (
        f"sharded data written by `resfit shard` from {index.get('source', '?')} (seed {index.get('seed')})"
    )
    return DatasetSource(
        root=root,
        layout="shards",
        class_names=class_names,
        splits=splits,
        notes=[note, *index.get("notes", [])],
        arrow=ShardImages(root, locations, index),
    )


def train_shards(source: DatasetSource) -> list[tuple[str, int]]:
    """(tar path or URL, sample count) of each train shard, in the index's order."""
    if not isinstance(source.arrow, ShardImages):
        raise DataError(f"{source.root} is not sharded data")
    return [
        (str(source.root / shard["file"]), int(shard["samples"]))
        for shard in source.arrow.index["splits"]["train"]["shards"]
    ]


def _listing(root: Path, split: str) -> list[tuple[str, int, int, int, int, str]]:
    path = root / listing_name(split)
    try:
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the shard listing {path}: {error}") from None
    if any(not isinstance(row, list) or len(row) != 6 for row in rows):
        raise DataError(f"{path}: every line must be [key, label, shard, offset, size, path]")
    return [tuple(row) for row in rows]


def relative_path(item: str, base: Path) -> str:
    """What a sample remembers of where it came from: its path relative to the dataset, or its item key."""
    if os.path.isabs(item) and Path(item).is_relative_to(base):
        return os.path.relpath(item, base)
    return item
