"""Finding classes and splits in each layout, scanning every file once, and the scan cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.data import scan
from resfit.data.scan import CACHE_FILE, DataReport, default_cache_dir, load_dataset, scan_source
from resfit.data.sources import discover, stratified_split
from resfit.errors import ConfigError, DataError


def write_jpeg(path: Path, seed: int = 0, size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """root/<relative class folder>/img_<i>.jpg for each entry of counts."""
    for seed, (folder, count) in enumerate(counts.items()):
        for i in range(count):
            write_jpeg(root / folder / f"img_{i:03d}.jpg", seed=seed * 1000 + i)
    return root


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def split_counts(source, split: str) -> dict[str, int]:
    counts = Counter(source.splits[split].labels)
    return {name: counts[i] for i, name in enumerate(source.class_names)}


# -- ImageFolder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_imagefolder_with_a_validation_folder(tmp_path, val_name):
    root = make_tree(
        tmp_path / "pets", {"train/dog": 3, "train/cat": 2, f"{val_name}/cat": 2, f"{val_name}/dog": 1}
    )
    source = discover(root)
    assert source.layout == "imagefolder"
    assert source.root == root
    assert source.class_names == ["cat", "dog"]  # sorted, as torchvision's ImageFolder
    assert split_counts(source, "train") == {"cat": 2, "dog": 3}
    assert split_counts(source, "val") == {"cat": 2, "dog": 1}
    assert set(source.splits) == {"train", "val"}
    assert source.splits["val"].items[0] == str(root / val_name / "cat" / "img_000.jpg")
    assert all(os.path.isabs(item) for split in source.splits.values() for item in split.items)
    assert (f"validation split read from {val_name}/" in source.notes) == (val_name != "val")


def test_imagefolder_test_split_and_label_indices_follow_train(tmp_path):
    root = make_tree(tmp_path / "d", {"train/a": 2, "train/b": 2, "train/c": 2, "val/c": 1, "test/b": 2})
    source = discover(root)
    assert source.splits["val"].labels == [2]
    assert source.splits["test"].labels == [1, 1]
    assert any("has no folder for class(es) 'a', 'b'" in note for note in source.notes)


def test_imagefolder_without_val_holds_out_per_class(tmp_path):
    root = make_tree(tmp_path / "d", {"train/a": 10, "train/b": 5})
    source = discover(root, val_fraction=0.2, seed=0)
    assert split_counts(source, "val") == {"a": 2, "b": 1}
    assert split_counts(source, "train") == {"a": 8, "b": 4}
    assert "no val/ folder: held out 20% of each class of train/ for validation (seed 0)" in source.notes


def test_files_are_walked_recursively_sorted_hidden_skipped(tmp_path):
    root = make_tree(
        tmp_path / "d", {"train/a": 2, "train/a/deeper": 1, "train/b": 2, "val/a": 1, "val/b": 1}
    )
    (root / "train" / "a" / ".DS_Store").write_text("junk")
    make_tree(root, {"train/a/.thumbnails": 3, "train/.hidden_class": 2})
    (root / "train" / "b" / "readme.txt").write_text("not an image")
    (root / "train" / "stray.jpg").write_bytes((root / "val/a/img_000.jpg").read_bytes())
    source = discover(root)
    assert source.class_names == ["a", "b"]
    names = [os.path.relpath(item, root / "train") for item in source.splits["train"].items]
    assert names == [
        "a/deeper/img_000.jpg",
        "a/img_000.jpg",
        "a/img_001.jpg",
        "b/img_000.jpg",
        "b/img_001.jpg",
        "b/readme.txt",
    ]
    assert any("ignored 1 file(s) directly in train/" in note for note in source.notes)


def test_symlink_loop_is_followed_once(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    source = discover(root)
    assert len(source.splits["train"].items) + len(source.splits["val"].items) == 4


# -- flat folders and the stratified split --------------------------------------------------------


def test_flat_folder_split_is_stratified_and_seeded(tmp_path):
    root = make_tree(tmp_path / "flat", {"big": 20, "small": 10, "pair": 2})
    first = discover(root, seed=0)
    assert first.layout == "flat"
    assert first.class_names == ["big", "pair", "small"]
    assert split_counts(first, "val") == {"big": 4, "pair": 1, "small": 2}
    assert split_counts(first, "train") == {"big": 16, "pair": 1, "small": 8}
    assert "flat folder: split 80/20 per class into train/val (seed 0)" in first.notes
    again = discover(root, seed=0)
    assert again.splits["val"].items == first.splits["val"].items
    other = discover(root, seed=1)
    assert other.splits["val"].items != first.splits["val"].items
    assert split_counts(other, "val") == split_counts(first, "val")
    assert not set(first.splits["val"].items) & set(first.splits["train"].items)
    quarter = discover(root, val_fraction=0.25)
    assert split_counts(quarter, "val") == {"big": 5, "pair": 1, "small": 3}  # 2.5 rounds up
    assert "flat folder: split 75/25 per class into train/val (seed 0)" in quarter.notes


def test_stratified_split():
    labels = [0] * 10 + [1] * 2 + [2]
    keep, held = stratified_split(labels, 0.3, seed=5)
    assert sorted(keep + held) == list(range(len(labels)))
    assert Counter(labels[i] for i in held) == {0: 3, 1: 1}  # a single-item class stays in keep
    assert stratified_split(labels, 0.3, seed=5) == (keep, held)
    assert stratified_split(labels, 0.3, seed=6) != (keep, held)
    assert keep == sorted(keep) and held == sorted(held)
    assert stratified_split(labels, 0.0, seed=0) == (list(range(13)), [])


def test_flat_folder_with_val_but_no_train_is_an_error(tmp_path):
    root = make_tree(tmp_path / "d", {"val/a": 1, "val/b": 1, "a": 1})
    with pytest.raises(DataError, match="no train/ folder"):
        discover(root)


# -- CSV manifests --------------------------------------------------------------------------------


def test_csv_with_split_column(tmp_path):
    images = make_tree(tmp_path / "imgs", {"x": 3, "y": 3})
    absolute = images / "y" / "img_002.jpg"
    (tmp_path / "labels.csv").write_text(
        "path,label,split\n"
        "imgs/x/img_000.jpg,cat,train\n"
        "imgs/x/img_001.jpg,cat,train\n"
        f"{absolute},dog,train\n"
        "imgs/y/img_000.jpg,dog,Train\n"
        "imgs/x/img_002.jpg,cat,val\n"
        "imgs/y/img_001.jpg,dog,test\n"
        "imgs/gone.jpg,dog,train\n"
    )
    source = discover(tmp_path / "labels.csv")
    assert source.layout == "csv" and source.class_names == ["cat", "dog"]
    assert source.splits["train"].items[0] == str(images / "x" / "img_000.jpg")
    assert source.splits["train"].items[2] == str(absolute)
    assert source.splits["train"].labels == [0, 0, 1, 1, 1]
    assert source.splits["val"].labels == [0] and source.splits["test"].labels == [1]

    scanned, report = load_dataset(tmp_path / "labels.csv")  # the missing file is skipped, not fatal
    assert report.skipped == [
        {"path": str(tmp_path / "imgs" / "gone.jpg"), "reason": "file not found", "split": "train"}
    ]
    assert report.class_counts == {
        "train": {"cat": 2, "dog": 2},
        "val": {"cat": 1, "dog": 0},
        "test": {"cat": 0, "dog": 1},
    }
    assert report.summary_line().startswith(
        "labels: 6 images, 2 classes (train 4, val 1, test 1); 0 converted, 1 skipped"
    )


def test_csv_without_split_column_is_split_per_class(tmp_path):
    make_tree(tmp_path, {"x": 5, "y": 5})
    lines = ["label, path"] + [f"{c},{c}/img_{i:03d}.jpg" for c in "xy" for i in range(5)]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n\n")
    source = discover(tmp_path / "all.csv", seed=3)
    assert split_counts(source, "val") == {"x": 1, "y": 1}
    assert split_counts(source, "train") == {"x": 4, "y": 4}
    assert any("no split column" in note for note in source.notes)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("file,label\na.jpg,x\n", "lacks column(s) 'path'"),
        ("path,label\n", "has a header but no rows"),
        (
            "path,label,split\na.jpg,x,train\nb.jpg,y,train\nc.jpg,x,holdout\n",
            "split 'holdout' is not one of",
        ),
        ("path,label\na.jpg,x\nb.jpg,\n", "empty path or label"),
        ("path,label\na.jpg,x\nb.jpg,x\n", "found a single class 'x'"),
        ("path,label,split\na.jpg,x,train\nb.jpg,y,train\nc.jpg,z,val\n", "not in train rows: 'z'"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        discover(tmp_path / "m.csv")
    assert "m.csv" in str(caught.value)


# -- discovery errors ---------------------------------------------------------------------------


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="dataset not found: .*nowhere"):
        discover(tmp_path / "nowhere")


def test_no_class_folders(tmp_path):
    write_jpeg(tmp_path / "d" / "loose.jpg")
    with pytest.raises(DataError, match=r"no class folders in .*d"):
        discover(tmp_path / "d")
    (tmp_path / "e" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no class folders in .*train"):
        discover(tmp_path / "e")


def test_single_class(tmp_path):
    root = make_tree(tmp_path / "d", {"train/only": 3})
    with pytest.raises(DataError, match="found a single class 'only'.*at least two"):
        discover(root)


def test_val_class_not_in_train(tmp_path):
    root = make_tree(tmp_path / "d", {"train/a": 2, "train/b": 2, "val/a": 1, "val/zebra": 1, "val/yak": 1})
    with pytest.raises(DataError, match="not in train/: 'yak', 'zebra'"):
        discover(root)


def test_bad_val_fraction(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="val_fraction"):
        discover(root, val_fraction=1.0)


def test_other_file_is_not_a_dataset(tmp_path):
    write_jpeg(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="is a file"):
        discover(tmp_path / "x.jpg")


# -- scanning ---------------------------------------------------------------------------------


def make_bad_files(folder: Path) -> dict[str, str]:
    """One file of every unusable kind; returns name -> expected start of the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture")
    whole = write_jpeg(folder / "whole.tmp", seed=99, size=(96, 64)).read_bytes()
    (folder / "whole.tmp").unlink()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    return {
        "empty.jpg": "empty file (0 bytes)",
        "text.jpg": "not an image: cannot identify image file",
        "truncated.jpg": "truncated or corrupt image data",
        "bomb.png": "too large: 20000x20000 = 400,000,000 pixels",
    }


