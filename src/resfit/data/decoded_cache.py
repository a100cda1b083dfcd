"""Decoded-image cache: each image of a split decoded and resized once, then read from memory every epoch.

At 96-128 px a ResNet step is cheap enough that decoding a large JPEG becomes a visible share of an
epoch on a 2-core machine. Here every image is decoded once, resized so its short side is
``short_side`` px (the eval transform's own ``T.Resize``, so evaluating a cached image gives exactly
what evaluating the original gives) and stored as uint8 HWC pixels, all images one after another in
one flat file that each DataLoader worker memory-maps. Training's random-resized crops then start
from images pre-resized to the preprocessing's resize size (crop / 0.875), the way the pretrained
sources in ../shared were trained.

The long side is capped at about twice the short side: a longer image is centre-cropped to
2 x short side, plus up to 3 px so that the cut at each end is the same even number of pixels.
Then the eval centre crop (whose offset torchvision rounds half to even) is the same pixels in the
capped image as in the whole one; random crops of a panorama see its middle only.

The key covers the split's image bytes and labels, the short side, the interpolation and this
format, so a changed file gives a new key and a stale cache is never used. A file that cannot be
read while building is marked, and ImageDataset substitutes a neighbour for it, as it does for a
file that breaks mid-training. The cache is bounded: a split that would exceed the byte budget is
not cached and a one-line message says so. Files live under $RESFIT_CACHE/decoded; after each build
the least recently used caches there are deleted until the folder is back under the budget (caches
used within the last hour are kept, so a concurrent run's files stay).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError, ImageReadError
from ..fileio import atomic_write
from ..torchvision_import import transforms as T
from .feature_cache import content_fingerprint
from .scan import PROGRESS_DELAY_S, default_cache_dir
from .splits import DatasetSource
from .transforms import INTERPOLATIONS, CentreCropToAspect, Preprocessing

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: images over 8:1 are centre-cropped before the resize
MODES = ("auto", "on", "off")
DEFAULT_BUDGET_BYTES = 2 * 1024**3
LONG_SIDE_CAP = 2  # times the short side
# "auto" caches at training crops up to this size: where decoding is a large share of a step.
AUTO_MAX_CROP = 128
_UNREADABLE = 0  # height recorded for a file that could not be read while building
_RECENT_S = 3600  # caches used this recently are never evicted


class DecodedImages:
    """One split's pre-resized images: a flat uint8 file plus an (N, 3) index of offset, height, width.

    Pickles without its mapping (paths and index only): a spawned DataLoader worker maps the file again,
    a forked one inherits the mapping.
    """

    def __init__(self, data_path: Path, index: np.ndarray, short_side: int, interpolation: str):
        self.data_path = Path(data_path)
        self.index = index
        self.short_side = short_side
        self.interpolation = interpolation
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(_sizes(self.index).sum())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def pixels(self, i: int) -> np.ndarray:
        """Item ``i`` as a read-only (height, width, 3) uint8 view of the mapped file."""
        offset, height, width = (int(v) for v in self.index[i])
        if height == _UNREADABLE:
            raise ImageReadError(f"item {i}", "could not be read when the decoded-image cache was built")
        self.map()
        return self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels(i))

    def map(self) -> DecodedImages:
        """Map the file now: forked DataLoader workers inherit the mapping, even if the file is evicted later."""
        if self._pixels is None and self.nbytes > 0:
            self._pixels = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        return self


def resize_short_side(image: Image.Image, short_side: int, interpolation: str = "bilinear") -> Image.Image:
    """The eval transform's resize, then the long side centre-cropped to about LONG_SIDE_CAP x short side."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {interpolation!r}")
    image = CentreCropToAspect()(image)  # as the eval transform does: bounds the resize's memory
    resized = T.Resize(short_side, interpolation=INTERPOLATIONS[interpolation], antialias=True)(image)
    width, height = resized.size
    long_side = max(width, height)
    cap = LONG_SIDE_CAP * short_side
    if long_side <= cap:
        return resized
    # An even cut at each end: CenterCrop's offset, rounded half to even, then moves by exactly the cut.
    cap += (long_side - cap) % 4
    cut = (long_side - cap) // 2
    box = (cut, 0, cut + cap, height) if width > height else (0, cut, width, cut + cap)
    return resized.crop(box)


