"""CIFAR-10 python archives: exact pixels and labels, both packagings, and no code run from pickles."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.data.cifar import is_cifar10, read_cifar10
from resfit.data.scan import load_dataset
from resfit.data.sources import discover
from resfit.errors import DataError

CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
PER_CLASS = 4  # per split: 20 training images spread over five batches, 20 test images


def real_photos(shared_dir: Path, split: str) -> tuple[np.ndarray, list[int]]:
    """PER_CLASS flowers per class, resized to 32x32 like CIFAR, in class order."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((shared_dir / "data" / "flowers5" / split / name).iterdir())[:PER_CLASS]:
            images.append(np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)))
            labels.append(label)
    return np.stack(images), labels


def batch_dict(images: np.ndarray, labels: list[int], batch_label: str) -> dict:
    """The original layout: bytes keys, one uint8 row per image, channel-planar R, G, B, each row-major."""
    return {
        b"batch_label": batch_label.encode(),
        b"labels": list(labels),
        b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072)),
        b"filenames": [f"img_{i:04d}.png".encode() for i in range(len(images))],
    }


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_batches_folder(root: Path, train, test) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = train
    for number, rows in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        batch = batch_dict(
            train_images[rows], [train_labels[i] for i in rows], f"training batch {number} of 5"
        )
        write_pickle(folder / f"data_batch_{number}", batch)
    write_pickle(folder / "test_batch", batch_dict(test[0], test[1], "testing batch 1 of 1"))
    meta = {b"num_cases_per_batch": 4, b"label_names": [n.encode() for n in CLASSES], b"num_vis": 3072}
    write_pickle(folder / "batches.meta", meta)
    return folder


def make_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture(scope="module")
def photos(shared_dir):
    return real_photos(shared_dir, "train"), real_photos(shared_dir, "val")


@pytest.fixture
def cifar(tmp_path, photos) -> dict[str, Path]:
    folder = make_batches_folder(tmp_path / "extracted", *photos)
    (tmp_path / "download").mkdir()
    archive = make_archive(folder, tmp_path / "download" / "cifar-10-python.tar.gz")
    return {"archive": archive, "folder": folder, "parent": folder.parent}


@pytest.mark.parametrize("packaging", ["archive", "folder", "parent"])
def test_read_round_trips_pixels_and_labels(cifar, photos, packaging):
    (train_images, train_labels), (test_images, test_labels) = photos
    arrays = read_cifar10(cifar[packaging])
    assert arrays.class_names == CLASSES
    assert arrays.train_images.shape == (20, 32, 32, 3) and arrays.train_images.dtype == np.uint8
    assert np.array_equal(arrays.train_images, train_images)
    assert np.array_equal(arrays.test_images, test_images)
    assert arrays.train_labels.dtype == np.int64
    assert arrays.train_labels.tolist() == train_labels
    assert arrays.test_labels.tolist() == test_labels


def test_archive_is_read_in_memory(cifar):
    before = sorted(p.name for p in cifar["archive"].parent.iterdir())
    read_cifar10(cifar["archive"])
    assert sorted(p.name for p in cifar["archive"].parent.iterdir()) == before


def test_is_cifar10(cifar, tmp_path):
    assert is_cifar10(cifar["archive"]) and is_cifar10(cifar["folder"]) and is_cifar10(cifar["parent"])
    renamed = make_archive(cifar["folder"], tmp_path / "my-copy.tar.gz")
    assert is_cifar10(renamed)
    assert read_cifar10(renamed).class_names == CLASSES
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(cifar["folder"] / "batches.meta", arcname="something/batches.meta")
    assert not is_cifar10(other)
    assert not is_cifar10(tmp_path / "download" / "missing")
    assert not is_cifar10(tmp_path / "download")