def test_scan_skips_and_reports_every_bad_kind_without_touching_files(tmp_path):
    root = make_tree(tmp_path / "data", {"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 1})
    expected = make_bad_files(root / "train" / "a")
    Image.new("LA", (8, 8), (10, 100)).save(root / "train" / "b" / "faded.png")
    before = digest_tree(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    source, report = load_dataset(root)

    assert digest_tree(root) == before  # no byte changed, nothing added
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert all(s["split"] == "train" and os.path.isabs(s["path"]) for s in report.skipped)
    assert report.converted == [
        {"path": str(root / "train" / "b" / "faded.png"), "note": "LA composited on white"}
    ]
    assert report.class_counts == {"train": {"a": 3, "b": 4}, "val": {"a": 1, "b": 1}}
    assert all(Path(item).name not in expected for item in source.splits["train"].items)
    assert len(source.splits["train"].items) == len(source.splits["train"].labels) == 7
    assert source.read(str(root / "train" / "b" / "faded.png"))[1] == ["LA composited on white"]

    as_json = json.loads(json.dumps(report.to_dict()))
    assert {"skipped", "converted", "class_counts", "summary"} <= set(as_json)
    assert report.summary_line() == (
        "data: 9 images, 2 classes (train 7, val 2); 1 converted, 4 skipped; see data_report.json"
    )


def test_train_class_with_no_usable_image(tmp_path):
    root = make_tree(tmp_path / "d", {"train/good": 2, "val/good": 1, "val/broken": 1})
    make_bad_files(root / "train" / "broken")
    (root / "train" / "broken" / "bomb.png").unlink()  # keep the test quick
    with pytest.raises(DataError, match="'broken' .* no usable training image"):
        load_dataset(root)


def test_empty_val_split_after_scan(tmp_path):
    root = make_tree(tmp_path / "d", {"train/a": 2, "train/b": 2})
    (root / "val" / "a").mkdir(parents=True)
    (root / "val" / "a" / "bad.jpg").write_text("nope")
    with pytest.raises(DataError, match="validation split has no usable image"):
        load_dataset(root)


def test_scan_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", {"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 1})
    calls: list[str] = []
    real_check = scan.check_image

    def counting_check(path, max_pixels):
        calls.append(path)
        return real_check(path, max_pixels)

    monkeypatch.setattr(scan, "check_image", counting_check)
    cache_file = default_cache_dir() / CACHE_FILE
    assert str(default_cache_dir()) == os.environ["RESFIT_CACHE"]

    first_source, first_report = load_dataset(root)
    assert len(calls) == 8 and cache_file.is_file()
    entry = json.loads(cache_file.read_text())[str(root / "train" / "a" / "img_000.jpg")]
    assert {"size", "mtime_ns", "ok", "reason", "notes", "width", "height"} <= set(entry)

    calls.clear()
    second_source, second_report = load_dataset(root)
    assert calls == []
    assert second_report == first_report and second_source.splits == first_source.splits

    changed = root / "train" / "a" / "img_001.jpg"
    changed.write_text("now broken")
    calls.clear()
    _, report = load_dataset(root)
    assert calls == [str(changed)]
    assert report.skipped == [
        {"path": str(changed), "reason": "not an image: cannot identify image file", "split": "train"}
    ]

    same_size = root / "train" / "b" / "img_000.jpg"
    stat = same_size.stat()
    os.utime(same_size, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    calls.clear()
    load_dataset(root)
    assert calls == [str(same_size)]

    calls.clear()
    load_dataset(root, max_pixels=1_000_000)  # a different limit is a different verdict
    assert len(calls) == 8


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 3})
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / CACHE_FILE).write_text('{"half a json')
    _, report = load_dataset(root, cache_dir=cache_dir)
    assert report.skipped == []
    cached = json.loads((cache_dir / CACHE_FILE).read_text())
    assert len(cached) == 6