def decoded_key(content: str, short_side: int, interpolation: str, max_pixels: int) -> str:
    described = json.dumps(
        {
            "v": FORMAT_VERSION,
            "data": content,
            "short_side": short_side,
            "interpolation": interpolation,
            "long_side_cap": LONG_SIDE_CAP,
            "max_pixels": max_pixels,
        },
        sort_keys=True,
    )
    return hashlib.blake2b(described.encode(), digest_size=20).hexdigest()


def open_decoded(
    source: DatasetSource,
    split: str,
    short_side: int,
    interpolation: str = "bilinear",
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    root: Path | None = None,
    progress: bool = False,
) -> tuple[DecodedImages | None, str]:
    """The split's cache (reused when its key matches, else built) and a few words on what happened.

    None, with the reason, when the split does not fit ``budget_bytes`` or its files cannot be hashed.
    """
    items = source.splits[split].items
    smallest = len(items) * short_side * short_side * 3  # every image ends at least short_side square
    if smallest > budget_bytes:
        return None, f"{split} needs at least {_size(smallest)}, over the {_size(budget_bytes)} budget"
    try:
        content = content_fingerprint(source, split)
    except OSError as error:
        return None, f"cannot hash {split}'s files ({error})"
    key = decoded_key(content, short_side, interpolation, source.max_pixels)
    folder = Path(root) if root is not None else default_cache_dir() / "decoded"
    data_path, index_path = folder / f"{key}.u8", folder / f"{key}.index.npy"
    cached = _load(data_path, index_path, len(items), short_side, interpolation)
    if cached is not None:
        if cached.nbytes > budget_bytes:
            return None, f"{split} takes {_size(cached.nbytes)}, over the {_size(budget_bytes)} budget"
        return cached.map(), f"{split} {len(items)} images, {_size(cached.nbytes)} (reused)"
    started = time.perf_counter()
    index = _build(source, split, short_side, interpolation, budget_bytes, data_path, progress)
    if index is None:
        return None, f"{split} would exceed the {_size(budget_bytes)} budget"
    built = DecodedImages(data_path, index, short_side, interpolation)
    if built.nbytes == 0:
        data_path.unlink(missing_ok=True)
        return None, f"no image of {split} could be read"
    built.map()  # before anything can evict it
    # The index goes last: its presence means the pixels beside it are complete.
    atomic_write(index_path, lambda tmp: _save_index(tmp, index))
    seconds = time.perf_counter() - started
    _evict(folder, max(budget_bytes, DEFAULT_BUDGET_BYTES))
    return built, f"{split} {len(items)} images, {_size(built.nbytes)} (built in {seconds:.1f} s)"


def decoded_caches(
    source: DatasetSource,
    preprocessing: Preprocessing,
    mode: str,
    splits: Iterable[str] = ("train", "val"),
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    say: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, DecodedImages]:
    """A training run's caches per split, by ``mode`` (auto/on/off), sharing one budget; says one line."""
    if mode not in MODES:
        raise ConfigError(f"decoded-cache must be one of {', '.join(MODES)}, got {mode!r}")
    why_not = _why_not(source, preprocessing, mode)
    if why_not:
        say(f"decoded-image cache: off ({why_not})")
        return {}
    caches: dict[str, DecodedImages] = {}
    words = []
    for split in (s for s in splits if s in source.splits):
        cache, message = open_decoded(
            source,
            split,
            preprocessing.resize_size,
            preprocessing.interpolation,
            budget_bytes=budget_bytes - sum(c.nbytes for c in caches.values()),
            progress=progress,
        )
        words.append(message if cache is not None else f"{split} not cached: {message}")
        if cache is not None:
            caches[split] = cache
    state = "on" if caches else "not used"
    say(f"decoded-image cache: {state}, {preprocessing.resize_size} px short side: {'; '.join(words)}")
    return caches


def holding(caches: Mapping[str, DecodedImages], preprocessing: Preprocessing) -> dict[str, DecodedImages]:
    """The caches whose images are ``preprocessing``'s own eval resize, so that its eval transform gives
    exactly what it gives on the files; a cache built at another size or interpolation is left out."""
    wanted = (preprocessing.resize_size, preprocessing.interpolation)
    return {
        split: cache for split, cache in caches.items() if (cache.short_side, cache.interpolation) == wanted
    }


