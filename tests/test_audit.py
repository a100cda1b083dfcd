"""The data audit on a small real subset of flowers5 that holds its known copies, and train's use of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from resfit.audit import AuditConfig, audit
from resfit.cli import main
from resfit.data.scan import load_dataset
from resfit.models import build_model

# Known copies in flowers5 (MANIFEST.sha256): the same photo as rose and as tulip (once across splits),
# and one sunflower photo twice in train, another in train and val under two names.
CONFLICT_ACROSS_SPLITS = ("train/rose/17291930305_79deae6a90_n.jpg", "val/tulip/17291930305_79deae6a90_n.jpg")
CONFLICT_IN_TRAIN = ("train/rose/15922772266_1167a06620.jpg", "train/tulip/15922772266_1167a06620.jpg")
SUNFLOWER_IN_TRAIN = (
    "train/sunflower/14889392928_9742aed45b_m.jpg",
    "train/sunflower/15066430311_fb57fa92b0_m.jpg",
)
SUNFLOWER_ACROSS_SPLITS = (
    "train/sunflower/15069459615_7e0fd61914_n.jpg",
    "val/sunflower/15072973261_73e2912ef2_n.jpg",
)
# Photos with no copy among these files.
OTHERS = [
    "train/rose/10090824183_d02c613f10_m.jpg",
    "train/rose/102501987_3cdb8e5394_n.jpg",
    "train/tulip/100930342_92e8746431_n.jpg",
    "train/tulip/10094729603_eeca3f2cb6.jpg",
    "train/sunflower/1008566138_6927679c8a.jpg",
    "train/sunflower/1022552002_2b93faf9e7_n.jpg",
    "val/rose/110472418_87b6a3aa98_m.jpg",
    "val/rose/11944957684_2cc806276e.jpg",
    "val/tulip/10995953955_089572caf0.jpg",
    "val/tulip/112650879_82adc2cc04_n.jpg",
    "val/sunflower/10386522775_4f8c616999_m.jpg",
    "val/sunflower/10386702973_e74a34c806_n.jpg",
]
KNOWN = [*CONFLICT_ACROSS_SPLITS, *CONFLICT_IN_TRAIN, *SUNFLOWER_IN_TRAIN, *SUNFLOWER_ACROSS_SPLITS]
TINY_TRAIN = ["--model", "resnet18", "--weights", "none", "--epochs", "0", "--img-size", "32"]
TINY_TRAIN += ["--batch-size", "8", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def flowers_subset(shared_dir, module_tmp) -> Path:
    """A copy of 24 flowers5 photos (never written into ../shared)."""
    root = module_tmp("flowers-subset")
    for relative in [*KNOWN, *OTHERS]:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shared_dir / "data" / "flowers5" / relative, target)
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def groups_of(report, kind: str) -> list[set[str]]:
    return [{c["path"] for c in g["copies"]} for g in report.duplicates if kind in g["kinds"]]


def test_hash_audit_finds_the_known_copies_by_path_and_touches_nothing(flowers_subset, tmp_path):
    before = digest(flowers_subset)
    report = audit(
        AuditConfig(data=str(flowers_subset), features=False, out=str(tmp_path / "audit")), say=print
    )

    assert groups_of(report, "cross_class") == [set(CONFLICT_ACROSS_SPLITS), set(CONFLICT_IN_TRAIN)]
    assert sorted(map(sorted, groups_of(report, "leakage"))) == sorted(
        map(sorted, [CONFLICT_ACROSS_SPLITS, SUNFLOWER_ACROSS_SPLITS])
    )
    assert set(SUNFLOWER_IN_TRAIN) in groups_of(report, "within_class")
    assert report.counts["leaked_images"] == 2 and report.counts["cross_class_groups"] == 2
    assert all(g["match"] == "exact" for g in report.duplicates)
    # The proposal: both copies of a conflict, the train copy of a leak, one of two copies in train.
    assert set(report.exclude) == {
        *CONFLICT_ACROSS_SPLITS,
        *CONFLICT_IN_TRAIN,
        SUNFLOWER_ACROSS_SPLITS[0],
    } | {SUNFLOWER_IN_TRAIN[1]}
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert written["exclude"] == report.exclude and written["class_counts"]["val"]["tulip"] == 3
    assert written["contact_sheet"] == "audit.png" and (tmp_path / "audit" / "audit.png").stat().st_size > 0
    assert digest(flowers_subset) == before


def test_audit_command_with_features_writes_label_issues(flowers_subset, tmp_path, capsys):
    weights = tmp_path / "random-resnet18.pth"
    torch.save(build_model("resnet18", 3).state_dict(), weights)
    out = tmp_path / "audit"
    args = [
        "audit",
        str(flowers_subset),
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--img-size",
        "32",
    ]
    assert main([*args, "--out", str(out), "--top", "4"]) == 0
    printed = capsys.readouterr().out
    assert "label conflicts (one picture, several classes): 2 (4 files)" in printed
    assert "leakage (val/test images with a copy in another split): 2" in printed
    written = json.loads((out / "audit.json").read_text())
    assert written["features"]["used"] and 0 <= written["features"]["oof_accuracy"] <= 1
    for entry in written["label_issues"]:
        assert entry["class"] != entry["suggested"] and entry["path"] in [*KNOWN, *OTHERS]
    assert (out / "audit.png").is_file()


def test_train_warns_about_leakage_and_conflicts_in_one_line(flowers_subset, tmp_path, capsys):
    assert main(["train", str(flowers_subset), *TINY_TRAIN, "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "2 val/test image(s) have a copy in another split" in warnings[0]
    assert "2 picture(s) appear under more than one class (4 files)" in warnings[0]
    assert "resfit audit" in warnings[0]


def test_exclude_from_audit_json_drops_the_listed_files(flowers_subset, tmp_path, capsys):
    audit(AuditConfig(data=str(flowers_subset), features=False, out=str(tmp_path / "audit")), say=print)
    listed = json.loads((tmp_path / "audit" / "audit.json").read_text())["exclude"]
    run = tmp_path / "run"
    args = ["train", str(flowers_subset), *TINY_TRAIN, "--out", str(run)]
    assert main([*args, "--exclude-from", str(tmp_path / "audit" / "audit.json")]) == 0
    printed = capsys.readouterr().out
    assert f"{len(listed)} excluded" in printed  # the scan's summary line
    assert "warning:" not in printed  # nothing left to leak or conflict
    report = json.loads((run / "data_report.json").read_text())
    assert (
        sorted(Path(e["path"]).relative_to(flowers_subset).as_posix() for e in report["excluded"]) == listed
    )
    assert sum(report["class_counts"]["train"].values()) + sum(report["class_counts"]["val"].values()) == len(
        KNOWN
    ) + len(OTHERS) - len(listed)


def test_exclude_from_a_plain_list_notes_paths_not_in_the_dataset(flowers_subset, tmp_path):
    listing = tmp_path / "drop.txt"
    listing.write_text(f"# reviewed\n{OTHERS[0]}\n{flowers_subset / OTHERS[1]}\nno/such/file.jpg\n")
    source, report = load_dataset(flowers_subset, exclude_from=listing)
    assert {e["path"] for e in report.excluded} == {
        str(flowers_subset / OTHERS[0]),
        str(flowers_subset / OTHERS[1]),
    }
    assert str(flowers_subset / OTHERS[0]) not in source.splits["train"].items
    assert any("1 of its 3 paths are not in this dataset" in note for note in source.notes)
    assert report.summary_line().endswith("2 excluded; see data_report.json")
