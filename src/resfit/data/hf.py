"""Read a Hugging Face `datasets` dataset as DATA: one saved with ``save_to_disk``, or a folder of parquet files.

Both hold an image column (the ``Image`` feature: encoded bytes, or a path) and a label column. The
image column is the one with the ``Image`` feature, else the one named image/img; the label column is
the ``ClassLabel`` one, else the one named label/labels. Class names come from the ClassLabel's names,
or are the sorted strings of a string column (from its train rows, as a CSV manifest's), or "0".."N-1"
for plain integers. Splits are the dataset's own (train, validation/val/valid, test); any other split is
ignored with a note, rows without a label (ClassLabel's -1) are dropped with a note, and where there
is no validation split sources.py holds one out as for a single folder.

`datasets` is an optional dependency (``pip install 'resfit[hf]'``), imported only here and only when
the data is one of these layouts. Parquet files are read into memory (image and label columns only);
a saved dataset is memory-mapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .arrow_images import ArrowImages, row_item

SPLIT_ROLES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels")
UNSPLIT = "data"  # the table name of rows whose split the data does not say
_PARQUET_GLOBS = ("*.parquet", "*/*.parquet", "*/*/*.parquet")  # flat, data/train-*, default/train/0000


@dataclass
class ArrowDataset:
    """What the dataset holds, in resfit's terms: class names, rows per split role, and the image reader."""

    layout: str  # "hf-disk" | "parquet"
    class_names: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # "train" | "val" | "test" -> (items, labels)
    notes: list[str]
    images: ArrowImages


def is_saved_dataset(root: Path) -> bool:
    """A folder `datasets` wrote with save_to_disk: a DatasetDict, or a single Dataset."""
    return root.is_dir() and (
        (root / "dataset_dict.json").is_file()
        or ((root / "state.json").is_file() and (root / "dataset_info.json").is_file())
    )


def parquet_files(root: Path) -> list[Path]:
    """The parquet files that make up ``root``: itself, or those up to three folders down, sorted."""
    if root.is_file():
        return [root] if root.suffix.lower() == ".parquet" else []
    if not root.is_dir():
        return []
    found = {path for pattern in _PARQUET_GLOBS for path in root.glob(pattern) if path.is_file()}
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def read_arrow_dataset(root: Path) -> ArrowDataset:
    """Columns, class names and split rows of a saved dataset or parquet folder; raises DataError."""
    datasets = _import_datasets(root)
    if is_saved_dataset(root):
        layout, (tables, features) = "hf-disk", _load_saved(datasets, root)
        what = "Hugging Face dataset (save_to_disk)"
    else:
        layout, (tables, features) = "parquet", _load_parquet(datasets, root)
        what = f"parquet ({sum(len(t) for t in tables.values())} rows)"
    image_column = _pick_column(root, features, "image", lambda f: isinstance(f, datasets.Image), IMAGE_NAMES)
    label_column = _pick_column(
        root, features, "label", lambda f: isinstance(f, datasets.ClassLabel), LABEL_NAMES
    )
    roles, ignored = _split_roles(root, tables)
    labels = {
        name: tables[name].column(label_column).to_pylist() for names in roles.values() for name in names
    }
    class_names, indices = _class_names(root, features[label_column], label_column, labels, roles["train"])
    splits: dict[str, tuple[list[str], list[int]]] = {}
    notes = [f"{what}: image column '{image_column}', label column '{label_column}'"]
    unlabelled = 0
    for role, names in roles.items():
        items, targets = [], []
        for name in names:
            for row, index in enumerate(indices[name]):
                if index is None:
                    unlabelled += 1
                    continue
                items.append(row_item(root, name, row))
                targets.append(index)
        if items:
            splits[role] = (items, targets)
        elif role != "train":
            notes.append(f"split {', '.join(names)} has no labelled row: not used")
    if "train" not in splits:
        raise DataError(f"{root}: the train split has no labelled row")
    if unlabelled:
        notes.append(f"{unlabelled} row(s) without a label left out")
    if ignored:
        notes.append(f"split(s) {', '.join(ignored)} ignored (resfit uses train, validation and test)")
    images = ArrowImages(
        root, image_column, {name: tables[name] for names in roles.values() for name in names}
    )
    return ArrowDataset(layout, class_names, splits, notes, images)


def _import_datasets(root: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{root} is a Hugging Face dataset: reading it needs the datasets package "
            "(pip install 'resfit[hf]')"
        ) from None
    return datasets


