"""Which inference engines obey the AVX2 stand-in (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)?

    python benchmarks/isa_cap.py [--arch resnet50] [--threads 1] [--rounds 3] [--batches 4]

The stand-in caps oneDNN and ATen at AVX2 on a CPU that has AVX-512, so that a ratio measured here stands for
an AVX2-only laptop. It is only fair for an engine that obeys it: an engine that ignores it keeps running
AVX-512 kernels, and its speed-up over a capped eager PyTorch would be inflated. Each engine is timed in a
fresh process with and without the cap (ResNet-50 at 224 px, batch 16 of real photos), the two settings
taking turns over --rounds; an engine whose capped/uncapped time ratio stays near 1 ignores the cap.
Writes JSON (provenance.record) to benchmarks/results/isa_cap-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import provenance  # noqa: E402

ENGINES = ("torch-eager-fp32", "onnxruntime-fp32", "openvino-fp32")
STAND_IN = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def child(engine: str, run: Path, cache: Path, threads: int, batches: int) -> None:
    """Time one engine in this process and print seconds per batch (the median of ``batches``)."""
    import numpy as np
    import torch

    from resfit.inference.classifier import Classifier
    from resfit.inference.engines import OnnxRuntimeBackend, OpenVinoBackend
    from resfit.inference.export_cache import LoadedRun, cached_export

    torch.set_num_threads(threads)
    classifier = Classifier.load(run, backend="torch", precision="fp32")
    photos = sorted(str(p) for p in (provenance.REPO.parent / "shared/data/hymenoptera/val").rglob("*.jpg"))
    batch = classifier.preprocess(photos[:16])
    if engine == "torch-eager-fp32":
        model = classifier.model.to(memory_format=torch.contiguous_format).eval()

        def call(x: np.ndarray):
            with torch.inference_mode():
                return model(torch.from_numpy(x))

    elif engine == "onnxruntime-fp32":
        call = OnnxRuntimeBackend(cached_export(LoadedRun.read(run), "onnx", cache), threads)
    else:
        call = OpenVinoBackend(
            cached_export(LoadedRun.read(run), "openvino", cache), threads, "fp32", "LATENCY"
        )
    call(batch)  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    print(json.dumps({"seconds_per_batch": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "RUN", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, run, cache = args.child
        child(engine, Path(run), Path(cache), args.threads, args.batches)
        return

    from inference_backends import make_run

    from resfit.inference.export_cache import LoadedRun, cached_export

    base_env = {k: v for k, v in os.environ.items() if k not in STAND_IN}
    settings = {"native": base_env, "avx2 stand-in": {**base_env, **STAND_IN}}
    with tempfile.TemporaryDirectory(prefix="resfit-isa-") as work:
        run = make_run(args.arch, Path(work) / "runs")
        cache = Path(work) / "cache"
        loaded = LoadedRun.read(run)
        for fmt in ("onnx", "openvino"):
            cached_export(loaded, fmt, cache)
        seconds = {(e, s): [] for e in ENGINES for s in settings}
        for round_index in range(args.rounds):
            for engine in ENGINES:
                for name, env in settings.items():
                    command = [
                        sys.executable,
                        __file__,
                        "--threads",
                        str(args.threads),
                        "--batches",
                        str(args.batches),
                        "--child",
                        engine,
                        str(run),
                        str(cache),
                    ]
                    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                    value = json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_batch"]
                    seconds[(engine, name)].append(value)
                    print(f"round {round_index + 1} {engine:<18} {name:<14} {value:.3f} s/batch", flush=True)
    rows = []
    print(f"\n{'engine':<18} {'native s/batch':>15} {'stand-in s/batch':>17} {'stand-in / native':>18}")
    for engine in ENGINES:
        native = statistics.median(seconds[(engine, "native")])
        capped = statistics.median(seconds[(engine, "avx2 stand-in")])
        rows.append(
            {
                "engine": engine,
                "native_s": native,
                "stand_in_s": capped,
                "slowdown": capped / native,
                "all_native_s": seconds[(engine, "native")],
                "all_stand_in_s": seconds[(engine, "avx2 stand-in")],
            }
        )
        print(f"{engine:<18} {native:>15.3f} {capped:>17.3f} {capped / native:>17.2f}x")
    out = provenance.REPO / "benchmarks" / "results" / f"isa_cap-{args.arch}-{provenance.stamp()}.json"
    settings_note = {
        "arch": args.arch,
        "img_size": 224,
        "batch": 16,
        "threads": args.threads,
        "rounds": args.rounds,
        "batches": args.batches,
        "stand_in": STAND_IN,
    }
    out.write_text(json.dumps({**provenance.record(), "settings": settings_note, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
