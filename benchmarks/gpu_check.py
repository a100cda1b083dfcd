"""The CUDA path measured on one GPU, in one run (benchmarks/gpu_check.sh installs and calls this):

(a) training images/s of ResNet-50 and ResNet-101 at 224 px, batch 64 (resfit's CUDA default): the eager
    fp32 NCHW step of the PyTorch tutorial, that step with AMP (bf16 where the GPU has it) + channels_last,
    and resfit's own step (its recipe: frozen BatchNorm statistics, layer-wise AdamW groups, label
    smoothing, grad scaler), all on synthetic tensors already on the GPU (the ceiling), then resfit's step
    on real photos through resfit's loader (its workers, pinned memory, seeded batches, decoded-image
    cache as ``auto`` sets it, then forced on): the real/synthetic ratio is what the data pipeline keeps;
(b) the loader alone (no GPU work): how many images/s the CPU can decode and augment;
(c) inference images/s and batch-1 latency on the default backend for CUDA (eager PyTorch, the run's
    precision), numpy batch in, logits out, copies included;
(d) a short real fine-tune per depth: the head stage + 2 epochs on flowers5 from the Imagenette sources
    in ../shared/weights, resfit's defaults otherwise, with its validation accuracy.

    python benchmarks/gpu_check.py [--device cuda:0] [--shared ../shared] [--out-dir DIR]
    python benchmarks/gpu_check.py --device cpu --dry-run     # every code path, a couple of steps, on CPU

Writes one JSON (into --out-dir, default $OUT, else benchmarks/results/) and prints one table. The dry run
measures nothing worth reading: tiny sizes, ResNet-50 only, a few images; it only proves the code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_speed import PATH_NAMES, images_per_second, optimizer_and_loss  # noqa: E402  (benchmarks/ is not a package)

from resfit.batched_inference import EVAL_BATCH_SIZE, to_device  # noqa: E402
from resfit.data.dataset import ImageDataset  # noqa: E402
from resfit.data.decoded_cache import decoded_caches  # noqa: E402
from resfit.data.scan import load_dataset  # noqa: E402
from resfit.data.transforms import Preprocessing  # noqa: E402
from resfit.distributed import DistContext, GlobalBatchSampler  # noqa: E402
from resfit.hardware import Runtime, apply_device, default_num_workers, pin_memory, resolve_runtime  # noqa: E402
from resfit.inference.classifier import PREDICT_BATCH_SIZE  # noqa: E402
from resfit.inference.engines import TorchBackend, choose_backend  # noqa: E402
from resfit.models import IMAGENET_MEAN, IMAGENET_STD, build_model  # noqa: E402
from resfit.train import TrainConfig, train  # noqa: E402
from resfit.train.resolve import default_batch_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet50", "resnet101")
STEP_PATHS = ("eager", "autocast", "resfit")  # training_speed.py's names for the same three steps
# Validation accuracy on flowers5 from ../shared/README.md (2-core CPU, bf16): what the fine-tune should reach.
REFERENCE = {
    "resnet50": "probe 0.638; full fine-tune 0.620 (3 epochs @112)",
    "resnet101": "probe 0.633",
}


def synchronize(runtime: Runtime) -> None:
    if runtime.device_type == "cuda":
        torch.cuda.synchronize(runtime.device)


def timed(step_fn: Callable, runtime: Runtime, timed_steps: int) -> Callable:
    """``step_fn`` for training_speed.images_per_second on a GPU: its clock starts after the warm-up step
    and stops after the last step, so both must wait for the GPU to finish, not just for the launches."""
    calls = {"n": 0}

    def step(images, labels):
        step_fn(images, labels)
        calls["n"] += 1
        if calls["n"] in (1, timed_steps + 1):
            synchronize(runtime)

    return step


def training_step(
    model_name: str, classes: int, path: str, device: str
) -> tuple[nn.Module, Callable, Runtime]:
    """One training step of ``path``: eager (tutorial: fp32, NCHW, BatchNorm training, plain AdamW),
    autocast (the same with AMP + channels_last) or resfit (its fine-tuning step, as the Trainer sets it up)."""
    runtime = resolve_runtime(device, "fp32" if path == "eager" else "auto")
    apply_device(runtime)
    torch.manual_seed(0)
    model = build_model(model_name, classes)
    model = model.to(
        runtime.device, memory_format=torch.contiguous_format if path == "eager" else torch.channels_last
    )
    scaler = runtime.grad_scaler()
    optimizer, criterion = optimizer_and_loss(model, TrainConfig() if path == "resfit" else None)

    def step(images, labels):
        if path == "eager":
            images = images.to(runtime.device, non_blocking=True)
        else:
            images = to_device(images, runtime)
        labels = labels.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits = model(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return model, step, runtime


def synthetic_batches(batch: int, size: int, classes: int, runtime: Runtime) -> list:
    """One batch already on the device, reused: no loading, no copy; the GPU's ceiling."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(runtime.device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(runtime.device)
    return [(images, labels)]