def _load_saved(datasets, root: Path) -> tuple[dict[str, Any], Any]:
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as error:  # datasets raises many types for a damaged folder; one clear line here
        raise DataError(f"cannot load {root} with datasets.load_from_disk: {error}") from None
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {UNSPLIT: loaded}
    if not parts:
        raise DataError(f"{root}: the saved DatasetDict has no split")
    features = next(iter(parts.values())).features
    return {name: part.data for name, part in parts.items()}, features


def _load_parquet(datasets, root: Path) -> tuple[dict[str, Any], Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(root)
    by_table: dict[str, list[Path]] = {}
    for path in files:
        by_table.setdefault(_parquet_table(root, path), []).append(path)
    try:
        features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        image = _pick_column(root, features, "image", lambda f: isinstance(f, datasets.Image), IMAGE_NAMES)
        label = _pick_column(
            root, features, "label", lambda f: isinstance(f, datasets.ClassLabel), LABEL_NAMES
        )
        tables = {
            name: pa.concat_tables(pq.read_table(path, columns=[image, label]) for path in paths)
            for name, paths in by_table.items()
        }
    except (OSError, pa.ArrowException, ValueError, KeyError) as error:
        raise DataError(f"cannot read the parquet files of {root}: {error}") from None
    return tables, features


def _parquet_table(root: Path, path: Path) -> str:
    """The split a parquet file belongs to, from its name or folder (train-00000-of-00002.parquet,
    data/validation-0.parquet, default/test/0000.parquet), else UNSPLIT."""
    parts = [path.stem, *reversed(path.relative_to(root).parent.parts)] if root.is_dir() else [path.stem]
    for part in parts:
        word = re.match(r"[a-z]+", part.lower())
        if word and word.group() in SPLIT_ROLES:
            return word.group()
    return UNSPLIT


def _pick_column(root: Path, features, kind: str, has_feature, names: tuple[str, ...]) -> str:
    """The one column with the feature type, or of the usual names; a DataError that lists them otherwise."""
    typed = [name for name, feature in features.items() if has_feature(feature)]
    named = [name for name in features if name.lower() in names]
    candidates = typed or named
    if len(candidates) > 1:
        preferred = [name for name in candidates if name.lower() in names]
        candidates = preferred if len(preferred) == 1 else candidates
    if len(candidates) == 1:
        return candidates[0]
    columns = ", ".join(f"'{name}'" for name in features)
    expected = "the Image feature" if kind == "image" else "a ClassLabel feature"
    if not candidates:
        raise DataError(
            f"{root}: no {kind} column (expected {expected} or a column named {' or '.join(names)}); "
            f"columns are {columns}"
        )
    raise DataError(
        f"{root}: several {kind} columns ({', '.join(candidates)}) and none named '{names[0]}': "
        f"rename the one to use to '{names[0]}'"
    )


def _split_roles(root: Path, tables: dict[str, Any]) -> tuple[dict[str, list[str]], list[str]]:
    """Table names per role (train first) and the tables no role takes; a lone unsplit table is train."""
    roles: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    ignored = []
    for name in tables:
        role = "train" if name == UNSPLIT and len(tables) == 1 else SPLIT_ROLES.get(name.lower())
        if role is None:
            ignored.append(name)
        else:
            roles[role].append(name)
    if not roles["train"]:
        raise DataError(f"{root} has no train split (its splits: {', '.join(tables)})")
    return {role: names for role, names in roles.items() if names}, ignored


def _class_names(
    root: Path, feature, column: str, labels: dict[str, list], train_tables: list[str]
) -> tuple[list[str], dict[str, list[int | None]]]:
    """Class names, and each table's labels as class indices (None: the row has no label)."""
    values = [value for name in labels for value in labels[name] if value is not None]
    if hasattr(feature, "names") and hasattr(feature, "num_classes"):  # ClassLabel
        names = list(feature.names)
        lookup = {i: i for i in range(len(names))}
    elif all(isinstance(value, str) for value in values):
        names = sorted({value for name in train_tables for value in labels[name] if value is not None})
        lookup = {value: i for i, value in enumerate(names)}
        unknown = sorted({value for value in values if value not in lookup})
        if unknown:
            shown = ", ".join(f"'{value}'" for value in unknown[:10])
            raise DataError(f"{root}: labels in validation/test rows but not in train rows: {shown}")
    elif all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        if any(value < 0 for value in values):
            raise DataError(f"{root}: label column '{column}' holds negative integers and no class names")
        names = [str(i) for i in range(max(values, default=-1) + 1)]
        lookup = {i: i for i in range(len(names))}
    else:
        raise DataError(f"{root}: label column '{column}' must hold class names or integers")
    if len(names) < 2:
        raise DataError(
            f"{root}: label column '{column}' has {len(names)} class(es): classification needs two"
        )
    indices = {name: [lookup.get(value) for value in column_values] for name, column_values in labels.items()}
    return names, indices
