"""Where a fine-tuning step's time goes: loading, forward, backward and optimizer, and the forward per block.

    python benchmarks/step_breakdown.py [--size 224] [--batch 16] [--steps 8] [--repeats 3]

Times the tutorial's eager fp32 NCHW step and resfit's default step (channels_last, frozen BatchNorm folded
into the convolutions, stem + layer1 untrained, layer-wise AdamW, label smoothing) on ants/bees photos, each
measurement in a fresh process (one path's allocations and kernel caches cannot slow the other), the two
paths alternating. Per step: medians over the steps after a warm-up step; per block: forward milliseconds
(hooks at block boundaries) and PyTorch's FLOP count forward + backward. Under the AVX2 stand-in set
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (and --precision fp32). JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def block_of(name: str) -> str:
    top = name.split(".")[0]
    return top if top.startswith("layer") else ("head" if top in ("avgpool", "fc") else "stem")


def measure(path: str, size: int, batch: int, steps: int, precision: str) -> dict:
    """One path's phase and per-block figures, in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from training_speed import optimizer_and_loss

    from resfit.batched_inference import to_device
    from resfit.data.dataset import ImageDataset
    from resfit.data.scan import load_dataset
    from resfit.data.transforms import Preprocessing
    from resfit.hardware import apply_threads, resolve_runtime
    from resfit.models import IMAGENET_MEAN, IMAGENET_STD, PretrainedSource, build_model
    from resfit.train import TrainConfig
    from resfit.train.folded_bn import training_network
    from resfit.train.resolve import default_frozen_blocks

    runtime = resolve_runtime("cpu", "fp32" if path == "eager" else precision)
    apply_threads(runtime)
    torch.manual_seed(0)
    source, _ = load_dataset(str(REPO.parent / "shared" / "data" / "hymenoptera"))
    prep = Preprocessing.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    recipe = TrainConfig(frozen_blocks=default_frozen_blocks(PretrainedSource(kind="file", description="")))
    dataset = ImageDataset(source, "train", prep.train_transform(recipe.augment, recipe.min_crop_scale))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    model = build_model("resnet50", len(source.class_names))
    if path != "eager":
        model = model.to(memory_format=torch.channels_last)
    # the same optimizer and loss as training_speed.py's eager and resfit paths
    optimizer, criterion = optimizer_and_loss(model, None if path == "eager" else recipe)
    network = model if path == "eager" else training_network(model)

    forward_ms = {block: [] for block in BLOCKS}
    marks: list[tuple[str, float]] = []
    for name, child in network.named_children():
        child.register_forward_hook(lambda *_, n=name: marks.append((block_of(n), time.perf_counter())))

    phases = {"load": [], "forward": [], "backward": [], "optimizer": []}
    iterator = iter(loader)
    for index in range(steps + 1):
        started = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, labels = next(iterator)
        if path != "eager":
            images = to_device(images, runtime)
        loaded = time.perf_counter()
        marks.clear()
        with runtime.autocast():
            loss = criterion(network(images).float(), labels)
        forwarded = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backwarded = time.perf_counter()
        optimizer.step()
        stepped = time.perf_counter()
        if index == 0:
            continue  # warm-up: allocator, oneDNN kernels
        for phase, seconds in zip(
            phases,
            (loaded - started, forwarded - loaded, backwarded - forwarded, stepped - backwarded),
            strict=True,
        ):
            phases[phase].append(seconds)
        previous = loaded
        per_block = dict.fromkeys(BLOCKS, 0.0)
        for block, at in marks:
            per_block[block] += at - previous
            previous = at
        for block, seconds in per_block.items():
            forward_ms[block].append(seconds * 1000)

    with FlopCounterMode(network, display=False) as counter:
        loss = criterion(network(images).float(), labels)
        loss.backward()
    flops = counter.get_flop_counts()
    prefix = type(network).__name__
    gflop = dict.fromkeys(BLOCKS, 0.0)
    for name, counts in flops.items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == prefix:
            gflop[block_of(parts[1])] += sum(counts.values()) / len(labels) / 1e9
    step_s = sum(statistics.median(v) for v in phases.values())
    return {
        "path": path,
        "images_per_s": batch / step_s,
        "phase_ms": {phase: statistics.median(v) * 1000 for phase, v in phases.items()},
        "forward_ms_per_block": {block: statistics.median(v) for block, v in forward_ms.items()},
        "gflop_per_image_per_block": gflop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="resfit's precision (fp32 for the AVX2 stand-in)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one path in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.batch, args.steps, args.precision)))
        return
    from provenance import record, stamp

    rows = []
    for _ in range(args.repeats):
        for path in ("eager", "resfit"):
            done = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one", path],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for path in ("eager", "resfit"):
        mine = [row for row in rows if row["path"] == path]
        summary[path] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in mine),
            "phase_ms": {p: statistics.median(r["phase_ms"][p] for r in mine) for p in mine[0]["phase_ms"]},
            "forward_ms_per_block": {
                b: statistics.median(r["forward_ms_per_block"][b] for r in mine) for b in BLOCKS
            },
            "gflop_per_image_per_block": mine[0]["gflop_per_image_per_block"],
        }
    ratios = [r["images_per_s"] / e["images_per_s"] for e, r in zip(rows[0::2], rows[1::2], strict=True)]
    print(f"\nResNet-50 @{args.size}, batch {args.batch}, medians of {args.repeats} fresh processes per path")
    for path, figures in summary.items():
        total = sum(figures["phase_ms"].values())
        print(
            f"{path:>7}: {figures['images_per_s']:.2f} img/s; "
            + ", ".join(f"{p} {ms:.0f} ms ({ms / total:.0%})" for p, ms in figures["phase_ms"].items())
        )
        print(
            "         forward ms per block: "
            + ", ".join(f"{b} {ms:.0f}" for b, ms in figures["forward_ms_per_block"].items())
            + "\n         GFLOP per image per block (forward + backward): "
            + ", ".join(f"{b} {g:.2f}" for b, g in figures["gflop_per_image_per_block"].items())
        )
    print(f"resfit / eager, paired per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")
    out = REPO / "benchmarks" / "results" / f"step_breakdown-{args.size}-{stamp()}.json"
    report = {"benchmark": "step_breakdown", "args": vars(args), "rows": rows, "summary": summary}
    out.write_text(json.dumps(report | {"ratios": ratios, "provenance": record()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