class ResfitLoader:
    """Training batches as the Trainer loads them: a fresh DataLoader per epoch over seeded global
    batches, resfit's workers and pinned memory (see Trainer.train_epoch)."""

    def __init__(self, dataset: ImageDataset, batch: int, runtime: Runtime, workers: int):
        self.dataset, self.batch, self.runtime, self.workers, self.epoch = dataset, batch, runtime, workers, 0

    def __iter__(self):
        self.epoch += 1
        self.dataset.set_epoch(0, self.epoch)
        sampler = GlobalBatchSampler(len(self.dataset), self.batch, DistContext(), 0, self.epoch)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.workers,
                pin_memory=pin_memory(self.runtime),
            )
        )


def loader_for(source, size: int, batch: int, runtime: Runtime, decoded_mode: str, workers: int) -> tuple:
    prep = Preprocessing.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    messages: list[str] = []
    decoded = decoded_caches(
        source, prep, decoded_mode, splits=("train",), say=messages.append, progress=False
    )
    recipe = TrainConfig()
    dataset = ImageDataset(
        source,
        "train",
        prep.train_transform(recipe.augment, recipe.min_crop_scale),
        decoded=decoded.get("train"),
    )
    return ResfitLoader(dataset, batch, runtime, workers), " ".join(messages)


def loader_alone(loader: ResfitLoader, batches: int) -> float:
    """Images/s of decoding + augmenting + collating (+ pinning on CUDA) with nothing else to do."""
    iterator = iter(loader)
    next(iterator)  # worker start-up, as images_per_second's warm-up step excludes it
    seen, started = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _labels = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, _labels = next(iterator)
        seen += len(images)
    return seen / (time.perf_counter() - started)


def measure_training(args, settings: dict, source, say) -> dict:
    """(a) and (b): images/s per model and path; the loader's own rate."""
    results: dict = {"paths": {}, "loader_alone": {}}
    size, batch, classes = settings["size"], settings["batch"], len(source.class_names)
    for model_name in settings["models"]:
        rows = {}
        for path in STEP_PATHS:
            model, step, runtime = training_step(model_name, classes, path, args.device)
            batches = synthetic_batches(batch, size, classes, runtime)
            for _ in range(settings["warmup"]):
                step(*batches[0])
            rows[f"{path} synthetic"] = images_per_second(
                model, batches, settings["steps"], timed(step, runtime, settings["steps"])
            )
            say(f"{model_name} {PATH_NAMES[path]}, synthetic: {rows[f'{path} synthetic']:.1f} img/s")
            if path == "resfit":
                if runtime.device_type == "cuda":  # would letting cuDNN pick its kernels pay?
                    torch.backends.cudnn.benchmark = True
                    for _ in range(settings["warmup"]):
                        step(*batches[0])
                    rows["resfit synthetic cudnn.benchmark"] = images_per_second(
                        model, batches, settings["steps"], timed(step, runtime, settings["steps"])
                    )
                    torch.backends.cudnn.benchmark = False
                workers = default_num_workers(runtime)
                for mode in ("auto", "on"):
                    loader, note = loader_for(source, size, batch, runtime, mode, workers)
                    rows[f"resfit real decoded-cache {mode}"] = images_per_second(
                        model, loader, settings["real_steps"], timed(step, runtime, settings["real_steps"])
                    )
                    if mode not in results["loader_alone"]:  # the same for every model
                        results["loader_alone"][mode] = loader_alone(loader, settings["real_steps"])
                    results.setdefault("decoded_cache_notes", {})[mode] = note
                    say(
                        f"{model_name} resfit, real photos, decoded cache {mode}: {rows[f'resfit real decoded-cache {mode}']:.1f} img/s"
                    )
                results["workers"] = workers
                results["precision"] = runtime.precision
            del model, step
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows["amp_speedup"] = rows["autocast synthetic"] / rows["eager synthetic"]
        rows["pipeline_share"] = rows["resfit real decoded-cache auto"] / rows["resfit synthetic"]
        results["paths"][model_name] = rows
    return results


