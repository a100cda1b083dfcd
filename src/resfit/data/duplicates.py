"""Copies of one picture inside a dataset, and what each set of copies means.

A set of copies is found by identical bytes (sha256) or by perceptual hashes at most a few bits
apart (the same photo re-encoded, resized, recoloured or lightly cropped). What matters is where the
copies sit: in two classes they are a label conflict (at least one label is wrong); in train and in
val/test they are leakage (the model is scored on pictures it trained on, which inflates every
metric); inside one class and split they only weigh that picture twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .hashes import ImageHashes, hamming_pairs, hash_items
from .splits import DatasetSource

# Bits of 64 in which two perceptual hashes may differ for the same picture. Measured on flowers5:
# every pair at <= 8 was one photo (re-sized, recoloured, grayscale, cropped); at 10 unrelated photos
# of different classes begin to match.
NEAR_DISTANCE = 8
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class Copy:
    item: str  # the file's absolute path (or a CIFAR key)
    label: int
    split: str


@dataclass
class DuplicateGroup:
    """Two or more copies of one picture; ``distance`` is the largest perceptual-hash distance that linked them."""

    copies: list[Copy]
    match: str  # "exact" (identical bytes) | "near" (perceptual hash, or backbone features)
    distance: int = 0
    similarity: float | None = None  # the lowest feature cosine that linked them, when features did
    evidence: list[str] = field(default_factory=list)  # "sha256", "phash", "features"

    @property
    def cross_class(self) -> bool:
        return len({c.label for c in self.copies}) > 1

    @property
    def leakage(self) -> bool:
        return len({c.split for c in self.copies}) > 1

    def kinds(self) -> list[str]:
        return ["cross_class" if self.cross_class else "within_class"] + (["leakage"] if self.leakage else [])

    def leaked(self) -> list[Copy]:
        """The copies in an evaluation split (val, test) that have a copy in another split."""
        return [c for c in self.copies if c.split != "train"] if self.leakage else []

    def proposed_exclusions(self) -> list[Copy]:
        """What to leave out without losing a picture: every copy of a label conflict (which label is
        right needs a person); otherwise all but one copy, keeping it in the latest split (test, then
        val), so the evaluation splits stay as they are and no longer overlap training."""
        if self.cross_class:
            return list(self.copies)
        latest = max(_split_rank(c.split) for c in self.copies)
        keep = min((c for c in self.copies if _split_rank(c.split) == latest), key=lambda c: c.item)
        return [c for c in self.copies if c is not keep]


def dataset_copies(source: DatasetSource) -> list[Copy]:
    """Every item of every split, train first."""
    ordered = sorted(source.splits, key=_split_rank)
    return [
        Copy(item, label, name)
        for name in ordered
        for item, label in zip(source.splits[name].items, source.splits[name].labels, strict=True)
    ]


def find_duplicates(
    copies: list[Copy],
    hashes: ImageHashes,
    max_distance: int = NEAR_DISTANCE,
    feature_pairs: Iterable[tuple[int, int, float]] = (),
) -> list[DuplicateGroup]:
    """Sets of copies linked by identical bytes, by perceptual hashes within ``max_distance`` bits, or by
    ``feature_pairs`` (i, j, cosine) from a backbone; largest sets first."""
    parent = list(range(len(copies)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def link(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    first_of: dict[str, int] = {}
    for i, digest in enumerate(hashes.sha256):
        if digest in first_of:
            link(i, first_of[digest])
        else:
            first_of[digest] = i
    phash_edges = [
        (i, j, d) for i, j, d in hamming_pairs(hashes, max_distance) if hashes.sha256[i] != hashes.sha256[j]
    ]
    for i, j, _ in phash_edges:
        link(i, j)
    feature_edges = list(feature_pairs)
    for i, j, _ in feature_edges:
        link(i, j)

    members: dict[int, list[int]] = {}
    for i in range(len(copies)):
        members.setdefault(root(i), []).append(i)
    groups = []
    for indices in members.values():
        if len(indices) < 2:
            continue
        inside = set(indices)
        distances = [d for i, j, d in phash_edges if i in inside]
        similarities = [s for i, j, s in feature_edges if i in inside]
        digests = {hashes.sha256[i] for i in indices}
        evidence = ["sha256"] if len(digests) < len(indices) else []
        evidence += (["phash"] if distances else []) + (["features"] if similarities else [])
        groups.append(
            DuplicateGroup(
                copies=[copies[i] for i in indices],
                match="exact" if len(digests) == 1 else "near",
                distance=max(distances, default=0),
                similarity=min(similarities) if similarities else None,
                evidence=evidence,
            )
        )
    groups.sort(key=lambda g: (not g.cross_class, not g.leakage, g.distance, g.copies[0].item))
    return groups


def hash_duplicates(source: DatasetSource, cache_dir: Path | None = None) -> list[DuplicateGroup]:
    """The model-free check: exact and perceptual-hash copies across every split of ``source``."""
    copies = dataset_copies(source)
    return find_duplicates(copies, hash_items(source, [c.item for c in copies], cache_dir))


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def warning_line(groups: list[DuplicateGroup], data: str) -> str | None:
    """train's one line about leakage and label conflicts (None when there are neither)."""
    leaked = sum(len(g.leaked()) for g in groups)
    conflicts = [g for g in groups if g.cross_class]
    if not leaked and not conflicts:
        return None
    parts = []
    if leaked:
        parts.append(
            f"{leaked} val/test image(s) have a copy in another split (leakage inflates the metrics)"
        )
    if conflicts:
        images = sum(len(g.copies) for g in conflicts)
        parts.append(f"{len(conflicts)} picture(s) appear under more than one class ({images} files)")
    return (
        f"warning: {'; '.join(parts)}: `resfit audit {data}` lists them, "
        "and --exclude-from audit.json leaves them out"
    )
