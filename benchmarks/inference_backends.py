"""CPU inference side by side, in one run: eager fp32 PyTorch against every backend and precision, and `auto`.

    python benchmarks/inference_backends.py [--archs resnet50,resnet101] [--batch 16] [--repeats 5]
        [--emulated] [--score-images 200] [--flowers-every 8] [--score-rows all|default] [--json PATH]

The models are the Imagenette sources in ../shared/weights (10 classes) written as resfit run folders
at 224 px (and any trained run folders given with --runs, at their own size), so every backend goes through the same path as `resfit predict` (Classifier.load, on-the-fly
export to the cache). Throughput is images/s at the given batch on real photos (hymenoptera val),
the median of --repeats rounds; the configurations take turns within each round, so a noisy moment
hits all of them alike. The baseline is the eager fp32 loop a user writes, timed in a process of its own
before and after those rounds: in this process the heap left by decoding and by the other engines changes
how glibc maps eager PyTorch's large activations (9.2 against 16.5 img/s for the same loop in two runs);
the same loop timed in this process is its own row and the reference the agreement is scored against. Top-1 agreement and max |logit difference| are against eager fp32 PyTorch on
hymenoptera photos (train + val: --score-images of the ~400, evenly spaced; 0 = all) and every
--flowers-every-th flowers5 photo, a stricter test with a 10-class head than with 2 or 5 classes. The last
row is what `resfit serve` runs once its background int8 verdict is in, and batch `predict` once a verdict is
cached (auto with the gated int8 IR timed too; classifier.int8_plan). int8 is calibrated on hymenoptera train
photos, so its agreement includes them. Every shared photo:
`--score-images 0 --flowers-every 1`; `--score-rows default` then scores only the two default rows (the others
keep their speed and show no agreement), which keeps that run within minutes. Each row also gives its
fp32-equivalent arithmetic rate (forward GFLOP per image x images/s) as a fraction of the CPU's measured
fp32 matmul rate (benchmarks/cpu_yardstick.py): near 1, no fp32 engine can go much faster.
ONNX Runtime ignores the AVX2 stand-in (benchmarks/isa_cap.py): under it, `--hide onnxruntime` keeps it
out of auto's candidates, so that the default's figure is an AVX2 figure (its own row is still timed). On a CPU without native bf16 the bf16 configurations (emulated, several times
slower than fp32) are left out unless --emulated asks for them. The JSON (machine, commit, command, rows)
goes to benchmarks/results/ unless --json names another file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from cpu_yardstick import forward_gflop_per_image, matmul_gflops  # noqa: E402
from provenance import record, stamp  # noqa: E402

from resfit.data.transforms import Preprocessing  # noqa: E402
from resfit.errors import ResfitError  # noqa: E402
from resfit.hardware import detect_cpu  # noqa: E402
from resfit.inference.classifier import Classifier, InferenceConfig  # noqa: E402
from resfit.inference.engines import OnnxRuntimeBackend, OpenVinoBackend, TorchBackend  # noqa: E402
from resfit.inference.export_cache import LoadedRun, cached_export, cached_int8_export  # noqa: E402
from resfit.models import build_model  # noqa: E402
from resfit.run_folder import build_model_meta, write_model  # noqa: E402

BASELINE = "torch eager fp32, own process (baseline)"


@dataclass
class Config:
    label: str
    make: object  # () -> callable(batch) -> logits


def make_run(arch: str, root: Path) -> Path:
    """A run folder holding the Imagenette source as-is (10-class head), preprocessed at 224 px."""
    card = json.loads((SHARED / "weights" / f"{arch}-imagenette.json").read_text())
    state = torch.load(SHARED / "weights" / f"{arch}-imagenette.pth", map_location="cpu", weights_only=True)
    class_names = card["trained_on"]["class_names"]
    model = build_model(arch, len(class_names))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    norm = card["recipe"]["normalisation"]
    preprocessing = Preprocessing(224, 256, tuple(norm["mean"]), tuple(norm["std"]))
    run = root / arch
    run.mkdir(parents=True, exist_ok=True)
    # The photos' folder as the run's data: int8 calibrates on its train split and is checked on val.
    data = {"path": str(SHARED / "data" / "hymenoptera"), "layout": "imagefolder"}
    meta = build_model_meta(arch, class_names, preprocessing, 0.0, data=data, training_config={"seed": 0})
    write_model(run, model, meta)
    return run


def eager_fp32(model: torch.nn.Module):
    """What a user writes: model.eval(), inference_mode, contiguous fp32 tensors."""
    model = model.to(memory_format=torch.contiguous_format).eval()

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch)).numpy()

    return run


def configurations(run: Path, cache: Path, threads: int, with_bf16: bool) -> list[Config]:
    def torch_model():
        return Classifier.load(run, backend="torch", precision="fp32").model

    loaded = LoadedRun.read(run)
    onnx = cached_export(loaded, "onnx", cache)
    ir = cached_export(loaded, "openvino", cache)
    configs = [
        Config("torch eager fp32 (this process)", lambda: eager_fp32(torch_model())),
        Config("torch channels_last fp32", lambda: TorchBackend(torch_model(), "fp32")),
        Config("onnxruntime fp32", lambda: OnnxRuntimeBackend(onnx, threads)),
    ]
    if with_bf16:
        configs.append(
            Config("torch channels_last bf16 autocast", lambda: TorchBackend(torch_model(), "bf16"))
        )
    for precision in ("fp32", "bf16") if with_bf16 else ("fp32",):
        for hint in ("LATENCY", "THROUGHPUT"):
            configs.append(
                Config(
                    f"openvino {precision} {hint}",
                    lambda p=precision, h=hint: OpenVinoBackend(ir, threads, p, h),
                )
            )
    try:
        int8_ir, summary = cached_int8_export(loaded, cache)
        print(f"int8: {summary}", flush=True)
        configs.append(Config("openvino int8 LATENCY", lambda: OpenVinoBackend(int8_ir, threads, "int8")))
    except ResfitError as error:
        print(f"int8 left out: {error}", flush=True)
    return configs


def images_per_second(run_batch, batch: np.ndarray, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        run_batch(batch)
    return calls * len(batch) / (time.perf_counter() - started)


def eager_in_own_process(
    run: Path, saved: Path, calls: int, repeats: int, threads: int, env: dict | None = None
) -> list[float]:
    """Images/s of the eager fp32 loop on the batch ``saved`` (.npy) in a process of its own, as a user's
    script runs it (``env``: its environment, default this one's): in this process the heap has been shaped
    by everything timed and decoded before, and glibc's malloc then maps and unmaps eager PyTorch's large
    activations differently (page faults on every call or none): the same eager loop measured 9.2 and 16.5
    img/s here in two runs of this benchmark."""
    command = [sys.executable, __file__, "--eager-child", str(run), str(saved), "--calls", str(calls)]
    command += ["--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def eager_child(run: Path, saved: Path, calls: int, repeats: int, threads: int) -> None:
    """The child of eager_in_own_process: load the run, warm up, time ``repeats`` rounds, print the rates."""
    torch.set_num_threads(threads)
    run_batch = eager_fp32(Classifier.load(run, backend="torch", precision="fp32").model)
    batch = np.load(saved)
    run_batch(batch)
    run_batch(batch)
    print(json.dumps([images_per_second(run_batch, batch, calls) for _ in range(repeats)]))


def load_photos(classifier: Classifier, count: int, flowers_every: int) -> tuple[list[str], np.ndarray]:
    """The shared photos the agreement is scored on: ``count`` hymenoptera photos spaced evenly over the
    sorted list (0: all ~400), and every ``flowers_every``-th flowers5 photo (0: none)."""
    paths = sorted(str(p) for p in (SHARED / "data" / "hymenoptera").rglob("*.jpg"))
    if 0 < count < len(paths):
        paths = [paths[round(i * len(paths) / count)] for i in range(count)]
    if flowers_every:
        paths += sorted(str(p) for p in (SHARED / "data" / "flowers5").rglob("*.jpg"))[::flowers_every]
    return paths, classifier.preprocess(paths)


def run_photos(run: Path, count: int) -> list[str]:
    """Every photo of a trained run's own data folder (all splits), ``count`` evenly spaced if > 0."""
    data = Path(json.loads((run / "model.json").read_text())["data"]["path"])
    paths = sorted(str(p) for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if 0 < count < len(paths):
        paths = [paths[round(i * len(paths) / count)] for i in range(count)]
    return paths


def say_indented(message: str) -> None:
    """What resfit says while it loads (exports, the engines' timing and its cost), in the log."""
    print(f"  resfit: {message}", flush=True)


def bench_arch(arch: str, args, work: Path, trained: Path | None = None) -> dict:
    """One model side by side: the shared source as a 224 px run (``arch``), or a trained run folder."""
    cpu = detect_cpu()
    threads = cpu.physical_cores
    torch.set_num_threads(threads)
    run = trained or make_run(arch, work / "runs")
    cache = work / "cache"
    # auto times the engines at the batch the caller runs: here the benchmark's own
    auto = Classifier.load(
        run, config=InferenceConfig(cache_dir=str(cache), batch_size=args.batch), say=say_indented
    )
    size = auto.preprocessing.crop_size
    print(
        f"\n== {trained or arch} @{size}, batch {args.batch} ==  auto: {auto.choice.describe()}", flush=True
    )
    # What `resfit serve` runs once its background int8 verdict is in (and batch `predict` once one is
    # cached; where bf16 is emulated it reaches one first): auto with the gated int8 IR timed too.
    serving = Classifier.load(
        run,
        config=InferenceConfig(cache_dir=str(cache), int8="background", batch_size=args.batch),
        say=say_indented,
    )
    serving.reach_int8_verdict(say_indented)
    print(f"serve / batch predict: {serving.choice.describe()}", flush=True)
    if trained is None:
        paths, photos = load_photos(auto, args.score_images, args.flowers_every)
    else:
        paths = run_photos(trained, args.score_images)
        photos = auto.preprocess(paths)
    batch = photos[: args.batch]
    with_bf16 = cpu.native_bf16 or args.emulated
    if not with_bf16:
        print("bf16 configurations left out: this CPU has no native bf16 (--emulated times them)", flush=True)
    configs = configurations(run, cache, threads, with_bf16)
    configs.append(Config(f"auto -> {auto.choice.name} {auto.choice.precision}", lambda: auto.logits))
    configs.append(
        Config(
            f"serve/batch predict -> {serving.choice.name} {serving.choice.precision}",
            lambda: serving.logits,
        )
    )
    runners = {c.label: c.make() for c in configs}
    gflop = forward_gflop_per_image(auto.model, size)
    matmul_samples = [matmul_gflops()]
    saved = work / "eager-batch.npy"
    np.save(saved, np.ascontiguousarray(batch))
    own_process = eager_in_own_process(run, saved, args.calls, args.repeats, threads)
    for runner in runners.values():  # warm-up: first calls compile kernels / allocate
        runner(batch)
        runner(batch)
    rates: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(args.repeats):
        for label, runner in runners.items():
            rates[label].append(images_per_second(runner, batch, args.calls))
    matmul_samples.append(matmul_gflops())  # before and after the timing: the machine drifts
    own_process += eager_in_own_process(run, saved, args.calls, args.repeats, threads)
    matmul = statistics.median(matmul_samples)
    scored = (
        set(runners) if args.score_rows == "all" else {configs[0].label, configs[-2].label, configs[-1].label}
    )
    # A run with a feature-based "unknown" rule has PyTorch's model output its pooled features after the
    # logits; the answers are the first len(class_names) columns of every engine's output.
    classes = len(json.loads((run / "model.json").read_text())["class_names"])
    reference = np.concatenate(
        [runners[configs[0].label](photos[i : i + 32]) for i in range(0, len(photos), 32)]
    )[:, :classes]
    base = statistics.median(own_process)
    rows = [
        {
            "config": BASELINE,
            "ignores_isa_cap": False,
            "images_per_s": base,
            "min": min(own_process),
            "max": max(own_process),
            "speedup": 1.0,
            "of_matmul_rate": base * gflop / matmul,
            "top1_agreement": None,
            "max_abs_logit_diff": None,
        }
    ]
    for label, runner in runners.items():
        rate = statistics.median(rates[label])
        logits = None
        if label in scored:
            outputs = [runner(photos[i : i + 32]) for i in range(0, len(photos), 32)]
            logits = np.concatenate(outputs)[:, :classes]
        rows.append(
            {
                "config": label,
                # ONNX Runtime's kernels ignore ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY (benchmarks/isa_cap.py):
                # under the AVX2 stand-in its figures are still AVX-512 figures.
                "ignores_isa_cap": bool(cpu.isa_cap) and "onnxruntime" in label,
                "images_per_s": rate,
                "min": min(rates[label]),
                "max": max(rates[label]),
                "speedup": rate / base,
                # fp32-equivalent arithmetic per second against the CPU's measured fp32 matmul rate
                "of_matmul_rate": rate * gflop / matmul,
                "top1_agreement": None
                if logits is None
                else float((logits.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_logit_diff": None if logits is None else float(np.abs(logits - reference).max()),
            }
        )
    print_table(rows, len(paths))
    print(
        f"forward {gflop:.2f} GFLOP per image; fp32 matmul rate {matmul:.0f} GFLOP/s "
        f"(median of {', '.join(f'{m:.0f}' for m in matmul_samples)}, 4096x4096, {threads} threads)"
    )
    auto_row = rows[-2]
    print(
        f"{arch}: default backend ({auto.choice.name} {auto.choice.precision}) / eager fp32 = "
        f"{auto_row['speedup']:.2f}x ({auto_row['images_per_s']:.1f} vs {base:.1f} images/s), "
        f"top-1 agreement {auto_row['top1_agreement']:.2%} on {len(paths)} photos",
        flush=True,
    )
    serve_row = rows[-1]
    print(
        f"{arch}: serve / batch predict ({serving.choice.name} {serving.choice.precision}) / eager fp32 = "
        f"{serve_row['speedup']:.2f}x, top-1 agreement {serve_row['top1_agreement']:.2%} on {len(paths)} photos",
        flush=True,
    )
    return {
        "arch": arch,
        "run": str(trained) if trained else f"the shared {arch} source as a 224 px run",
        "crop_size": size,
        "auto": auto.choice.describe(),
        "serve_and_batch_predict": serving.choice.describe(),
        "rows": rows,
        "forward_gflop_per_image": gflop,
        "matmul_gflops": {"samples": matmul_samples, "median": matmul},
        "photos": len(paths),
        "photo_sets": {"hymenoptera": args.score_images or "all", "flowers5_every": args.flowers_every},
    }


def print_table(rows: list[dict], photos: int) -> None:
    print(
        f"{'configuration':<40} {'images/s':>9} {'(min-max)':>13} {'x eager':>8} {'of matmul':>9} "
        f"{'top-1 agree':>12} {'max|dlogit|':>11}"
    )
    for row in rows:
        spread = f"{row['min']:.1f}-{row['max']:.1f}"
        scored = row["top1_agreement"] is not None
        agreement = (
            f"{row['top1_agreement']:>11.2%} {row['max_abs_logit_diff']:>11.2e}" if scored else f"{'-':>11}"
        )
        print(
            f"{row['config']:<40} {row['images_per_s']:>9.1f} {spread:>13} {row['speedup']:>7.2f}x "
            f"{row['of_matmul_rate']:>8.0%} {agreement}"
            + ("  (ignores the ISA cap: not an AVX2 figure)" if row["ignores_isa_cap"] else "")
        )
    print(f"(top-1 agreement and logit difference vs eager fp32 on {photos} shared photos)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="resnet50,resnet101")
    parser.add_argument("--eager-child", nargs=2, metavar=("RUN", "NPY"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--runs",
        default="",
        help="also trained run folders (comma-separated), at their own size, scored on every photo of their "
        "data (--score-images of them if > 0); --archs '' for these alone",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is reported")
    parser.add_argument("--calls", type=int, default=2, help="batches timed per configuration per round")
    parser.add_argument(
        "--score-images", type=int, default=200, help="photos the agreement is scored on (0 = all ~400)"
    )
    parser.add_argument(
        "--flowers-every", type=int, default=8, help="also score every N-th flowers5 photo (0 = none)"
    )
    parser.add_argument(
        "--score-rows",
        choices=("all", "default"),
        default="all",
        help="default: score the agreement of the two default rows only (with every photo, minutes not hours)",
    )
    parser.add_argument("--emulated", action="store_true", help="also time bf16 on a CPU without native bf16")
    parser.add_argument(
        "--json", help="where the results go (default benchmarks/results/inference_backends-*.json)"
    )
    parser.add_argument(
        "--hide", default="", help="engines auto must not pick (comma-separated; e.g. onnxruntime)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.eager_child:
        eager_child(
            Path(args.eager_child[0]), Path(args.eager_child[1]), args.calls, args.repeats, args.threads
        )
        return
    hidden = {name.strip() for name in args.hide.split(",") if name.strip()}
    if hidden:
        import resfit.inference.engines as engines

        installed = engines.is_available
        engines.is_available = lambda name: name not in hidden and installed(name)
        print(f"auto's candidates leave out: {', '.join(sorted(hidden))} (--hide)")
    import onnxruntime
    import openvino

    cpu = detect_cpu()
    print(f"CPU: {cpu.describe()}")
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), onnxruntime "
        f"{onnxruntime.__version__}, openvino {openvino.__version__}; {cpu.physical_cores} threads; "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="resfit-bench-") as work:
        for arch in args.archs.split(","):
            if arch.strip():
                results.append(bench_arch(arch.strip(), args, Path(work)))
        for trained in filter(None, args.runs.split(",")):
            meta = json.loads((Path(trained) / "model.json").read_text())
            results.append(bench_arch(meta["architecture"], args, Path(work), Path(trained)))
    out = (
        Path(args.json)
        if args.json
        else REPO / "benchmarks" / "results" / f"inference_backends-{stamp()}.json"
    )
    report = {**record(), "hidden_from_auto": sorted(hidden), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
