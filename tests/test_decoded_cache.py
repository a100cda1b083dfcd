"""The decoded-image cache: the same pixels as decoding, reused while the files are unchanged, bounded."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resfit.data.dataset import ImageDataset
from resfit.data.decoded_cache import (
    LONG_SIDE_CAP,
    _evict,
    decoded_caches,
    holding,
    open_decoded,
)
from resfit.data.scan import default_cache_dir
from resfit.data.sources import discover
from resfit.data.splits import DatasetSource
from resfit.data.transforms import INTERPOLATIONS, Preprocessing
from resfit.errors import ConfigError, ImageReadError
from resfit.models import IMAGENET_MEAN, IMAGENET_STD
from resfit.torchvision_import import transforms as T
from resfit.train import TrainConfig, train

# (width, height): square, landscape, portrait, odd sizes, and panoramas beyond the 2:1 cap
SHAPES = [(40, 40), (90, 30), (30, 100), (61, 23), (23, 77), (150, 41), (37, 124), (120, 40), (45, 50)]


def two_colour_images(root: Path, repeats: dict[str, int], shapes: list, seed: int = 0) -> Path:
    """Blue and red classes: each split's shapes ``repeats[split]`` times, as PNG and JPEG in turn."""
    rng = np.random.default_rng(seed)
    for split, times in repeats.items():
        for label, name in enumerate(("blue", "red")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for r in range(times):
                for i, (width, height) in enumerate(shapes):
                    pixels = rng.integers(0, 120, size=(height, width, 3), dtype=np.uint8)
                    pixels[..., 2 - 2 * label] += 120
                    suffix = "jpg" if (i + r) % 2 else "png"
                    Image.fromarray(pixels).save(folder / f"{r}_{i}.{suffix}")
    return root


@pytest.fixture(scope="module")
def varied(module_tmp):
    """Two classes of images with varied aspect ratios, as PNG and JPEG."""
    return two_colour_images(module_tmp("varied"), {"train": 2, "val": 1}, SHAPES)


def tiny_run(data: Path, out: Path, **changes) -> TrainConfig:
    """A resnet18 from scratch at 32 px, one epoch: seconds."""
    settings = dict(model="resnet18", weights="none", epochs=1, img_size=32, batch_size=8, num_workers=0)
    return TrainConfig(data=str(data), out=str(out), quiet=True, **settings | changes)


def prep_for(crop: int) -> Preprocessing:
    return Preprocessing.for_size(crop, IMAGENET_MEAN, IMAGENET_STD)


def test_cached_pixels_are_the_eval_resize_capped(varied, tmp_path):
    source = discover(varied)
    cache, message = open_decoded(source, "train", 36, root=tmp_path)
    assert cache is not None and "built" in message
    resize = T.Resize(36, interpolation=INTERPOLATIONS["bilinear"], antialias=True)
    capped = 0
    for i, item in enumerate(source.splits["train"].items):
        original, _ = source.read(item)
        expected = np.asarray(resize(original))
        got = cache.pixels(i)
        assert min(got.shape[:2]) == 36
        assert max(got.shape[:2]) <= LONG_SIDE_CAP * 36 + 3
        if max(expected.shape[:2]) <= LONG_SIDE_CAP * 36:
            np.testing.assert_array_equal(got, expected)
        else:  # the centre of the long side, cut evenly at both ends
            capped += 1
            height, width = got.shape[:2]
            top, left = (expected.shape[0] - height) // 2, (expected.shape[1] - width) // 2
            np.testing.assert_array_equal(got, expected[top : top + height, left : left + width])
        np.testing.assert_array_equal(np.asarray(cache.image(i)), got)
    assert capped > 0


@pytest.mark.parametrize("crop", [32, 33, 35, 36, 40, 41])
def test_eval_transform_on_cached_equals_on_original(varied, tmp_path, crop):
    source = discover(varied)
    prep = prep_for(crop)
    for split in ("train", "val"):
        cache, _ = open_decoded(source, split, prep.resize_size, prep.interpolation, root=tmp_path)
        plain = ImageDataset(source, split, prep.eval_transform())
        cached = ImageDataset(source, split, prep.eval_transform(), decoded=cache)
        for i in range(len(plain)):
            assert torch.equal(plain[i][0], cached[i][0]), (split, i)
            assert plain[i][1] == cached[i][1]


def test_a_cache_serves_only_the_resize_it_holds(varied, tmp_path):
    """A pass at another eval resize or interpolation decodes its files: the cache's pixels would not be its."""
    source = discover(varied)
    prep = prep_for(32)
    cache, _ = open_decoded(source, "val", prep.resize_size, prep.interpolation, root=tmp_path)
    assert holding({"val": cache}, prep) == {"val": cache}
    assert holding({"val": cache}, prep_for(48)) == {}
    other = next(name for name in INTERPOLATIONS if name != prep.interpolation)
    assert holding({"val": cache}, replace(prep, interpolation=other)) == {}


def test_reused_then_rebuilt_when_a_file_changes(varied, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(varied, data)
    first, message = open_decoded(discover(data), "train", 36)
    assert first is not None and "built" in message
    assert first.data_path.parent == default_cache_dir() / "decoded"
    again, message = open_decoded(discover(data), "train", 36)
    assert again is not None and "reused" in message and again.data_path == first.data_path

    changed = sorted((data / "train" / "red").glob("*.png"))[0]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(changed)  # same name, other pixels
    source = discover(data)
    rebuilt, message = open_decoded(source, "train", 36)
    assert rebuilt is not None and "built" in message and rebuilt.data_path != first.data_path
    index = source.splits["train"].items.index(str(changed))
    assert rebuilt.pixels(index).max() == 0

    other_size, _ = open_decoded(source, "train", 40)
    assert other_size.data_path != rebuilt.data_path
    assert min(other_size.pixels(0).shape[:2]) == 40


def test_over_budget_is_not_used_and_leaves_no_file(varied, tmp_path):
    source = discover(varied)
    cache, message = open_decoded(source, "train", 36, budget_bytes=1000, root=tmp_path)
    assert cache is None and "budget" in message
    # Above the lower bound (every image at least 36x36) but below what the panoramas need.
    lower = len(source.splits["train"].items) * 36 * 36 * 3
    cache, message = open_decoded(source, "train", 36, budget_bytes=lower + 10, root=tmp_path)
    assert cache is None and "budget" in message
    assert not any(tmp_path.iterdir())

    lines = []
    caches = decoded_caches(source, prep_for(32), "on", budget_bytes=1000, say=lines.append)
    assert caches == {} and len(lines) == 1 and "not used" in lines[0] and "budget" in lines[0]


def test_least_recently_used_caches_are_evicted(varied, tmp_path):
    source = discover(varied)
    old, _ = open_decoded(source, "train", 36, root=tmp_path)
    recent, _ = open_decoded(source, "train", 40, root=tmp_path)
    two_hours_ago = time.time() - 7200
    for path in (old.data_path, old.data_path.with_name(old.data_path.stem + ".index.npy")):
        os.utime(path, (two_hours_ago, two_hours_ago))
    _evict(tmp_path, limit_bytes=0)  # the recent one stays even over the limit: a run may be using it
    assert not old.data_path.exists() and recent.data_path.exists()
    assert np.array(old.pixels(0)).size > 0  # still mapped: a run that was using it carries on
    again, message = open_decoded(source, "train", 36, root=tmp_path)
    assert again is not None and "built" in message


def test_unreadable_file_is_substituted_not_fatal(varied, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(varied, data)
    broken = sorted((data / "train" / "blue").glob("*.jpg"))[0]
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    source = discover(data)  # no scan: the file breaks after the scan would have passed it
    prep = prep_for(32)
    cache, message = open_decoded(source, "train", prep.resize_size)
    assert cache is not None, message
    index = source.splits["train"].items.index(str(broken))
    with pytest.raises(ImageReadError):
        cache.pixels(index)
    dataset = ImageDataset(source, "train", prep.eval_transform(), decoded=cache)
    plain = ImageDataset(source, "train", prep.eval_transform())
    image, label = dataset[index]
    assert torch.equal(image, plain[index][0])  # both substitute the same neighbour
    assert label == plain[index][1]


def test_dataloader_with_one_worker_and_seeded_augmentation(varied, tmp_path):
    source = discover(varied)
    prep = prep_for(32)
    cache, _ = open_decoded(source, "train", prep.resize_size, root=tmp_path)
    cache.pixels(0)  # mapped here; a worker must map it again, not receive the array
    state = pickle.dumps(cache)
    assert len(state) < 4096 and pickle.loads(state)._pixels is None

    dataset = ImageDataset(source, "train", prep.eval_transform(), decoded=cache)
    plain = ImageDataset(source, "train", prep.eval_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1)
    reference = torch.utils.data.DataLoader(plain, batch_size=8, num_workers=0)
    for (images, labels), (expected, expected_labels) in zip(loader, reference, strict=True):
        assert torch.equal(images, expected) and torch.equal(labels, expected_labels)

    augmented = ImageDataset(source, "train", prep.train_transform("standard"), decoded=cache)
    augmented.set_epoch(seed=0, epoch=1)
    first = torch.stack([augmented[i][0] for i in range(4)])
    batch, _ = next(iter(torch.utils.data.DataLoader(augmented, batch_size=4, num_workers=1)))
    assert torch.equal(first, batch)
    assert first.shape == (4, 3, 32, 32)


def test_modes(varied):
    source = discover(varied)
    lines = []
    assert decoded_caches(source, prep_for(32), "off", say=lines.append) == {}
    assert decoded_caches(source, prep_for(160), "auto", say=lines.append) == {}
    assert "off" in lines[0] and "off" in lines[1] and "160" in lines[1]
    caches = decoded_caches(source, prep_for(32), "auto", say=lines.append)
    assert set(caches) == {"train", "val"} and lines[2].startswith("decoded-image cache: on")
    with pytest.raises(ConfigError, match="decoded-cache"):
        decoded_caches(source, prep_for(32), "always")
    with pytest.raises(ConfigError, match="decoded-cache"):
        TrainConfig(data=str(varied), decoded_cache="always").validate()


def test_training_on_cached_images_matches_decoding(varied, tmp_path):
    """With the eval transform as training's, a run on cached images is the run on decoded files."""
    runs = {}
    for mode in ("on", "off"):
        lines = []
        config = tiny_run(varied, tmp_path / mode, augment="none", head_stage=False, decoded_cache=mode)
        runs[mode] = train(config, say=lines.append)
        assert sum(line.startswith("decoded-image cache: " + mode) for line in lines) == 1
    on, off = (runs[m].history[-1] for m in ("on", "off"))
    assert on["train_loss"] == off["train_loss"] and on["val_loss"] == off["val_loss"]


def test_passes_after_training_read_the_cache_not_the_files(tmp_path, monkeypatch):
    """Calibration, the "unknown" rule's feature bank and the final evaluation read the run's decoded
    images: each file is decoded twice (the duplicate check's perceptual hash, then the cache), plus the
    val mistakes drawn on the report's contact sheet, not once more per pass."""
    data = two_colour_images(tmp_path / "data", {"train": 1, "val": 1}, SHAPES + SHAPES[:3], seed=1)
    reads: list[str] = []
    read = DatasetSource.read
    monkeypatch.setattr(DatasetSource, "read", lambda self, item: reads.append(item) or read(self, item))
    lines: list[str] = []
    config = tiny_run(data, tmp_path / "run", decoded_cache="on", reject_score="knn")
    train(config, say=lines.append)
    assert any("below knn" in line for line in lines), lines  # the knn rule: its bank was made
    mistakes = json.loads((tmp_path / "run" / "misclassified.json").read_text())
    files = 2 * 2 * 12  # 2 splits x 2 classes x 12 photos: 24 val photos, enough for an "unknown" rule
    assert len(reads) <= 2 * files + len(mistakes), (len(reads), files, len(mistakes))
