"""A content hash and a perceptual hash of every image, cached by path, size and modification time.

The content hash (sha256 of the file's bytes) finds exact copies; the perceptual hash (imagehash's
DCT hash, 64 bits, of the decoded image as training sees it) finds the same photo re-encoded, resized,
recoloured or lightly cropped. Computing both costs one read and one decode per file (about 1 ms for
a small JPEG), so the verdicts are kept under $RESFIT_CACHE like the scan's: the next run over the same
folder costs one stat per file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np

from ..errors import ImageReadError
from ..fileio import atomic_write_json
from .scan import default_cache_dir
from .splits import DatasetSource

CACHE_FILE = "hashes-v1.json"


@dataclass(frozen=True)
class ImageHashes:
    """Parallel to a list of items: sha256 hex digests and 64-bit perceptual hashes."""

    items: list[str]
    sha256: list[str]
    phash: np.ndarray  # uint64, one per item
    decoded: np.ndarray  # bool: False where the file no longer decodes (its phash means nothing)


def hash_items(source: DatasetSource, items: list[str], cache_dir: Path | None = None) -> ImageHashes:
    """Hashes of ``items`` (files of ``source``, or CIFAR keys, which are hashed from their pixels)."""
    if source.layout == "cifar10":
        pairs = [_hash_pixels(source, item) for item in items]
        phash = np.array([p[1] for p in pairs], np.uint64)
        return ImageHashes(items, [p[0] for p in pairs], phash, np.ones(len(items), bool))
    if source.arrow is not None:  # dataset rows: bytes in memory-mapped tables, hashed each time (no cache)
        sha256 = [hashlib.sha256(source.arrow.encoded(item)).hexdigest() for item in items]
        hex_hashes = [_phash_hex(source, item) for item in items]
        phash = np.array([int(h or "0", 16) for h in hex_hashes], np.uint64)
        return ImageHashes(items, sha256, phash, np.array([bool(h) for h in hex_hashes], bool))
    cache_path = (cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILE
    cache = _read_cache(cache_path)
    sha256, phash, changed = [], [], False
    for item in items:
        try:
            info = os.stat(item)
        except OSError:  # gone since the scan: it matches nothing
            sha256.append(f"unreadable:{item}")
            phash.append("")
            continue
        entry = cache.get(item)
        key = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        if not _valid_entry(entry, key):
            data = Path(item).read_bytes()
            entry = {**key, "sha256": hashlib.sha256(data).hexdigest(), "phash": _phash_hex(source, item)}
            cache[item] = entry
            changed = True
        sha256.append(entry["sha256"])
        phash.append(entry["phash"])
    if changed:
        try:
            atomic_write_json(cache_path, cache)
        except OSError:  # the cache only saves time; the hashes themselves are right
            pass
    decoded = np.array([bool(h) for h in phash], bool)
    return ImageHashes(items, sha256, np.array([int(h or "0", 16) for h in phash], np.uint64), decoded)


def hamming_pairs(hashes: ImageHashes, max_distance: int, block: int = 2048) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance) with i < j whose perceptual hashes differ in at most ``max_distance`` bits.

    Blocks of rows against all later rows keep memory at block x n, whatever the dataset's size.
    """
    phash, decoded = hashes.phash, hashes.decoded
    pairs = []
    n = len(phash)
    for start in range(0, n, block):
        rows = phash[start : start + block]
        distances = _popcount(rows[:, None] ^ phash[None, start:])
        i, j = np.nonzero(distances <= max_distance)
        j = j + start  # columns start at `start`: j > i is the upper triangle
        keep = (j > i + start) & decoded[i + start] & decoded[j]
        pairs += [
            (start + int(a), int(b), int(distances[a, b - start]))
            for a, b in zip(i[keep], j[keep], strict=True)
        ]
    return pairs


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has bitwise_count; older ones count bytes in a table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(b).count("1") for b in range(256)], np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(-1)


def _read_cache(path: Path) -> dict:
    """The cached hashes, or an empty mapping when the file is missing or unreadable (it is rewritten)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _valid_entry(entry: object, key: dict) -> bool:
    return (
        isinstance(entry, dict)
        and all(entry.get(name) == value for name, value in key.items())
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("phash"), str)
    )


def _phash_hex(source: DatasetSource, item: str) -> str:
    try:
        image, _ = source.read(item)
    except (ImageReadError, OSError):  # changed since the scan: it has no perceptual twin, only its bytes
        return ""
    return str(imagehash.phash(image))


def _hash_pixels(source: DatasetSource, item: str) -> tuple[str, int]:
    image, _ = source.read(item)
    return hashlib.sha256(image.tobytes()).hexdigest(), int(str(imagehash.phash(image)), 16)
