"""Find a dataset's classes and its train/val(/test) splits from whatever the user pointed at.

Seven layouts are understood, tried in this order: a folder of tar shards written by `resfit shard`
(read in shards.py), the CIFAR-10 python archive, a Hugging Face
`datasets` dataset saved with save_to_disk, parquet files with an image and a label column (both
read in hf.py), a CSV manifest (path,label[,split]), an ImageFolder tree (train/<class>/,
val/<class>/, optional test/), and a flat tree (<class>/ only). Discovery only lists files; decoding and validation happen once, in
scan.py. Where the data has no validation split, one is held out here, per class and seeded, and
a note says so.
"""

from __future__ import annotations

import csv
import math
import os
import random
from pathlib import Path

from resfit.data.cifar import is_cifar10, read_cifar10
from resfit.data.hf import is_saved_dataset, parquet_files, read_arrow_dataset
from resfit.data.shards import discover_shards
from resfit.data.splits import CIFAR_PREFIX, SHARD_INDEX, SPLIT_SEED, VAL_FRACTION, DatasetSource, Split
from resfit.errors import ConfigError, DataError

VAL_FOLDER_NAMES = ("val", "valid", "validation")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def discover(
    data: str | os.PathLike, *, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> DatasetSource:
    """List the dataset's classes and split files (no decoding); hold out val where the data has none."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(data))))
    if not root.exists():
        raise DataError(f"dataset not found: {root}")
    if (root / SHARD_INDEX).is_file():
        return discover_shards(root)
    if is_cifar10(root):
        return _discover_cifar(root, val_fraction, seed)
    if is_saved_dataset(root) or parquet_files(root):
        return _discover_arrow(root, val_fraction, seed)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _discover_csv(root, val_fraction, seed)
        raise DataError(
            f"{root} is a file: expected a folder of class folders, a .csv manifest, a .parquet file or CIFAR-10"
        )
    if (root / "train").is_dir():
        return _discover_imagefolder(root, val_fraction, seed)
    return _discover_flat(root, val_fraction, seed)


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(keep, held_out) indices: `fraction` of each class held out, at least one of a class of two or more."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    held_out: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        count = math.floor(len(indices) * fraction + 0.5)
        if fraction > 0 and len(indices) >= 2:
            count = min(max(count, 1), len(indices) - 1)
        held_out.extend(indices[:count])
    held = set(held_out)
    return [i for i in range(len(labels)) if i not in held], sorted(held)


def _discover_cifar(root: Path, val_fraction: float, seed: int) -> DatasetSource:
    arrays = read_cifar10(root)
    labels = arrays.train_labels.tolist()
    everything = Split([f"{CIFAR_PREFIX}train:{i}" for i in range(len(labels))], labels)
    keep, held = stratified_split(labels, val_fraction, seed)
    test_labels = arrays.test_labels.tolist()
    test = Split([f"{CIFAR_PREFIX}test:{i}" for i in range(len(test_labels))], test_labels)
    note = (
        f"CIFAR-10: held out {_percent(val_fraction)} of each class of the training batches "
        f"for validation (seed {seed}); test = test_batch"
    )
    return DatasetSource(
        root=root,
        layout="cifar10",
        class_names=arrays.class_names,
        splits={"train": everything.subset(keep), "val": everything.subset(held), "test": test},
        notes=[note],
        cifar=arrays,
    )


def _discover_arrow(root: Path, val_fraction: float, seed: int) -> DatasetSource:
    found = read_arrow_dataset(root)
    splits = {role: Split(items, labels) for role, (items, labels) in found.splits.items()}
    notes = list(found.notes)
    if "val" not in splits:
        splits["train"], splits["val"] = _hold_out(splits["train"], val_fraction, seed)
        notes.append(
            f"no validation split: held out {_percent(val_fraction)} of each class of train for validation "
            f"(seed {seed})"
        )
    ordered = {name: splits[name] for name in ("train", "val", "test") if name in splits}
    return DatasetSource(
        root=root,
        layout=found.layout,
        class_names=found.class_names,
        splits=ordered,
        notes=notes,
        arrow=found.images,
    )


def _discover_imagefolder(root: Path, val_fraction: float, seed: int) -> DatasetSource:
    notes: list[str] = []
    train_dir = root / "train"
    class_names = _class_folders(train_dir)
    _require_two_classes(class_names, train_dir)
    splits = {"train": _folder_split(train_dir, class_names, class_names, notes)}

    val_dir = next((root / name for name in VAL_FOLDER_NAMES if (root / name).is_dir()), None)
    if val_dir is None:
        splits["train"], splits["val"] = _hold_out(splits["train"], val_fraction, seed)
        notes.append(
            f"no val/ folder: held out {_percent(val_fraction)} of each class of train/ "
            f"for validation (seed {seed})"
        )
    else:
        if val_dir.name != "val":
            notes.append(f"validation split read from {val_dir.name}/")
        val_classes = _other_split_classes(val_dir, class_names, notes)
        splits["val"] = _folder_split(val_dir, val_classes, class_names, notes)
    test_dir = root / "test"
    if test_dir.is_dir():
        test_classes = _other_split_classes(test_dir, class_names, notes)
        splits["test"] = _folder_split(test_dir, test_classes, class_names, notes)
    return DatasetSource(root=root, layout="imagefolder", class_names=class_names, splits=splits, notes=notes)


def _discover_flat(root: Path, val_fraction: float, seed: int) -> DatasetSource:
    split_folders = [name for name in (*VAL_FOLDER_NAMES, "test") if (root / name).is_dir()]
    if split_folders:
        raise DataError(
            f"{root} has {', '.join(n + '/' for n in split_folders)} but no train/ folder: "
            f"put the training images in {root / 'train'}/<class name>/"
        )
    class_names = _class_folders(root)
    _require_two_classes(class_names, root)
    notes: list[str] = []
    train, val = _hold_out(_folder_split(root, class_names, class_names, notes), val_fraction, seed)
    notes.append(
        f"flat folder: split {_percent(1 - val_fraction, sign=False)}/{_percent(val_fraction, sign=False)} "
        f"per class into train/val (seed {seed})"
    )
    return DatasetSource(
        root=root, layout="flat", class_names=class_names, splits={"train": train, "val": val}, notes=notes
    )


def _discover_csv(manifest: Path, val_fraction: float, seed: int) -> DatasetSource:
    rows, has_split = _read_manifest(manifest)
    class_names = sorted({label for _, label, split in rows if split == "train"})
    _require_two_classes(class_names, manifest)
    class_index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for _, label, split in rows if label not in class_index})
    if unknown:
        raise DataError(f"{manifest}: labels in val/test rows but not in train rows: {_quoted(unknown)}")

    folder = manifest.parent
    splits: dict[str, Split] = {}
    for path, label, split in rows:
        target = splits.setdefault(split, Split([], []))
        target.items.append(os.path.normpath(os.path.join(folder, path)))
        target.labels.append(class_index[label])
    notes: list[str] = []
    if "val" not in splits:
        splits["train"], splits["val"] = _hold_out(splits["train"], val_fraction, seed)
        why = "no val rows" if has_split else "no split column"
        notes.append(
            f"CSV manifest has {why}: held out {_percent(val_fraction)} of each class for validation "
            f"(seed {seed})"
        )
    ordered = {name: splits[name] for name in ("train", "val", "test") if name in splits}
    return DatasetSource(root=manifest, layout="csv", class_names=class_names, splits=ordered, notes=notes)


def _read_manifest(manifest: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """Rows as (path, label, split), split 'train' when the CSV has no split column."""
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read CSV manifest {manifest}: {error}") from None
    if not lines or not any(cell.strip() for cell in lines[0]):
        raise DataError(f"CSV manifest {manifest} is empty: expected a header 'path,label[,split]'")
    header = [cell.strip().lower() for cell in lines[0]]
    missing = [column for column in ("path", "label") if column not in header]
    if missing:
        raise DataError(
            f"CSV manifest {manifest} lacks column(s) {_quoted(missing)}: header is {lines[0]}, "
            "expected 'path,label[,split]'"
        )
    has_split = "split" in header
    path_at, label_at = header.index("path"), header.index("label")
    split_at = header.index("split") if has_split else None
    rows = []
    for line_number, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) < len(header):
            raise DataError(f"{manifest}:{line_number}: expected {len(header)} columns, got {len(cells)}")
        path, label = cells[path_at].strip(), cells[label_at].strip()
        if not path or not label:
            raise DataError(f"{manifest}:{line_number}: empty path or label")
        split = "train"
        if split_at is not None:
            split = SPLIT_ALIASES.get(cells[split_at].strip().lower(), "")
            if not split:
                raise DataError(
                    f"{manifest}:{line_number}: split {cells[split_at]!r} is not one of train, val, test"
                )
        rows.append((path, label, split))
    if not rows:
        raise DataError(f"CSV manifest {manifest} has a header but no rows")
    if not any(split == "train" for _, _, split in rows):
        raise DataError(f"CSV manifest {manifest} has no train rows")
    return rows, has_split


def _class_folders(folder: Path) -> list[str]:
    """Sorted non-hidden sub-folder names: the class order torchvision's ImageFolder uses."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise DataError(f"cannot list {folder}: {error.strerror or error}") from None
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _require_two_classes(class_names: list[str], where: Path) -> None:
    if not class_names:
        raise DataError(f"no class folders in {where}: expected {where}/<class name>/<image files>")
    if len(class_names) == 1:
        raise DataError(
            f"found a single class '{class_names[0]}' in {where}: classification needs at least two"
        )


def _other_split_classes(folder: Path, train_classes: list[str], notes: list[str]) -> list[str]:
    """A val/test folder's classes, which must all exist in train/ (labels are train's indices)."""
    names = _class_folders(folder)
    if not names:
        raise DataError(f"no class folders in {folder}: expected {folder}/<class name>/<image files>")
    unknown = [name for name in names if name not in train_classes]
    if unknown:
        raise DataError(f"classes in {folder} that are not in train/: {_quoted(unknown)}")
    absent = [name for name in train_classes if name not in names]
    if absent:
        notes.append(f"{folder.name}/ has no folder for class(es) {_quoted(absent)}")
    return names


def _folder_split(folder: Path, folder_classes: list[str], class_names: list[str], notes: list[str]) -> Split:
    """Every non-hidden file under each class folder, labelled with the class's index in train/."""
    split = Split([], [])
    for name in folder_classes:
        files = _list_files(folder / name)
        split.items.extend(files)
        split.labels.extend([class_names.index(name)] * len(files))
    loose = [e.name for e in os.scandir(folder) if not e.name.startswith(".") and not e.is_dir()]
    if loose:
        notes.append(f"ignored {len(loose)} file(s) directly in {folder.name}/ (not inside a class folder)")
    return split


def _list_files(folder: Path) -> list[str]:
    """Absolute paths of every non-hidden non-folder entry below folder, sorted, each folder once."""
    found: list[str] = []
    visited: set[tuple[int, int]] = set()

    def visit(directory: str) -> None:
        try:
            info = os.stat(directory)
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            raise DataError(f"cannot list {directory}: {error.strerror or error}") from None
        if (info.st_dev, info.st_ino) in visited:  # a symlink loop, or two links to one folder
            return
        visited.add((info.st_dev, info.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                visit(entry.path)
            else:  # non-images and broken links too: the scan reports them rather than dropping them
                found.append(os.path.abspath(entry.path))

    visit(os.fspath(folder))
    return found


def _hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    keep, held = stratified_split(split.labels, fraction, seed)
    return split.subset(keep), split.subset(held)


def _percent(fraction: float, sign: bool = True) -> str:
    return f"{fraction * 100:.3g}" + ("%" if sign else "")


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)
