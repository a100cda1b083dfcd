"""``resfit audit DATA``: duplicates, leakage, label conflicts, likely label errors, outliers, class counts.

The hash-based part needs no model (``features=False``, or weights 'none'); the feature-based part uses
the same backbone and weights train would. Nothing in the dataset is ever moved or rewritten: the audit
writes ``audit.json`` (with a proposed ``exclude`` list to review, for ``train --exclude-from``) and a
contact sheet of the worst cases.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..data.duplicates import NEAR_DISTANCE, Copy, DuplicateGroup, dataset_copies, find_duplicates
from ..data.hashes import hash_items
from ..data.scan import load_dataset
from ..data.splits import SPLIT_SEED, VAL_FRACTION
from ..errors import ConfigError
from ..fileio import atomic_write_json
from ..hardware import PRECISION_HELP, PRECISIONS
from ..models import check_architecture, load_pretrained
from ..settings import check_choices, setting
from ..version import __version__
from .sheet import Tile, short_path, write_contact_sheet

AUDIT_FILE = "audit.json"
SHEET_FILE = "audit.png"


@dataclass
class AuditConfig:
    data: str = ""  # the command's positional DATA
    out: str | None = setting(None, help="output folder (default runs/audit-<timestamp>)")
    model: str = setting("resnet50", help="backbone for the feature-based checks")
    weights: str = setting(
        "imagenet",
        help="as train: imagenet, a state-dict FILE, or none (then only the hash-based checks run)",
    )
    features: bool = setting(
        True,
        negate="--no-features",
        help="hash-based checks only (no model): copies, leakage, label conflicts",
    )
    img_size: int | None = setting(
        None, help="feature resolution (default: what the weights were trained at)"
    )
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N")
    precision: str = setting("auto", choices=PRECISIONS, help=PRECISION_HELP)
    near_distance: int = setting(
        NEAR_DISTANCE, help="perceptual-hash bits (of 64) within which two images are the same picture"
    )
    similarity: float = setting(  # measured on flowers5
        0.98, help="cosine of standardised backbone features at or above which two images look alike"
    )
    outlier_mads: float = setting(
        3.0, help="an outlier is this many MADs above the median distance to its nearest neighbours"
    )
    top: int = setting(24, help="cases per section on the contact sheet")
    seed: int = setting(SPLIT_SEED, help="seed of the held-out split, as train's")
    val_fraction: float = setting(VAL_FRACTION, help="held out when there is no val split, as train")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no dataset given")
        check_architecture(self.model)
        check_choices(self)
        checks = [
            (0 <= self.near_distance <= 32, f"near-distance must be in 0..32 bits, got {self.near_distance}"),
            (0 < self.similarity <= 1, f"similarity must be in (0, 1], got {self.similarity}"),
            (self.outlier_mads > 0, f"outlier-mads must be > 0, got {self.outlier_mads}"),
            (self.top >= 1, f"top must be >= 1, got {self.top}"),
            (self.img_size is None or self.img_size >= 32, f"img-size must be >= 32, got {self.img_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class AuditReport:
    dataset: str
    root: str
    class_names: list[str]
    class_counts: dict[str, dict[str, int]]
    duplicates: list[dict]
    label_issues: list[dict]
    outliers: list[dict]
    exclude: list[str]  # proposed: review, edit, then `train --exclude-from audit.json`
    features: dict  # what the feature-based part used, or why it did not run
    counts: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""
    contact_sheet: str | None = None  # file name in out_dir; None when there was nothing to show
    seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        c = self.counts
        lines = [
            f"{self.dataset}: {c['images']} images; {c['duplicate_groups']} sets of copies "
            f"({c['exact_groups']} exact, {c['near_groups']} near)",
            f"  label conflicts (one picture, several classes): {c['cross_class_groups']} "
            f"({c['cross_class_files']} files)",
            f"  leakage (val/test images with a copy in another split): {c['leaked_images']}",
            f"  copies inside one class: {c['within_class_groups']}",
        ]
        if self.features.get("used"):
            lines += [
                f"  likely label errors (confident learning, out-of-fold probe accuracy "
                f"{self.features['oof_accuracy']:.3f}): {c['label_issues']}",
                f"  outliers: {c['outliers']}",
            ]
        else:
            lines.append(f"  no feature-based checks: {self.features.get('reason')}")
        lines.append(f"  proposed exclusions: {len(self.exclude)} files (review the 'exclude' list)")
        return lines

    def to_dict(self) -> dict:
        return {
            "resfit_version": __version__,
            "created": datetime.now().isoformat(timespec="seconds"),
            **asdict(self),
        }


def audit(config: AuditConfig, say: Callable[[str], None] | None = None) -> AuditReport:
    """Audit ``config.data``, write audit.json and the contact sheet into the output folder, return the report."""
    say = say or (lambda message: print(message, flush=True))
    config.validate()
    started = time.perf_counter()
    source, data_report = load_dataset(
        config.data, val_fraction=config.val_fraction, seed=config.seed, progress=True
    )
    root = source.root if source.root.is_dir() else source.root.parent
    copies = dataset_copies(source)
    hashes = hash_items(source, [c.item for c in copies])
    labels = np.array([c.label for c in copies], np.int64)

    findings, features_info = None, {"used": False}
    pretrained = None
    if not config.features:
        features_info["reason"] = "--no-features"
    else:
        pretrained = load_pretrained(config.model, config.weights)
        if pretrained.kind == "none":
            features_info["reason"] = "weights 'none' (random features say nothing)"
    if pretrained is not None and pretrained.kind != "none":
        from .features import dataset_features, feature_findings, resolve_feature_runtime

        runtime = resolve_feature_runtime(config.device, config.precision)
        say(f"features: {config.model}, {pretrained.description}, {runtime.describe()}")
        features, preprocessing = dataset_features(
            source, copies, config.model, pretrained, config.img_size, runtime, say
        )
        say("fitting the out-of-fold probe and finding label issues...")
        findings = feature_findings(
            features, labels, len(source.class_names), config.similarity, config.outlier_mads, config.seed
        )
        features_info = {
            "used": True,
            "model": config.model,
            "weights": pretrained.description,
            "preprocessing": preprocessing.to_dict(),
            "precision": runtime.precision,
            "oof_accuracy": findings.oof_accuracy,
            "similarity_threshold": config.similarity,
            "outlier_mads": config.outlier_mads,
        }
    groups = find_duplicates(copies, hashes, config.near_distance, findings.similar_pairs if findings else ())

    def where(copy: Copy) -> dict:
        return {
            "path": _relative(copy.item, root),
            "class": source.class_names[copy.label],
            "split": copy.split,
        }

    duplicates = [_group_dict(g, where) for g in groups]
    label_issues = []
    outliers = []
    if findings is not None:
        label_issues = [
            {**where(copies[e["index"]]), "suggested": source.class_names[e["suggested"]], **_rounded(e)}
            for e in findings.label_issues
        ]
        outliers = [{**where(copies[e["index"]]), "score": round(e["score"], 4)} for e in findings.outliers]
    exclude = sorted({_relative(c.item, root) for g in groups for c in g.proposed_exclusions()})
    cross = [g for g in groups if g.cross_class]
    counts = {
        "images": len(copies),
        "duplicate_groups": len(groups),
        "exact_groups": sum(g.match == "exact" for g in groups),
        "near_groups": sum(g.match == "near" for g in groups),
        "cross_class_groups": len(cross),
        "cross_class_files": sum(len(g.copies) for g in cross),
        "leaked_images": sum(len(g.leaked()) for g in groups),
        "leakage_groups": sum(g.leakage for g in groups),
        "within_class_groups": sum(not g.cross_class for g in groups),
        "label_issues": len(label_issues),
        "outliers": len(outliers),
    }
    out = (
        Path(config.out) if config.out else Path("runs") / f"audit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    report = AuditReport(
        dataset=data_report.name,
        root=str(root),
        class_names=list(source.class_names),
        class_counts=data_report.class_counts,
        duplicates=duplicates,
        label_issues=label_issues,
        outliers=outliers,
        exclude=exclude,
        features=features_info,
        counts=counts,
        out_dir=str(out),
    )
    sections = _sheet_sections(groups, findings, copies, source, root, config.top)
    out.mkdir(parents=True, exist_ok=True)
    if write_contact_sheet(source, sections, out / SHEET_FILE):
        report.contact_sheet = SHEET_FILE
    report.seconds = round(time.perf_counter() - started, 1)
    atomic_write_json(out / AUDIT_FILE, report.to_dict())
    return report


def _group_dict(group: DuplicateGroup, where: Callable[[Copy], dict]) -> dict:
    entry = {
        "match": group.match,
        "kinds": group.kinds(),
        "evidence": group.evidence,
        "phash_distance": group.distance,
        "copies": [where(c) for c in group.copies],
    }
    if group.similarity is not None:
        entry["feature_cosine"] = round(group.similarity, 4)
    return entry


def _rounded(entry: dict) -> dict:
    return {"p_given": round(entry["p_given"], 4), "p_suggested": round(entry["p_suggested"], 4)}


def _relative(item: str, root: Path) -> str:
    try:
        return os.path.relpath(item, root) if os.path.isabs(item) else item
    except ValueError:  # another drive on Windows
        return item


def _sheet_sections(groups, findings, copies, source, root, top) -> list[tuple[str, list[Tile]]]:
    names = source.class_names

    def caption(copy: Copy, reason: str) -> tuple[str, str, str]:
        return (f"{names[copy.label]} / {copy.split}", short_path(copy.item, root), reason)

    def copies_tiles(selected: list[DuplicateGroup]) -> list[Tile]:
        tiles = []
        for g in selected[:top]:
            reason = "identical bytes" if g.match == "exact" else _near_reason(g)
            tiles += [Tile(c.item, caption(c, reason), group_start=n == 0) for n, c in enumerate(g.copies)]
        return tiles

    sections = [
        (
            "Label conflicts: one picture under several classes",
            copies_tiles([g for g in groups if g.cross_class]),
        ),
        (
            "Leakage: copies in train and val/test",
            copies_tiles([g for g in groups if g.leakage and not g.cross_class]),
        ),
        (
            "Copies inside one class and split",
            copies_tiles([g for g in groups if not g.leakage and not g.cross_class]),
        ),
    ]
    if findings is not None:
        issues = [
            Tile(
                copies[e["index"]].item,
                caption(copies[e["index"]], f"-> {names[e['suggested']]} {e['p_suggested']:.2f}"),
            )
            for e in findings.label_issues[:top]
        ]
        outliers = [
            Tile(copies[e["index"]].item, caption(copies[e["index"]], f"outlier {e['score']:.3f}"))
            for e in findings.outliers[:top]
        ]
        sections += [
            ("Likely label errors (given label; the probe's class and probability)", issues),
            ("Outliers: far from every other image", outliers),
        ]
    return sections


def _near_reason(group: DuplicateGroup) -> str:
    parts = []
    if "phash" in group.evidence:
        parts.append(f"phash {group.distance}")
    if group.similarity is not None:
        parts.append(f"cos {group.similarity:.3f}")
    return "near: " + ", ".join(parts) if parts else "near"
