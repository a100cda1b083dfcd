"""`resfit shard`: write a dataset as WebDataset tar shards, the scan's verdicts applied.

Only the files the scan accepted go in, each as its original encoded bytes (nothing is decoded and
encoded again, so no pixel changes); per split its own series of tars, cut at a size or a sample count.
Train samples are written in a seeded random order, so each shard mixes the classes and a streaming
shuffle buffer far smaller than the set still gives mixed batches.
The index (shards.json) and the per-split listings are written last, atomically: a folder with a
shards.json is complete. Nothing is written inside the dataset.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_json, atomic_write_text
from .scan import load_dataset
from .shards import (
    FORMAT,
    INDEX_FILE,
    METADATA_EXTENSIONS,
    VERSION,
    listing_name,
    relative_path,
    sample_key,
    shard_pattern,
)
from .splits import DatasetSource, Split

DEFAULT_SHARD_MB = 256.0  # webdataset's advice: shards of a few hundred MB stream well
_FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class ShardSummary:
    out: Path
    index: dict
    seconds: float

    def lines(self) -> list[str]:
        """What `resfit shard` prints: one line per split, then where the skipped files are listed."""
        lines = []
        for split, entry in self.index["splits"].items():
            megabytes = sum(shard["bytes"] for shard in entry["shards"]) / 1e6
            lines.append(
                f"{split}: {entry['samples']} images in {len(entry['shards'])} shard(s), {megabytes:.1f} MB"
            )
        skipped = len(self.index["skipped"])
        lines.append(
            f"wrote {self.out} in {self.seconds:.1f}s; {skipped} unreadable file(s) left out"
            + (f" (reasons in {self.out / INDEX_FILE})" if skipped else "")
        )
        return lines


def write_shards(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_mb: float = DEFAULT_SHARD_MB,
    shard_samples: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    exclude_from: str | os.PathLike | None = None,
    progress: bool = False,
) -> ShardSummary:
    """Scan ``data`` and write its usable images to ``out`` as shards; returns the index written.

    ``exclude_from``: files to leave out, as for train (an audit.json or a list of paths)."""
    import webdataset  # the `shards` extra: pip install 'resfit[shards]'

    if shard_mb <= 0 or (shard_samples is not None and shard_samples < 1):
        raise ConfigError(f"shard size must be positive, got {shard_mb} MB / {shard_samples} samples")
    started = time.perf_counter()
    source, report = load_dataset(
        data, val_fraction=val_fraction, seed=seed, progress=progress, exclude_from=exclude_from
    )
    out = Path(os.path.abspath(out))
    _require_empty_outside(out, source.root)
    out.mkdir(parents=True, exist_ok=True)
    base = source.root.parent if source.root.is_file() else source.root
    splits = {}
    for split_name, split in source.splits.items():
        if split_name == "train":  # a class-sorted stream would fill a shuffle buffer with one class
            order = list(range(len(split.items)))
            random.Random(seed).shuffle(order)
            split = split.subset(order)
        written: list[str] = []
        writer = webdataset.ShardWriter(
            str(out / shard_pattern(split_name)),
            maxcount=shard_samples or 10**12,
            maxsize=shard_mb * 1e6,
            post=written.append,
            mtime=0,  # the same data gives byte-identical shards
            verbose=0,
        )
        with writer:
            for position, (item, label) in enumerate(zip(split.items, split.labels, strict=True)):
                data_bytes, extension = _encoded(source, item)
                writer.write(
                    {
                        "__key__": sample_key(position),
                        extension: data_bytes,
                        "cls": label,
                        "json": {"path": relative_path(item, base), "class": source.class_names[label]},
                    }
                )
        rows, shards = _listing_and_sizes(written, split, base)
        atomic_write_text(out / listing_name(split_name), "".join(json.dumps(row) + "\n" for row in rows))
        splits[split_name] = {
            "samples": len(rows),
            "class_counts": report.class_counts[split_name],
            "shards": shards,
        }
    index = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(source.root),
        "layout": source.layout,
        "seed": seed,
        "val_fraction": val_fraction,
        "class_names": source.class_names,
        "splits": splits,
        "skipped": report.skipped,
        "excluded": report.excluded,
        "converted": report.converted,
        "notes": source.notes,
    }
    atomic_write_json(out / INDEX_FILE, index)
    return ShardSummary(out, index, time.perf_counter() - started)


def _require_empty_outside(out: Path, dataset_root: Path) -> None:
    """Refuse to write into the dataset (the next scan would see the shards) or over other files."""
    folder = dataset_root if dataset_root.is_dir() else dataset_root.parent
    if out == folder or out.is_relative_to(folder):
        raise ConfigError(f"--out {out} is inside the dataset {folder}: choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: choose another or remove it")


def _encoded(source: DatasetSource, item: str) -> tuple[bytes, str]:
    """The item's bytes as stored and the member extension their format calls for.

    CIFAR-10 holds pixel arrays, not files: those alone are encoded, as lossless PNG."""
    if source.layout == "cifar10":
        buffer = io.BytesIO()
        source.read(item)[0].save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if source.arrow is not None:
        data = source.arrow.encoded(item)
    else:
        try:
            data = Path(item).read_bytes()
        except OSError as error:
            raise DataError(f"{item} changed since the scan: {error.strerror or error}") from None
    return data, _extension(data)


def _extension(data: bytes) -> str:
    """The image member's extension from its format (the scan decoded it, so Pillow knows it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
    except (OSError, ValueError):
        image_format = ""
    extension = _FORMAT_EXTENSIONS.get(image_format, image_format.lower() or "img")
    return "image" if extension in METADATA_EXTENSIONS else extension


def _listing_and_sizes(tars: list[str], split: Split, base: Path) -> tuple[list[list], list[dict]]:
    """Each sample's [key, label, shard, offset, size, path], read back from the tars just written, and
    each tar's sample count and size."""
    rows: list[list] = []
    shards = []
    for shard, tar in enumerate(tars):
        with tarfile.open(tar) as archive:
            images = [m for m in archive.getmembers() if m.name.partition(".")[2] not in METADATA_EXTENSIONS]
        for member in images:
            position = int(member.name.partition(".")[0])
            label, path = split.labels[position], relative_path(split.items[position], base)
            rows.append([member.name.partition(".")[0], label, shard, member.offset_data, member.size, path])
        shards.append({"file": Path(tar).name, "samples": len(images), "bytes": os.path.getsize(tar)})
    if [row[0] for row in rows] != [sample_key(i) for i in range(len(split.items))]:
        raise DataError(f"the shards {', '.join(tars)} do not hold every sample of the split once")
    return rows, shards
