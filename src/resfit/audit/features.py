"""What a backbone's pooled features say about a dataset: look-alikes, likely label errors, outliers.

The features are the head stage's (same weights, preprocessing, precision and cache key), so an audit
after a training run, or a training run after an audit, extracts nothing twice. Likely label errors are
confident learning (cleanlab) on out-of-fold probabilities of the head stage's probe: each image is
judged by a probe that never saw it. An outlier is an image far from its nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..data.duplicates import Copy
from ..data.feature_cache import FeatureCache, content_fingerprint, feature_key, weights_fingerprint
from ..data.splits import DatasetSource
from ..data.transforms import Preprocessing
from ..hardware import Runtime, apply_device, resolve_runtime
from ..models import PretrainedSource, apply_pretrained, build_model
from ..train.head import extract_features, out_of_fold_probabilities
from ..train.resolve import default_img_size, preprocessing_for

NEIGHBOURS = 5  # an outlier's score is its mean cosine distance to this many nearest images


@dataclass
class FeatureFindings:
    similar_pairs: list[tuple[int, int, float]]  # (i, j, cosine) at or above the look-alike threshold
    label_issues: list[dict]  # {"index", "suggested", "p_given", "p_suggested"}, most certain first
    outliers: list[dict]  # {"index", "score"}, most isolated first
    oof_accuracy: float  # the out-of-fold probe's accuracy: how far its verdicts can be trusted


def dataset_features(
    source: DatasetSource,
    copies: list[Copy],
    architecture: str,
    pretrained: PretrainedSource,
    img_size: int | None,
    runtime: Runtime,
    say: Callable[[str], None],
) -> tuple[np.ndarray, Preprocessing]:
    """Pooled features of every copy (train, val, test order), from the feature cache where it has them."""
    preprocessing = preprocessing_for(img_size or default_img_size(pretrained), pretrained)  # as train's
    model = build_model(architecture, len(source.class_names))
    apply_pretrained(model, pretrained)
    model.to(runtime.device, memory_format=torch.channels_last)
    fingerprint = weights_fingerprint(model)
    cache = FeatureCache()
    parts = []
    for split in dict.fromkeys(c.split for c in copies):
        key = feature_key(
            fingerprint, preprocessing.to_dict(), runtime.precision, content_fingerprint(source, split)
        )
        cached = cache.get(key)
        if cached is None:
            cached = extract_features(model, source, split, preprocessing, runtime, 0, progress=True)
            cache.put(key, *cached)
        else:
            say(f"features of {split}: from the cache")
        parts.append(cached[0])
    return np.concatenate(parts).astype(np.float32), preprocessing


def feature_findings(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    similarity: float,
    outlier_mads: float,
    seed: int,
) -> FeatureFindings:
    from cleanlab.filter import find_label_issues  # imported here: it costs a second and pulls in pandas

    # Standardised first: pooled ReLU features are all positive, so raw cosines of unrelated photos
    # reach 0.99 (measured on flowers5); centred and scaled, only copies of one photo pass 0.98.
    standardised = (features - features.mean(0)) / (features.std(0) + 1e-6)
    pairs, neighbour_similarity = _neighbours(standardised, similarity)
    probabilities = out_of_fold_probabilities(features, labels, num_classes, seed)
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    label_issues = [
        {
            "index": int(i),
            "suggested": int(probabilities[i].argmax()),
            "p_given": float(probabilities[i, labels[i]]),
            "p_suggested": float(probabilities[i].max()),
        }
        for i in ranked
    ]
    score = 1.0 - neighbour_similarity
    median = float(np.median(score))
    spread = float(np.median(np.abs(score - median))) * 1.4826  # the MAD, scaled to a normal's sigma
    flagged = np.nonzero(score > median + outlier_mads * max(spread, 1e-6))[0]
    outliers = [{"index": int(i), "score": float(score[i])} for i in flagged[np.argsort(-score[flagged])]]
    oof_accuracy = float((probabilities.argmax(1) == labels).mean())
    return FeatureFindings(pairs, label_issues, outliers, oof_accuracy)


def _neighbours(features: np.ndarray, threshold: float, block: int = 1024) -> tuple[list, np.ndarray]:
    """Pairs at or above ``threshold`` cosine, and each image's mean cosine to its nearest neighbours."""
    x = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=1)
    n = len(x)
    k = min(NEIGHBOURS, n - 1)
    pairs, nearest = [], np.zeros(n, np.float64)
    for start in range(0, n, block):
        similarity = x[start : start + block] @ x.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -2.0  # not its own neighbour
        nearest[start : start + block] = similarity.topk(k, dim=1).values.mean(1).double().numpy()
        i, j = torch.nonzero(similarity >= threshold, as_tuple=True)
        keep = j > i + start
        pairs += [
            (int(a) + start, int(b), float(similarity[a, b]))
            for a, b in zip(i[keep].tolist(), j[keep].tolist(), strict=True)
        ]
    return pairs, nearest


def resolve_feature_runtime(device: str, precision: str) -> Runtime:
    runtime = resolve_runtime(device, precision)
    apply_device(runtime)
    return runtime