def measure_inference(args, settings: dict, say) -> dict:
    """(c) the default CUDA backend (eager PyTorch at the run's precision): numpy in, logits out."""
    results = {}
    runtime = resolve_runtime(args.device, "auto")
    choice = choose_backend(runtime.cpu, "auto", runtime.precision, runtime.device)
    size = settings["size"]
    for model_name in settings["models"]:
        model = build_model(model_name, 5)
        backend = TorchBackend(model, runtime.precision, runtime.device)
        row = {"backend": choice.name, "precision": runtime.precision}
        if choice.name != "torch":
            row["note"] = (
                f"the CPU default is {choice.name} (measured by inference_backends.py); torch measured here"
            )
        for batch in sorted({PREDICT_BATCH_SIZE, EVAL_BATCH_SIZE} if not args.dry_run else {2}):
            inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
            for _ in range(settings["warmup"]):
                backend(inputs)
            started = time.perf_counter()
            for _ in range(settings["infer_calls"]):
                backend(inputs)  # returns numpy: every call waits for its logits
            row[f"images_per_s_batch{batch}"] = (
                batch * settings["infer_calls"] / (time.perf_counter() - started)
            )
        one = np.random.default_rng(1).standard_normal((1, 3, size, size), dtype=np.float32)
        for _ in range(settings["warmup"]):
            backend(one)
        latencies = []
        for _ in range(settings["latency_calls"]):
            started = time.perf_counter()
            backend(one)
            latencies.append(1000 * (time.perf_counter() - started))
        row["latency_ms_median"] = statistics.median(latencies)
        row["latency_ms_p90"] = float(np.percentile(latencies, 90))
        results[model_name] = row
        say(f"{model_name} inference: {row}")
        del model, backend
    return results


def subset(data: Path, root: Path, per_class: int) -> Path:
    """A few of each class's images (symlinks), for the dry run."""
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for folder in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            target = root / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                (target / image.name).symlink_to(image.resolve())
    return root


def measure_finetune(args, settings: dict, scratch: Path, say) -> dict:
    """(d) resfit's defaults on flowers5 from the Imagenette sources: head stage + 2 epochs."""
    results = {}
    data = scratch / "flowers5-subset" if args.dry_run else Path(args.shared) / "data" / "flowers5"
    for model_name in settings["models"]:
        weights = Path(args.shared) / "weights" / f"{model_name}-imagenette.pth"
        extra = dict(img_size=32, batch_size=8, num_workers=0) if args.dry_run else {}
        config = TrainConfig(
            data=str(data),
            model=model_name,
            weights=str(weights),
            epochs=settings["finetune_epochs"],
            device=args.device,
            out=str(scratch / f"run-{model_name}"),
            quiet=True,
            **extra,
        )
        lines: list[str] = []
        started = time.perf_counter()
        result = train(config, say=lines.append)
        seconds = time.perf_counter() - started
        head = result.history[0]
        results[model_name] = {
            "val_accuracy": result.metrics["accuracy"],
            "head_stage_val_accuracy": head["val_acc"],
            "best_epoch": result.best_epoch,
            "seconds": seconds,
            "head_stage_seconds": head["seconds"],
            "epoch_images_per_s": [row.get("images_per_s") for row in result.history[1:]],
            "img_size": config.img_size,
            "batch_size": config.batch_size,
            "num_workers": config.num_workers,
            "device_line": next((line for line in lines if line.startswith("device:")), ""),
            "reference": REFERENCE[model_name],
        }
        say(f"{model_name} fine-tune: val acc {result.metrics['accuracy']:.4f} in {seconds:.0f}s")
    return results


def settings_for(args) -> dict:
    if args.dry_run:
        return dict(
            models=("resnet50",),
            size=32,
            batch=4,
            steps=2,
            real_steps=2,
            warmup=1,
            infer_calls=2,
            latency_calls=3,
            finetune_epochs=1,
        )
    runtime = resolve_runtime(args.device, "auto")
    return dict(
        models=MODELS,
        size=224,
        batch=default_batch_size(runtime, 224),
        steps=30,
        real_steps=40,
        warmup=3,
        infer_calls=20,
        latency_calls=100,
        finetune_epochs=2,
    )