def test_cache_inside_the_dataset_is_refused(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 3})
    with pytest.raises(ConfigError, match="inside the dataset"):
        load_dataset(root, cache_dir=root / "cache")
    assert not (root / "cache").exists()


def test_default_cache_dir_without_env(monkeypatch):
    monkeypatch.delenv("RESFIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "resfit"


def test_progress_bar_shows_on_stderr_only_when_the_scan_is_slow(tmp_path, capsys, monkeypatch):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 3})
    scan_source(discover(root), progress=True)
    assert capsys.readouterr() == ("", "")

    real_check = scan.check_image

    def slow_check(path, max_pixels):
        time.sleep(scan.PROGRESS_DELAY_S / 4)
        return real_check(path, max_pixels)

    monkeypatch.setattr(scan, "check_image", slow_check)
    scan_source(discover(root), progress=True, cache_dir=tmp_path / "fresh-cache")
    captured = capsys.readouterr()
    assert captured.out == "" and "checking images" in captured.err


def test_report_type_is_plain_data(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 3})
    _, report = load_dataset(root)
    assert isinstance(report, DataReport)
    assert report.layout == "flat" and report.class_names == ["a", "b"]
    assert report.notes == ["flat folder: split 80/20 per class into train/val (seed 0)"]


# -- real data ----------------------------------------------------------------------------------


def test_hymenoptera(shared_dir):
    root = shared_dir / "data" / "hymenoptera"
    source, report = load_dataset(root)
    assert source.layout == "imagefolder" and source.class_names == ["ants", "bees"]
    assert report.class_counts == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    assert report.skipped == []
    gif = str(root / "train" / "ants" / "imageNotFound.gif")
    assert report.converted == [{"path": gif, "note": "palette (P) converted to RGB"}]
    image, notes = source.read(gif)
    assert image.mode == "RGB" and notes == ["palette (P) converted to RGB"]
    assert report.summary_line() == (
        "hymenoptera: 398 images, 2 classes (train 245, val 153); 1 converted, 0 skipped;"
        " see data_report.json"
    )


def test_flowers5(shared_dir):
    root = shared_dir / "data" / "flowers5"
    source, report = load_dataset(root)
    assert source.class_names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    for split in ("train", "val"):
        on_disk = {name: len(list((root / split / name).iterdir())) for name in source.class_names}
        assert report.class_counts[split] == on_disk
    assert report.skipped == [] and report.converted == []
