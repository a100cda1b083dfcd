"""Training speed side by side, in one run, data loading included:

(a) images/s of resfit's default training path (detected precision + channels_last, its DataLoader settings)
    against the plain eager fp32 NCHW loop of the PyTorch tutorial, same data, model, batch and resolution;
(b) one head-training epoch on a frozen backbone: forward passes through the backbone every epoch, against
    resfit's cached pooled features.

    python benchmarks/training_speed.py [--data ../shared/data/hymenoptera] [--sizes 224,112] [--repeats 3]
Prints medians of the repeats, the CPU line and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from resfit.data.dataset import ImageDataset
from resfit.data.decoded_cache import decoded_caches
from resfit.data.scan import load_dataset
from resfit.data.transforms import Preprocessing
from resfit.evaluate import to_device
from resfit.hardware import apply_threads, default_num_workers, resolve_runtime
from resfit.models import IMAGENET_MEAN, IMAGENET_STD, build_model, forward_features
from resfit.train.head import extract_features

REPO = Path(__file__).resolve().parents[1]


def images_per_second(model, loader, steps: int, step_fn) -> float:
    iterator = iter(loader)
    step_fn(*next(iterator))  # warm-up: allocator, oneDNN kernels
    seen, started = 0, time.perf_counter()
    for _ in range(steps):
        try:
            images, labels = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, labels = next(iterator)
        step_fn(images, labels)
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def training_throughput(source, size: int, batch: int, steps: int, default_path: bool) -> float:
    torch.manual_seed(0)
    runtime = resolve_runtime("cpu", "auto" if default_path else "fp32")
    apply_threads(runtime)
    prep = Preprocessing.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    # resfit's default path includes the decoded-image cache where "auto" turns it on (crops <= 128 px);
    # it is built once before timing, like the feature cache (a one-off cost, reused by later runs).
    decoded = decoded_caches(source, prep, "auto", say=lambda _: None, progress=False) if default_path else {}
    dataset = ImageDataset(source, "train", prep.train_transform("standard"), decoded=decoded.get("train"))
    workers = default_num_workers(runtime) if default_path else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    model = build_model("resnet50", len(source.class_names))
    if default_path:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, labels):
        if default_path:
            images = to_device(images, runtime)
        with runtime.autocast() if default_path else torch.autocast("cpu", enabled=False):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return images_per_second(model, loader, steps, step)


def head_epoch_seconds(source, size: int, batch: int) -> tuple[float, float, float]:
    """(forward-pass epoch s, cached-feature epoch s, extraction s) for a linear head on a frozen ResNet-50."""
    runtime = resolve_runtime("cpu", "auto")
    apply_threads(runtime)
    prep = Preprocessing.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    model = build_model("resnet50", len(source.class_names)).to(memory_format=torch.channels_last).eval()
    head = nn.Linear(model.fc.in_features, len(source.class_names))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    dataset = ImageDataset(source, "train", prep.eval_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=default_num_workers(runtime))

    def head_step(features, labels):
        loss = nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    for images, labels in loader:
        with torch.inference_mode(), runtime.autocast():
            features = forward_features(model, to_device(images, runtime)).float()
        head_step(features.clone(), labels)
    forward_epoch = time.perf_counter() - started

    started = time.perf_counter()
    features, labels = extract_features(
        model, source, "train", prep, runtime, default_num_workers(runtime), False
    )
    extraction = time.perf_counter() - started
    features, labels = torch.from_numpy(features), torch.from_numpy(labels)
    started = time.perf_counter()
    for i in range(0, len(labels), batch):
        head_step(features[i : i + batch], labels[i : i + batch])
    cached_epoch = time.perf_counter() - started
    return forward_epoch, cached_epoch, extraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera"))
    parser.add_argument("--sizes", default="224,112")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head-data", default=str(REPO.parent / "shared" / "data" / "flowers5"))
    args = parser.parse_args()
    runtime = resolve_runtime("cpu", "auto")
    print(f"device: {runtime.describe()}")
    print(
        f"torch {torch.__version__}; {args.repeats} repeats of {args.steps} steps at batch {args.batch}; medians"
    )
    source, _ = load_dataset(args.data)
    print("\n(a) training images/s, ResNet-50, data loading included")
    print(f"{'size':>5} | {'eager fp32 NCHW':>15} | {'resfit default':>14} | ratio")
    for size in (int(s) for s in args.sizes.split(",")):
        eager = [
            training_throughput(source, size, args.batch, args.steps, False) for _ in range(args.repeats)
        ]
        default = [
            training_throughput(source, size, args.batch, args.steps, True) for _ in range(args.repeats)
        ]
        e, d = statistics.median(eager), statistics.median(default)
        print(f"{size:>5} | {e:>15.2f} | {d:>14.2f} | {d / e:.2f}x", flush=True)

    head_source, _ = load_dataset(args.head_data)
    print(
        f"\n(b) one head epoch on a frozen ResNet-50 @112, {len(head_source.splits['train'].items)} images, batch 32"
    )
    results = [head_epoch_seconds(head_source, 112, 32) for _ in range(max(1, args.repeats - 1))]
    forward = statistics.median(r[0] for r in results)
    cached = statistics.median(r[1] for r in results)
    extraction = statistics.median(r[2] for r in results)
    print(
        f"forward passes: {forward:.2f} s/epoch | cached features: {cached:.4f} s/epoch | "
        f"{forward / cached:.0f}x | one-time extraction {extraction:.1f} s"
    )


if __name__ == "__main__":
    main()
