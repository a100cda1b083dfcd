"""Training speed side by side, in one run, data loading included:

(a) images/s of resfit's default training step (detected precision + channels_last, its recipe's frozen
    BatchNorm statistics folded into the convolutions, stem + layer1 untrained, its DataLoader settings),
    and of that step with more blocks trained, against the plain eager fp32 NCHW loop of the PyTorch
    tutorial, same data, model, batch and resolution; a middle column isolates what precision and layout
    alone give; beside them the CPU's measured fp32 matmul rate and each path's counted GFLOP per image;
(b) one head-training epoch on a frozen backbone: forward passes through the backbone every epoch, against
    resfit's cached pooled features.

    python benchmarks/training_speed.py [--data ../shared/data/hymenoptera] [--sizes 224,112] [--repeats 3]
Prints medians of the repeats, the CPU line and the ratios. To see resfit's path on a CPU without native
bf16 on this one, limit the instruction sets and take fp32 (what resfit detects there):

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/training_speed.py --precision fp32 --skip-head
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from cpu_yardstick import matmul_gflops
from provenance import record, stamp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resfit.batched_inference import to_device
from resfit.data.dataset import ImageDataset
from resfit.data.decoded_cache import decoded_caches
from resfit.data.scan import load_dataset
from resfit.data.transforms import Preprocessing
from resfit.hardware import apply_threads, default_num_workers, resolve_runtime
from resfit.models import IMAGENET_MEAN, IMAGENET_STD, PretrainedSource, build_model, forward_features
from resfit.train import TrainConfig
from resfit.train.folded_bn import training_network
from resfit.train.head import extract_features
from resfit.train.loop import finetune_optimizer, set_train_mode
from resfit.train.resolve import default_frozen_blocks

REPO = Path(__file__).resolve().parents[1]


def optimizer_and_loss(model: nn.Module, recipe: TrainConfig | None):
    """(optimizer, criterion) set up exactly as the Trainer sets up fine-tuning for ``recipe``, or a plain
    AdamW + cross-entropy with the model in train mode (what a user writes) when ``recipe`` is None."""
    if recipe is None:
        model.train()
        return torch.optim.AdamW(model.parameters(), lr=1e-4), nn.CrossEntropyLoss()
    recipe = replace(recipe, lr=recipe.head_lr)
    optimizer, frozen = finetune_optimizer(model, recipe)
    set_train_mode(model, model, recipe, frozen)
    return optimizer, nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def step_gflop_per_image(loader, step_fn) -> float:
    """Floating-point operations one training step really performs per image (PyTorch's own counter:
    convolutions and matmuls forward and backward), so a path that skips work is not credited for it."""
    images, labels = next(iter(loader))
    with FlopCounterMode(display=False) as counter:
        step_fn(images, labels)
    return counter.get_total_flops() / len(labels) / 1e9


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


PATHS = ("eager", "autocast", "unfolded", "all-blocks", "frozen1", "resfit", "frozen3", "fused-adamw")
PATH_NAMES = {
    "eager": "eager fp32 NCHW",
    "autocast": "precision+layout",
    "unfolded": "all, BN unfolded",
    "all-blocks": "all blocks",
    "frozen1": "stem frozen",
    "resfit": "resfit default",
    "frozen3": "layer2 frozen too",
    "fused-adamw": "resfit, fused AdamW",
}
# resfit's default from pretrained weights is --frozen-blocks 2 (resolve.default_frozen_blocks; main() checks)
FROZEN_BLOCKS = {"unfolded": 0, "all-blocks": 0, "frozen1": 1, "resfit": 2, "frozen3": 3, "fused-adamw": 2}


def fused_twin(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """The same AdamW (its lr groups and weight decays) with PyTorch's fused kernel: on a CPU tensor
    torch's default is the single-tensor loop, one small op after another per parameter."""
    flags = set(optimizer.defaults) - {"lr", "weight_decay"}  # the groups carry foreach/fused: drop them
    groups = [{k: v for k, v in group.items() if k not in flags} for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, fused=True)


