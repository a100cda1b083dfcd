"""Pooled features of a split, cached on disk so a frozen backbone never sees the same image twice.

The key covers everything the features depend on: the backbone's weights, the preprocessing, the
numeric precision, and every image's bytes (and label). Change any of them and the key changes, so a
stale cache is never used. Files live under $RESFIT_CACHE/features (or ~/.cache/resfit/features).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..fileio import atomic_write
from .scan import default_cache_dir
from .splits import DatasetSource

FORMAT_VERSION = 1


def weights_fingerprint(module: torch.nn.Module, skip_prefix: str = "fc.") -> str:
    """A hash of every backbone tensor (the head is excluded: it does not change the features)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        if name.startswith(skip_prefix):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def content_fingerprint(source: DatasetSource, split: str, indices: list[int] | None = None) -> str:
    """A hash of each image's bytes and label, in order (CIFAR items hash their pixels, dataset rows their bytes)."""
    data = source.splits[split]
    order = range(len(data.items)) if indices is None else indices
    digest = hashlib.blake2b(digest_size=20)
    for i in order:
        item = data.items[i]
        digest.update(f"{data.labels[i]}\0".encode())
        if source.cifar is not None:
            digest.update(np.asarray(source.read(item)[0]).tobytes())
        elif source.arrow is not None:
            digest.update(hashlib.blake2b(source.arrow.encoded(item), digest_size=20).digest())
        else:
            digest.update(hashlib.blake2b(Path(item).read_bytes(), digest_size=20).digest())
    return digest.hexdigest()


def feature_key(weights: str, preprocessing: dict, precision: str, content: str) -> str:
    described = json.dumps(
        {
            "v": FORMAT_VERSION,
            "weights": weights,
            "prep": preprocessing,
            "precision": precision,
            "data": content,
        },
        sort_keys=True,
    )
    return hashlib.blake2b(described.encode(), digest_size=20).hexdigest()


class FeatureCache:
    """Features and labels per key, as safetensors files (no pickle), written atomically."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir() / "features"

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            arrays = load_file(str(path))
            return arrays["features"], arrays["labels"]
        except (OSError, KeyError, ValueError, SafetensorError):
            path.unlink(missing_ok=True)  # unreadable: drop it and recompute
            return None

    def put(self, key: str, features: np.ndarray, labels: np.ndarray) -> None:
        arrays = {
            "features": np.ascontiguousarray(features, np.float32),
            "labels": np.asarray(labels, np.int64),
        }
        atomic_write(self._path(key), lambda tmp: save_file(arrays, tmp))
