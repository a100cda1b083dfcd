"""The Classifier a run folder becomes: the one inference path for predict, evaluate and the service."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import open_rgb
from .data.transforms import Preprocessing
from .errors import ImageReadError, ResfitError
from .evaluate import softmax, to_device
from .hardware import Runtime, apply_threads, resolve_runtime
from .runfolder import load_model

PREDICT_BATCH_SIZE = 16


@dataclass
class Prediction:
    path: str
    top_k: list[tuple[str, float]] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "predicted": self.top_k[0][0],
            "top_k": [{"class": name, "probability": round(p, 6)} for name, p in self.top_k],
        }


class Classifier:
    """A trained model with its class names and preprocessing: give it images, get probabilities."""

    def __init__(self, model: torch.nn.Module, meta: dict, runtime: Runtime):
        self.meta = meta
        self.runtime = runtime
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.transform = self.preprocessing.eval_transform()
        self.model = model.to(runtime.device, memory_format=torch.channels_last).eval()

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str = "auto", precision: str = "auto") -> Classifier:
        runtime = resolve_runtime(device, precision)
        apply_threads(runtime)
        model, meta = load_model(Path(run_dir))
        return cls(model, meta, runtime)

    def _as_image(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB") if image.mode != "RGB" else image
        return open_rgb(image)[0]

    @torch.inference_mode()
    def predict_proba(self, images: Iterable) -> np.ndarray:
        """Class probabilities, (N, C), for PIL images, paths or encoded bytes."""
        batch = torch.stack([self.transform(self._as_image(image)) for image in images])
        with self.runtime.autocast():
            logits = self.model(to_device(batch, self.runtime))
        return softmax(logits.float().cpu().numpy())

    def predict(self, image, top_k: int = 5) -> list[tuple[str, float]]:
        """Top-k (class name, probability) for one image (PIL image, path or bytes)."""
        return self._top_k(self.predict_proba([image])[0], top_k)

    def _top_k(self, probs: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: max(1, min(top_k, len(self.class_names)))]
        return [(self.class_names[i], float(probs[i])) for i in order]

    def predict_paths(
        self, paths: Iterable[str], top_k: int = 5, batch_size: int = PREDICT_BATCH_SIZE
    ) -> Iterator[Prediction]:
        """Predictions in input order, batched; an unreadable file yields an error entry and the rest go on."""
        pending: list[tuple[str, Image.Image | None, str | None]] = []

        def flush() -> Iterator[Prediction]:
            images = [image for _, image, _ in pending if image is not None]
            rows = iter(self.predict_proba(images)) if images else iter(())
            for path, image, error in pending:
                yield (
                    Prediction(path, error=error)
                    if image is None
                    else Prediction(path, self._top_k(next(rows), top_k))
                )
            pending.clear()

        decoded = 0
        for path in paths:
            try:
                pending.append((path, open_rgb(path)[0], None))
                decoded += 1
            except ImageReadError as error:
                pending.append((path, None, error.reason))
            if decoded >= batch_size:
                yield from flush()
                decoded = 0
        if pending:
            yield from flush()


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given; folders walked recursively in sorted order, hidden names skipped."""
    paths: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                paths += [str(Path(root) / f) for f in sorted(files) if not f.startswith(".")]
        elif path.exists():
            paths.append(str(path))
        else:
            raise ResfitError(f"no such file or folder: {raw}")
    return paths


def load(run_dir: str | os.PathLike, device: str = "auto", precision: str = "auto") -> Classifier:
    """``resfit.load(RUN_DIR).predict(image)``."""
    return Classifier.load(run_dir, device, precision)