def _why_not(source: DatasetSource, preprocessing: Preprocessing, mode: str) -> str | None:
    if mode == "off":
        return "--decoded-cache off"
    if source.layout == "shards":
        return "sharded data is streamed, not cached"
    if mode == "on":
        return None
    if source.layout == "cifar10":
        return "auto: CIFAR-10 is already decoded arrays"
    if preprocessing.crop_size > AUTO_MAX_CROP:
        return f"auto: {preprocessing.crop_size} px > {AUTO_MAX_CROP} px; --decoded-cache on to use it"
    return None


def _build(
    source: DatasetSource,
    split: str,
    short_side: int,
    interpolation: str,
    budget_bytes: int,
    data_path: Path,
    progress: bool,
) -> np.ndarray | None:
    """Decode and resize every item (threads: Pillow releases the GIL), append the pixels; None if over budget."""
    items = source.splits[split].items
    index = np.zeros((len(items), 3), np.int64)

    def load(item: str) -> np.ndarray | Exception:
        try:
            image, _ = source.read(item)
        except (ImageReadError, OSError) as error:
            return error
        return np.asarray(resize_short_side(image, short_side, interpolation))

    class OverBudget(Exception):
        pass

    def write(tmp: str) -> None:
        offset = 0
        threads = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        pool = ThreadPoolExecutor(max_workers=max(1, threads))
        bar = tqdm(
            total=len(items),
            desc=f"decoding {split}",
            unit="img",
            file=sys.stderr,
            disable=not progress,
            delay=PROGRESS_DELAY_S,
        )
        try:
            with open(tmp, "wb") as handle, bar:
                for i, pixels in enumerate(pool.map(load, items)):
                    bar.update()
                    if isinstance(pixels, Exception):
                        log.warning("skipping %s while caching %s: %s", items[i], split, pixels)
                        index[i] = (offset, _UNREADABLE, 0)
                        continue
                    if offset + pixels.nbytes > budget_bytes:
                        raise OverBudget
                    handle.write(np.ascontiguousarray(pixels).tobytes())
                    index[i] = (offset, pixels.shape[0], pixels.shape[1])
                    offset += pixels.nbytes
        finally:
            pool.shutdown(cancel_futures=True)

    try:
        atomic_write(data_path, write)
    except OverBudget:
        return None
    return index


def _save_index(tmp: str, index: np.ndarray) -> None:
    with open(tmp, "wb") as handle:
        np.save(handle, index, allow_pickle=False)


def _load(
    data_path: Path, index_path: Path, count: int, short_side: int, interpolation: str
) -> DecodedImages | None:
    """The cache at these paths if it is complete and consistent, else None (it will be rebuilt)."""
    try:
        index = np.load(index_path, allow_pickle=False)
        size = data_path.stat().st_size
    except (OSError, ValueError):
        return None
    if index.shape != (count, 3) or index.dtype != np.int64 or int(_sizes(index).sum()) != size:
        return None
    try:
        os.utime(index_path)  # used now: the last to be evicted
    except OSError:
        pass
    return DecodedImages(data_path, index, short_side, interpolation)


def _evict(folder: Path, limit_bytes: int) -> None:
    """Delete least recently used caches (and leftovers of interrupted builds) until under ``limit_bytes``."""
    now = time.time()
    caches, total = [], 0
    for data_path in folder.glob("*.u8"):
        index_path = data_path.with_name(data_path.name.removesuffix(".u8") + ".index.npy")
        try:
            info = data_path.stat()
        except OSError:
            continue
        try:
            used = index_path.stat().st_mtime
        except OSError:  # pixels without an index: a build being finished, or one cut short
            used = info.st_mtime
        caches.append((used, info.st_size, data_path, index_path))
        total += info.st_size
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _RECENT_S:
                tmp.unlink()
        except OSError:
            pass
    for used, size, data_path, index_path in sorted(caches):
        if total <= limit_bytes or now - used < _RECENT_S:
            break
        try:
            index_path.unlink(missing_ok=True)  # the index first: a half-deleted cache is never loaded
            data_path.unlink()
            total -= size
        except OSError:
            pass


def _sizes(index: np.ndarray) -> np.ndarray:
    return index[:, 1] * index[:, 2] * 3


def _size(nbytes: int) -> str:
    if nbytes >= 1024**3:
        return f"{nbytes / 1024**3:.2f} GiB"
    return f"{nbytes / 1024**2:.1f} MiB"