def format_table(report: dict) -> str:
    models = report["settings"]["models"]
    training, inference, finetune = (
        report.get("training", {}),
        report.get("inference", {}),
        report.get("finetune", {}),
    )
    rows: list[tuple[str, list[str]]] = []

    def add(name: str, values: list) -> None:
        rows.append((name, [v if isinstance(v, str) else "-" if v is None else f"{v:.1f}" for v in values]))

    paths = training.get("paths", {})
    labels = [
        ("eager synthetic", "train img/s, eager fp32 NCHW, synthetic"),
        (
            "autocast synthetic",
            f"train img/s, AMP {training.get('precision', '')} + channels_last, synthetic",
        ),
        ("resfit synthetic", "train img/s, resfit step, synthetic (ceiling)"),
        ("resfit synthetic cudnn.benchmark", "  same, torch.backends.cudnn.benchmark on"),
        (
            "resfit real decoded-cache auto",
            f"train img/s, resfit step, real photos, {training.get('workers')} workers",
        ),
        ("resfit real decoded-cache on", "  same, decoded-image cache on"),
    ]
    for key, name in labels:
        add(name, [paths.get(m, {}).get(key) for m in models])
    rows.append(
        (
            "AMP + channels_last speed-up over eager",
            [f"{paths[m]['amp_speedup']:.2f}x" if m in paths else "-" for m in models],
        )
    )
    rows.append(
        (
            "pipeline keeps (real / synthetic, resfit step)",
            [f"{100 * paths[m]['pipeline_share']:.0f}%" if m in paths else "-" for m in models],
        )
    )
    for mode, rate in training.get("loader_alone", {}).items():
        add(f"loader alone img/s, decoded cache {mode} (no model)", [rate] * len(models))
    for key in sorted({k for row in inference.values() for k in row if k.startswith("images_per_s")}):
        add(
            f"inference img/s, {key.removeprefix('images_per_s_')}",
            [inference.get(m, {}).get(key) for m in models],
        )
    add(
        "inference latency ms, batch 1, median",
        [inference.get(m, {}).get("latency_ms_median") for m in models],
    )
    add("inference latency ms, batch 1, p90", [inference.get(m, {}).get("latency_ms_p90") for m in models])
    rows.append(
        (
            "fine-tune flowers5: head stage -> final val acc",
            [
                f"{finetune[m]['head_stage_val_accuracy']:.3f} -> {finetune[m]['val_accuracy']:.3f}"
                if m in finetune
                else "-"
                for m in models
            ],
        )
    )
    add(
        "fine-tune seconds (head stage + epochs + evaluation)",
        [finetune.get(m, {}).get("seconds") for m in models],
    )
    width = max(len(name) for name, _ in rows)
    lines = [" | ".join([f"{'':<{width}}", *(f"{m:>18}" for m in models)])]
    lines += [" | ".join([f"{name:<{width}}", *(f"{v:>18}" for v in values)]) for name, values in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="a couple of steps of everything, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip the sections left after this")
    parser.add_argument("--tests-log", help="the CUDA tests' output, summarised into the JSON")
    parser.add_argument("--tests-rc", type=int)
    args = parser.parse_args()
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    runtime = resolve_runtime(args.device, "auto")
    apply_device(runtime)
    say(f"device: {runtime.describe()}")
    settings = settings_for(args)
    report: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "runtime": runtime.to_dict(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "flags": {
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
        },
        "settings": settings,
        "skipped": [],
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%MZ")
    out = out_dir / f"gpu_check-{'dry-run-' if args.dry_run else ''}{stamp}.json"

    def save() -> None:  # after every section: a run cut short by its time limit keeps what it measured
        report["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    if args.tests_log and Path(args.tests_log).is_file():
        tail = Path(args.tests_log).read_text().strip().splitlines()
        report["tests"] = {"rc": args.tests_rc, "summary": tail[-1] if tail else ""}
    with tempfile.TemporaryDirectory(prefix="resfit-gpu-check-") as scratch:
        os.environ["RESFIT_CACHE"] = str(Path(scratch) / "cache")  # cold caches: nothing reused from before
        flowers = Path(args.shared) / "data" / "flowers5"
        if args.dry_run:  # a few images: the decoded-image cache of all 3,457 would take a while on a CPU
            flowers = subset(flowers, Path(scratch) / "flowers5-subset", per_class=6)
        source, _ = load_dataset(flowers, progress=False)
        sections = [
            ("training", lambda: measure_training(args, settings, source, say)),
            ("inference", lambda: measure_inference(args, settings, say)),
            ("finetune", lambda: measure_finetune(args, settings, Path(scratch), say)),
        ]
        for name, measure in sections:
            if time.perf_counter() - started > args.budget_s:
                report["skipped"].append(f"{name}: over the {args.budget_s:.0f} s budget")
                continue
            try:
                report[name] = measure()
            except Exception as error:  # noqa: BLE001 - one failed section (e.g. out of memory) must not lose the rest
                report.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
                say(f"{name} failed: {report['errors'][name]}")
            save()
    save()
    print()
    print(
        f"{runtime.describe()}; torch {torch.__version__}; {settings['size']} px, batch {settings['batch']}"
    )
    print(format_table(report))
    if report["skipped"]:
        print("skipped: " + "; ".join(report["skipped"]))
    for name, error in report.get("errors", {}).items():
        print(f"failed: {name}: {error}")
    print(f"\nwritten: {out}")
    if report.get("errors"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
