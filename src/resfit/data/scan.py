"""Check every file of a dataset once, up front, and remember the verdicts.

A corrupt file found at epoch 7 wastes a run; one found before training is a line in a report.
``scan_source`` decodes each file once (see images.check_image), drops the unusable ones with their
reason, records every conversion, and keeps the verdicts in a cache keyed by absolute path, size
and modification time, so the next run over the same folder costs one stat per file (a row of a
`datasets` dataset is keyed by a digest of its bytes instead). The cache
lives under $RESFIT_CACHE (or ~/.cache/resfit), never inside the dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from resfit.data.exclusions import read_exclusions, resolve_exclusions
from resfit.data.images import DEFAULT_MAX_PIXELS, ImageCheck, check_image
from resfit.data.sources import discover
from resfit.data.splits import SPLIT_SEED, VAL_FRACTION, DatasetSource, Split
from resfit.errors import ConfigError, DataError, ImageReadError
from resfit.fileio import atomic_write_json

CACHE_FILE = "scan-v1.json"
REPORT_FILE = "data_report.json"
_CACHE_FIELDS = ("ok", "reason", "notes", "width", "height")  # the verdict; its key fields are checked apart
PROGRESS_DELAY_S = 0.5  # a cached or small scan finishes before this and prints nothing


@dataclass
class DataReport:
    """What the scan found: classes, usable counts per split, and every skipped or converted file."""

    layout: str
    class_names: list[str]
    skipped: list[dict]  # {"path", "reason", "split"}
    converted: list[dict]  # {"path", "note"}, one per file, notes joined with "; "
    class_counts: dict[str, dict[str, int]]  # split -> class name -> usable images
    notes: list[str]
    name: str = ""  # the dataset's folder (or file) name, for the summary line
    excluded: list[dict] = field(default_factory=list)  # {"path", "split"}: left out by --exclude-from

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "summary": self.summary_line(report_file=None)}

    def summary_line(self, report_file: str | None = REPORT_FILE) -> str:
        """One line for the console, e.g. 'hymenoptera: 398 images, 2 classes (train 245, val 153); ...'."""
        per_split = {split: sum(counts.values()) for split, counts in self.class_counts.items()}
        splits = ", ".join(f"{split} {count}" for split, count in per_split.items())
        line = (
            f"{self.name or self.layout}: {sum(per_split.values())} images, {len(self.class_names)} classes "
            f"({splits}); {len(self.converted)} converted, {len(self.skipped)} skipped"
        )
        if self.excluded:
            line += f", {len(self.excluded)} excluded"
        return f"{line}; see {report_file}" if report_file else line


def default_cache_dir() -> Path:
    """$RESFIT_CACHE if set, else ~/.cache/resfit."""
    configured = os.environ.get("RESFIT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "resfit"


def load_dataset(
    data: str | os.PathLike,
    *,
    val_fraction: float = VAL_FRACTION,
    seed: int = SPLIT_SEED,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_dir: Path | None = None,
    progress: bool = False,
    exclude_from: str | os.PathLike | None = None,
) -> tuple[DatasetSource, DataReport]:
    """Discover the dataset's layout and splits, then scan every file: the one call training makes.

    ``exclude_from``: an audit.json or a list of paths to leave out (see data/exclusions.py).
    """
    source = discover(data, val_fraction=val_fraction, seed=seed)
    excluded: list[dict] = []
    if exclude_from is not None:
        source, excluded = _exclude(source, exclude_from)
    scanned, report = scan_source(source, max_pixels=max_pixels, cache_dir=cache_dir, progress=progress)
    report.excluded = excluded
    return scanned, report


def _exclude(source: DatasetSource, exclude_from: str | os.PathLike) -> tuple[DatasetSource, list[dict]]:
    """``source`` without the listed files, what was left out, and a note when some listed paths are not here."""
    entries = read_exclusions(exclude_from)
    base = source.root.parent if source.root.is_file() else source.root
    listed = resolve_exclusions(entries, base)
    excluded, splits, found = [], {}, set()
    for name, split in source.splits.items():
        keep = [i for i, item in enumerate(split.items) if item not in listed]
        for i in sorted(set(range(len(split.items))) - set(keep)):
            excluded.append({"path": split.items[i], "split": name})
            found.add(split.items[i])
        splits[name] = split.subset(keep)
    note = f"excluded {len(excluded)} file(s) listed in {exclude_from}"
    if len(found) < len(listed):
        note += f" ({len(listed) - len(found)} of its {len(listed)} paths are not in this dataset)"
    return dataclasses.replace(source, splits=splits, notes=[*source.notes, note]), excluded


def scan_source(
    source: DatasetSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[DatasetSource, DataReport]:
    """A new DatasetSource holding only usable files, and the report of what was dropped or converted."""
    skipped: list[dict] = []
    converted: list[dict] = []
    if source.layout == "cifar10":  # arrays, not files: every item is a valid 32x32 RGB image
        checks: dict[str, ImageCheck] = {}
        scan_notes: list[str] = []
    elif (
        source.layout == "shards"
    ):  # scanned when written: only accepted files are in them, verdicts in the index
        checks, scan_notes = {}, []
        skipped, converted = source.arrow.skipped, source.arrow.converted
    else:
        checks, scan_notes = _check_files(source, max_pixels, cache_dir, progress)

    splits: dict[str, Split] = {}
    for split_name, split in source.splits.items():
        usable = []
        for index, item in enumerate(split.items):
            check = checks.get(item)
            if check is None or check.ok:
                usable.append(index)
            else:
                skipped.append({"path": item, "reason": check.reason, "split": split_name})
        splits[split_name] = split.subset(usable)
    converted += [
        {"path": item, "note": "; ".join(c.notes)} for item, c in checks.items() if c.ok and c.notes
    ]
    class_counts = {name: _class_counts(split, source.class_names) for name, split in splits.items()}
    _require_usable(source, splits, class_counts, skipped)

    notes = [*source.notes, *scan_notes]
    scanned = dataclasses.replace(source, splits=splits, notes=notes, max_pixels=max_pixels)
    report = DataReport(
        layout=source.layout,
        class_names=list(source.class_names),
        skipped=skipped,
        converted=converted,
        class_counts=class_counts,
        notes=notes,
        name=_dataset_name(source),
    )
    return scanned, report


def _check_files(
    source: DatasetSource, max_pixels: int, cache_dir: Path | None, progress: bool
) -> tuple[dict[str, ImageCheck], list[str]]:
    """One ImageCheck per distinct file of every split, from the cache where size and mtime still match."""
    cache_path = _cache_path(cache_dir, source.root)
    cache = _read_cache(cache_path)
    items = list(dict.fromkeys(item for split in source.splits.values() for item in split.items))
    checks: dict[str, ImageCheck] = {}
    changed = False
    bar = tqdm(
        total=len(items),
        desc="checking images",
        unit="img",
        file=sys.stderr,
        disable=not progress,
        delay=PROGRESS_DELAY_S,
    )
    with bar:
        for item in items:
            bar.update()
            key, failure = _verdict_key(source, item, max_pixels)
            if failure is not None:
                checks[item] = failure
                continue
            check = _cached_check(cache.get(item), key)
            if check is None:
                check = (
                    check_image(item, max_pixels)
                    if source.arrow is None
                    else source.arrow.check(item, max_pixels)
                )
                cache[item] = {**key, **_check_to_json(check)}
                changed = True
            checks[item] = check
    notes = []
    if changed:
        try:
            atomic_write_json(cache_path, cache)
        except OSError as error:  # the cache only saves time: say so and carry on
            notes.append(f"scan cache not saved to {cache_path}: {error.strerror or error}")
    return checks, notes


def _verdict_key(source: DatasetSource, item: str, max_pixels: int) -> tuple[dict, ImageCheck | None]:
    """What a cached verdict must still match: a file's size and mtime, or a dataset row's bytes digest.

    Or, where even that cannot be read, the failed check itself."""
    if source.arrow is not None:
        try:
            return {"digest": source.arrow.digest(item), "max_pixels": max_pixels}, None
        except ImageReadError as error:
            return {}, ImageCheck(ok=False, reason=error.reason, notes=())
    try:
        info = os.stat(item)
    except OSError as error:
        reason = "file not found" if isinstance(error, FileNotFoundError) else f"cannot read file: {error}"
        return {}, ImageCheck(ok=False, reason=reason, notes=())
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "max_pixels": max_pixels}, None


def _cache_path(cache_dir: Path | None, dataset_root: Path) -> Path:
    folder = Path(os.path.abspath(cache_dir if cache_dir is not None else default_cache_dir()))
    # A CSV manifest's folder may well be the home folder that holds ~/.cache: only folders count.
    if dataset_root.is_dir() and folder.is_relative_to(dataset_root):
        raise ConfigError(f"scan cache folder {folder} is inside the dataset {dataset_root}: choose another")
    return folder / CACHE_FILE


def _read_cache(path: Path) -> dict[str, dict]:
    """The cached verdicts, or an empty mapping when the file is missing or unreadable (it is rewritten)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cached_check(entry: object, key: dict) -> ImageCheck | None:
    if not isinstance(entry, dict) or any(entry.get(name) != value for name, value in key.items()):
        return None
    if not all(name in entry for name in _CACHE_FIELDS) or not isinstance(entry["notes"], list):
        return None
    return ImageCheck(
        ok=bool(entry["ok"]),
        reason=entry["reason"],
        notes=tuple(entry["notes"]),
        width=entry["width"],
        height=entry["height"],
    )


def _check_to_json(check: ImageCheck) -> dict:
    return {
        "ok": check.ok,
        "reason": check.reason,
        "notes": list(check.notes),
        "width": check.width,
        "height": check.height,
    }


def _class_counts(split: Split, class_names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(class_names, 0)
    for label in split.labels:
        counts[class_names[label]] += 1
    return counts


def _require_usable(
    source: DatasetSource, splits: dict[str, Split], class_counts: dict[str, dict], skipped: list[dict]
) -> None:
    empty = [name for name, count in class_counts["train"].items() if count == 0]
    if empty:
        first_reason = next((s for s in skipped if s["split"] == "train"), None)
        why = f" (e.g. {first_reason['path']}: {first_reason['reason']})" if first_reason else ""
        raise DataError(
            f"class(es) {', '.join(repr(name) for name in empty)} of {source.root} have no usable "
            f"training image{why}"
        )
    if not splits["val"].items:
        raise DataError(f"{source.root}: the validation split has no usable image")


def _dataset_name(source: DatasetSource) -> str:
    if source.layout == "cifar10":
        return "cifar10"
    return source.root.stem if source.root.is_file() else source.root.name
