"""Read the CIFAR-10 "python version" archive without trusting its pickles.

The official batches are Python-2 pickles of dicts holding numpy arrays. Unpickling can run any
callable a file names, so batches are read with an unpickler that admits only the few numpy
constructors the format needs and refuses everything else by name. The .tar.gz is read member by
member in memory: nothing is extracted to disk.
"""

from __future__ import annotations

import _codecs
import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resfit.errors import DataError

BATCHES_FOLDER = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)  # stored channel-planar: all R, then all G, then all B, each row-major
# What a damaged (rather than hostile) pickle raises on the way to a numpy array.
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
)


@dataclass
class CifarArrays:
    """CIFAR-10 as arrays: images (N, 32, 32, 3) uint8 RGB, labels (N,) int64."""

    class_names: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def is_cifar10(path: Path) -> bool:
    """True for the CIFAR-10 python .tar.gz, the extracted batches folder, or a folder that holds it."""
    path = Path(path)
    if path.is_file():
        if path.name == ARCHIVE_NAME:
            return True
        return path.name.endswith((".tar.gz", ".tgz")) and _archive_has_batches_folder(path)
    if path.is_dir():
        return path.name == BATCHES_FOLDER or (path / BATCHES_FOLDER).is_dir()
    return False


def read_cifar10(path: Path) -> CifarArrays:
    """All five training batches (in order), the test batch and the class names; raises DataError."""
    path = Path(path)
    if not is_cifar10(path):
        raise DataError(f"not a CIFAR-10 python archive or {BATCHES_FOLDER}/ folder: {path}")
    wanted = (META, *TRAIN_BATCHES, TEST_BATCH)
    raw = _read_archive_members(path, wanted) if path.is_file() else _read_folder_members(path, wanted)
    missing = [name for name in wanted if name not in raw]
    if missing:
        raise DataError(f"CIFAR-10 at {path} is missing {', '.join(missing)}")

    meta = _load_pickle(raw[META], f"{path}:{META}")
    class_names = _class_names(meta, f"{path}:{META}")
    train = [_images_and_labels(raw[name], f"{path}:{name}", len(class_names)) for name in TRAIN_BATCHES]
    test_images, test_labels = _images_and_labels(raw[TEST_BATCH], f"{path}:{TEST_BATCH}", len(class_names))
    return CifarArrays(
        class_names=class_names,
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled numpy array needs; any other global is refused by name."""

    def find_class(self, module: str, name: str) -> Callable:
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise DataError(f"refused to unpickle global {module}.{name}: CIFAR batches hold only arrays")
        return allowed[(module, name)]


def _allowed_globals() -> dict[tuple[str, str], Callable]:
    # numpy 2 moved numpy.core to numpy._core; old pickles name the former, new ones the latter.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how Python 3 pickles bytes at protocol 2
    }


def _load_pickle(data: bytes, where: str) -> object:
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    except _UNPICKLE_ERRORS as error:
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({type(error).__name__}: {error})") from None


def _class_names(meta: object, where: str) -> list[str]:
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise DataError(f"{where}: no label_names list")
    return [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names]


def _images_and_labels(raw: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(raw, where)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where}: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    pixels_per_image = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (pixels_per_image,):
        shape = getattr(data, "shape", None)
        raise DataError(
            f"{where}: b'data' must be a uint8 array of shape (N, {pixels_per_image}), not {shape}"
        )
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}")
    images = data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _archive_has_batches_folder(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:gz") as archive:
            return any(_batch_name(member.name) is not None for member in archive)
    except (tarfile.TarError, OSError, EOFError):
        return False


def _batch_name(member_name: str) -> str | None:
    """'…/cifar-10-batches-py/data_batch_1' -> 'data_batch_1'; the folder itself -> ''."""
    parts = member_name.rstrip("/").split("/")
    if BATCHES_FOLDER not in parts:
        return None
    rest = parts[parts.index(BATCHES_FOLDER) + 1 :]
    return "/".join(rest)


def _read_archive_members(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                name = _batch_name(member.name)
                if name in wanted and member.isfile():
                    found[name] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read CIFAR-10 archive {path}: {error}") from None
    return found


def _read_folder_members(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    folder = path if path.name == BATCHES_FOLDER else path / BATCHES_FOLDER
    found: dict[str, bytes] = {}
    for name in wanted:
        member = folder / name
        if member.is_file():
            try:
                found[name] = member.read_bytes()
            except OSError as error:
                raise DataError(f"cannot read {member}: {error.strerror or error}") from None
    return found
