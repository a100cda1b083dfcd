"""DATA as a Hugging Face `datasets` dataset: saved with save_to_disk, or parquet files as the Hub writes them.

Built with the real `datasets` library from small synthetic images; trained through the CLI.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.cli import main
from resfit.data.scan import load_dataset
from resfit.data.sources import discover
from resfit.errors import DataError

datasets = pytest.importorskip("datasets")

NAMES = ["blue", "red"]
CORRUPT = b"\x89PNG\r\n\x1a\n but the rest is not a PNG"
TINY_TRAIN = ["--model", "resnet18", "--weights", "none", "--epochs", "0", "--img-size", "32"]
TINY_TRAIN += ["--batch-size", "8", "--workers", "0", "--quiet"]


def png_rows(per_class: int, seed: int) -> tuple[list[dict], list[int]]:
    """Encoded red-ish and blue-ish images (as conftest's tiny tree), as `datasets` Image cells."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(2):
        for _ in range(per_class):
            pixels = rng.integers(0, 120, size=(40, 40, 3), dtype=np.uint8)
            pixels[..., 2 - 2 * label] += 120
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(label)
    return images, labels


def class_label_split(per_class: int, seed: int, corrupt: bool = False):
    images, labels = png_rows(per_class, seed)
    if corrupt:
        images.append({"bytes": CORRUPT, "path": None})
        labels.append(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def saved_dict(module_tmp) -> Path:
    """A DatasetDict (train with one corrupt row, validation, test) written by save_to_disk."""
    root = module_tmp("beans") / "beans-like"
    parts = {
        "train": class_label_split(12, 0, corrupt=True),
        "validation": class_label_split(6, 1),
        "test": class_label_split(4, 2),
    }
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def parquet_folder(module_tmp) -> Path:
    """String labels (no ClassLabel) in data/train-*.parquet and data/test-*.parquet, as the Hub lays them out."""
    root = module_tmp("hub") / "hub-parquet"
    for split, per_class, seed in (("train", 12, 3), ("test", 4, 4)):
        images, labels = png_rows(per_class, seed)
        features = datasets.Features({"img": datasets.Image(), "labels": datasets.Value("string")})
        rows = {"img": images, "labels": [NAMES[label] for label in labels]}
        dataset = datasets.Dataset.from_dict(rows, features=features)
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_train_on_a_saved_dataset_dict_through_the_cli(saved_dict, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(saved_dict), *TINY_TRAIN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 skipped" in printed, printed
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] == NAMES and meta["data"]["layout"] == "hf-disk"
    report = json.loads((out / "data_report.json").read_text())
    assert report["class_counts"] == {
        "train": {"blue": 12, "red": 12},
        "val": {"blue": 6, "red": 6},
        "test": {"blue": 4, "red": 4},
    }
    [skipped] = report["skipped"]
    assert skipped["path"] == f"{saved_dict}::train::24" and skipped["split"] == "train"
    assert "corrupt" in skipped["reason"] or "not an image" in skipped["reason"], skipped


def test_the_scan_verdicts_of_rows_are_cached_by_their_bytes(saved_dict):
    first = load_dataset(saved_dict)[1]
    cache = json.loads((Path(os.environ["RESFIT_CACHE"]) / "scan-v1.json").read_text())
    entry = cache[f"{saved_dict}::train::24"]
    assert entry["ok"] is False and len(entry["digest"]) == 40
    again = load_dataset(saved_dict)[1]
    assert first.skipped == again.skipped and first.class_counts == again.class_counts


def test_train_on_hub_parquet_files_with_string_labels(parquet_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(parquet_folder), *TINY_TRAIN, "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] == NAMES and meta["data"]["layout"] == "parquet"
    report = json.loads((out / "data_report.json").read_text())
    # no validation file: 20% of each class of train held out, as for a single folder
    assert report["class_counts"]["val"] == {"blue": 2, "red": 2}
    assert report["class_counts"]["test"] == {"blue": 4, "red": 4}
    assert any("image column 'img', label column 'labels'" in note for note in report["notes"])


def test_a_single_saved_dataset_gets_the_seeded_stratified_split(tmp_path):
    root = tmp_path / "single"
    class_label_split(10, 5).save_to_disk(str(root))
    source = discover(root, val_fraction=0.2, seed=0)
    assert source.layout == "hf-disk" and source.class_names == NAMES
    assert sorted(source.splits["val"].labels) == [0, 0, 1, 1]
    assert len(source.splits["train"].items) == 16
    assert discover(root, seed=0).splits == source.splits  # the same seed, the same split
    image, notes = source.read(source.splits["val"].items[0])
    assert image.mode == "RGB" and image.size == (40, 40) and notes == []


def test_integer_labels_without_names_become_numbered_classes(tmp_path):
    images, labels = png_rows(3, 6)
    path = tmp_path / "numbers.parquet"
    datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column(
        "image", datasets.Image()
    ).to_parquet(str(path))
    source = discover(path)
    assert source.layout == "parquet" and source.class_names == ["0", "1"]


def test_rows_without_a_label_are_left_out_with_a_note(tmp_path):
    images, labels = png_rows(4, 7)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    unlabelled = datasets.Dataset.from_dict({"image": images, "label": [-1] * len(labels)}, features=features)
    root = tmp_path / "with-unlabelled-test"
    datasets.DatasetDict(train=class_label_split(4, 8), test=unlabelled).save_to_disk(str(root))
    source = discover(root)
    assert "test" not in source.splits
    assert any("8 row(s) without a label" in note for note in source.notes)


def test_a_dataset_without_a_label_column_is_a_one_line_data_error(tmp_path, capsys):
    images, _ = png_rows(2, 9)
    root = tmp_path / "no-labels"
    datasets.Dataset.from_dict({"image": images, "caption": ["x"] * len(images)}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(root))
    with pytest.raises(DataError, match="no label column"):
        discover(root)
    assert main(["scan", str(root)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("resfit: error:") and "'caption'" in err[-1]