@pytest.mark.parametrize("packaging", ["archive", "folder"])
def test_discover_and_load_dataset(cifar, photos, packaging):
    source = discover(cifar[packaging])
    assert source.layout == "cifar10" and source.class_names == CLASSES
    assert len(source.splits["train"].items) == 15 and len(source.splits["val"].items) == 5
    assert sorted(source.splits["val"].labels) == [0, 1, 2, 3, 4]  # one of each class's four held out
    assert sorted(source.splits["train"].items + source.splits["val"].items) == sorted(
        f"cifar10:train:{i}" for i in range(20)
    )
    assert source.splits["test"].items[7] == "cifar10:test:7"
    assert "held out 20%" in source.notes[0]

    image, notes = source.read("cifar10:test:7")
    assert image.mode == "RGB" and image.size == (32, 32) and notes == []
    assert np.array_equal(np.asarray(image), photos[1][0][7])
    with pytest.raises(DataError, match="not a CIFAR-10 item key"):
        source.read("cifar10:train:20")
    item = source.splits["train"].items[3]
    label = source.splits["train"].labels[3]
    index = int(item.rsplit(":", 1)[1])
    assert np.array_equal(np.asarray(source.read(item)[0]), photos[0][0][index])
    assert label == photos[0][1][index]

    scanned, report = load_dataset(cifar[packaging])
    assert report.layout == "cifar10"
    assert report.class_counts["train"] == dict.fromkeys(CLASSES, 3)
    assert report.class_counts["val"] == dict.fromkeys(CLASSES, 1)
    assert report.class_counts["test"] == dict.fromkeys(CLASSES, 4)
    assert report.skipped == [] and report.converted == []
    assert np.array_equal(np.asarray(scanned.read(item)[0]), photos[0][0][index])


class RunsACommand:
    """Unpickling this calls os.system: exactly what a hostile batch file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("where", ["folder", "archive"])
def test_pickle_naming_a_forbidden_global_is_refused_not_run(tmp_path, photos, where):
    folder = make_batches_folder(tmp_path / "evil", *photos)
    marker = tmp_path / "pwned"
    write_pickle(folder / "data_batch_3", {b"data": RunsACommand(f"touch {marker}"), b"labels": []})
    target = folder if where == "folder" else make_archive(folder, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=r"refused to unpickle global (posix|os|nt)\.system") as caught:
        read_cifar10(target)
    assert "data_batch_3" in str(caught.value)
    with pytest.raises(DataError, match="refused"):
        discover(target)
    assert not marker.exists()


def test_other_forbidden_globals(tmp_path, photos):
    folder = make_batches_folder(tmp_path / "evil", *photos)
    # GLOBAL builtins.eval, then REDUCE with one string argument.
    payload = b"\x80\x02cbuiltins\neval\nq\x00X\x05\x00\x00\x001+1+1q\x01\x85q\x02Rq\x03."
    (folder / "batches.meta").write_bytes(payload)
    with pytest.raises(DataError, match=r"builtins\.eval"):
        read_cifar10(folder)


def test_missing_batches_are_named(tmp_path, photos):
    folder = make_batches_folder(tmp_path / "partial", *photos)
    (folder / "data_batch_5").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing data_batch_5, test_batch"):
        read_cifar10(folder)
    archive = make_archive(folder, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="missing data_batch_5, test_batch"):
        read_cifar10(archive)


def test_batch_with_wrong_shape(tmp_path, photos):
    folder = make_batches_folder(tmp_path / "odd", *photos)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"data_batch_2.*shape"):
        read_cifar10(folder)


def test_corrupt_archive(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot read CIFAR-10 archive"):
        read_cifar10(archive)


def test_pickles_written_by_numpy_1_are_read(tmp_path, photos):
    """The real archive names numpy.core.multiarray (numpy 1.x); numpy 2 writes numpy._core.multiarray."""
    folder = make_batches_folder(tmp_path / "old", *photos)
    for path in folder.iterdir():
        data = path.read_bytes()
        path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    assert b"cnumpy.core.multiarray\n" in (folder / "data_batch_1").read_bytes()
    arrays = read_cifar10(folder)
    assert np.array_equal(arrays.train_images, photos[0][0])