def training_throughput(
    source, size: int, batch: int, steps: int, path: str, precision: str = "auto"
) -> tuple[float, float]:
    """(images/s, GFLOP per image really computed) of one training path; the model, data, batch and
    optimizer (AdamW) are the same for all (resfit's AdamW has its layer-wise lr groups).

    eager:    the tutorial loop: fp32, NCHW, every layer trained, BatchNorm in training mode, no workers.
    autocast: the same step with the detected precision (bf16 autocast here) and channels_last only.
    resfit:   resfit's default fine-tuning step: that precision and layout plus its recipe (BatchNorm
              frozen and folded into the convolutions, stem and layer1 left untrained (``--frozen-blocks
              2``: no backward pass through them), layer-wise lr groups, label smoothing), its DataLoader
              workers, and the decoded-image cache where ``auto`` turns it on.
    all-blocks: that step with every block trained (``--frozen-blocks 0``).
    unfolded: all-blocks with its frozen BatchNorms run as BatchNorms (resfit before the fold).
    frozen1:  that step with only the stem untrained (``--frozen-blocks 1``).
    frozen3:  that step with layer2 untrained too (``--frozen-blocks 3``).
    fused-adamw: resfit's default step with AdamW's fused kernel (``fused=True``) instead of torch's
              default on CPU tensors (the single-tensor loop).
    """
    torch.manual_seed(0)
    runtime = resolve_runtime("cpu", "fp32" if path == "eager" else precision)
    apply_threads(runtime)
    recipe = TrainConfig(frozen_blocks=FROZEN_BLOCKS.get(path))
    resfit_step = path not in ("eager", "autocast")
    prep = Preprocessing.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    # The decoded-image cache is built once before timing, like the feature cache (a one-off cost,
    # reused by later runs).
    decoded = (
        decoded_caches(source, prep, recipe.decoded_cache, say=lambda _: None, progress=False)
        if resfit_step
        else {}
    )
    transform = prep.train_transform(recipe.augment, recipe.min_crop_scale)
    dataset = ImageDataset(source, "train", transform, decoded=decoded.get("train"))
    workers = default_num_workers(runtime) if resfit_step else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    model = build_model("resnet50", len(source.class_names))
    if path != "eager":
        model = model.to(memory_format=torch.channels_last)
    optimizer, criterion = optimizer_and_loss(model, recipe if resfit_step else None)
    if path == "fused-adamw":
        optimizer = fused_twin(optimizer)
    network = training_network(model) if resfit_step and path != "unfolded" else model

    def step(images, labels):
        if path != "eager":
            images = to_device(images, runtime)
        with runtime.autocast():
            logits = network(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return images_per_second(model, loader, steps, step), step_gflop_per_image(loader, step)


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
    parser.add_argument(
        "--precision",
        default="auto",
        help="resfit's precision (default: what it detects); fp32 shows its path on a CPU without native bf16",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated training paths to time (eager is always one): {', '.join(PATHS)}",
    )
    parser.add_argument("--skip-head", action="store_true", help="only (a)")
    parser.add_argument("--head-data", default=str(REPO.parent / "shared" / "data" / "flowers5"))
    args = parser.parse_args()
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown --paths {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    paths = ("eager", *(p for p in PATHS[1:] if p in args.paths.split(",")))
    runtime = resolve_runtime("cpu", args.precision)
    print(f"device: {runtime.describe()}")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA"), os.environ.get("ATEN_CPU_CAPABILITY")
    if any(isa):
        print(f"instruction sets limited: ONEDNN_MAX_CPU_ISA={isa[0]}, ATEN_CPU_CAPABILITY={isa[1]}")
    print(
        f"torch {torch.__version__}; {args.repeats} repeats of {args.steps} steps at batch {args.batch}; medians"
    )
    pretrained = PretrainedSource(kind="file", description="")
    assert FROZEN_BLOCKS["resfit"] == default_frozen_blocks(pretrained), "resfit's default changed"
    source, _ = load_dataset(args.data)
    apply_threads(runtime)
    matmul_samples = [matmul_gflops()]
    report = {
        "benchmark": "training_speed",
        "args": vars(args),
        "device": runtime.describe(),
        "isa_limits": dict(zip(("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"), isa, strict=True))
        | {"MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS")},
        "sizes": {},
    }
    print("\n(a) training images/s, ResNet-50, data loading included")
    print(" | ".join([f"{'size':>5}", *(f"{PATH_NAMES[p]:>16}" for p in paths), "ratios to eager"]))
    for size in (int(s) for s in args.sizes.split(",")):
        samples = {p: [] for p in paths}
        gflop = {}
        for _ in range(args.repeats):  # the paths alternate within each repeat: drift hits all alike
            for path in paths:
                rate, gflop[path] = training_throughput(
                    source, size, args.batch, args.steps, path, args.precision
                )
                samples[path].append(rate)
        matmul_samples.append(matmul_gflops())  # before and after each size: the machine drifts
        matmul = statistics.median(matmul_samples)
        medians = {p: statistics.median(v) for p, v in samples.items()}
        ratios = ", ".join(f"{medians[p] / medians['eager']:.2f}x" for p in paths[1:])
        # each repeat's ratio, its paths timed back to back: the spread says how far one run's ratio can be
        paired = {p: sorted(r / e for r, e in zip(samples[p], samples["eager"], strict=True)) for p in paths}
        print(" | ".join([f"{size:>5}", *(f"{medians[p]:>16.2f}" for p in paths), ratios]), flush=True)
        of_matmul = {p: medians[p] * gflop[p] / matmul for p in paths}
        print(
            f"{'':>5}   fp32 matmul (4096x4096, this thread count) {matmul:.0f} GFLOP/s (median of "
            f"{len(matmul_samples)}); GFLOP per image computed: "
            + ", ".join(f"{PATH_NAMES[p]} {gflop[p]:.1f}" for p in paths)
            + "\n      fraction of the measured matmul rate: "
            + ", ".join(f"{PATH_NAMES[p]} {of_matmul[p]:.0%}" for p in paths)
            + "\n      each repeat's ratio to eager (min, median, max): "
            + ", ".join(
                f"{PATH_NAMES[p]} {v[0]:.2f} / {statistics.median(v):.2f} / {v[-1]:.2f}"
                for p, v in paired.items()
                if p != "eager"
            ),
            flush=True,
        )
        fused_vs_resfit = None
        if "fused-adamw" in samples and "resfit" in samples:  # the optimizer alone, timed back to back
            fused_vs_resfit = sorted(
                f / r for f, r in zip(samples["fused-adamw"], samples["resfit"], strict=True)
            )
            print(
                f"      fused AdamW / resfit's default per repeat (min, median, max): {fused_vs_resfit[0]:.3f} "
                f"/ {statistics.median(fused_vs_resfit):.3f} / {fused_vs_resfit[-1]:.3f}",
                flush=True,
            )
        report["sizes"][size] = {
            "fused_adamw_x_resfit_per_repeat": fused_vs_resfit,
            "images_per_s": samples,
            "medians": medians,
            "x_eager": {p: medians[p] / medians["eager"] for p in paths},
            "x_eager_per_repeat": paired,
            "gflop_per_image": gflop,
            "fraction_of_matmul_rate": of_matmul,
        }
    report["matmul_gflops"] = {"samples": matmul_samples, "median": statistics.median(matmul_samples)}
    out = REPO / "benchmarks" / "results" / f"training_speed-{stamp()}.json"
    out.write_text(json.dumps(report | {"provenance": record()}, indent=2) + "\n")
    print(f"wrote {out}")

    if args.skip_head:
        return
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
