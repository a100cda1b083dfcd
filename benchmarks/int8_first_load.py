"""What gated int8 costs the first time a model is loaded, by NNCF ranking-subset size, side by side.

    python benchmarks/int8_first_load.py RUN_DIR [--ranking none,50] [--batch 16] [--repeats 5]

Each ranking size quantizes the run's model from nothing (a fresh export cache), exactly as `serve` does
at its first load (export_cache.cached_int8_export: calibration, accuracy control where plain int8 flips
too many validation answers, the gate on validation and held-out training images), and reports the wall
time, the gate's verdict, how many quantizers stayed int8, and the int8 IR's images/s at --batch against
the fp32 IR's (same photos, alternating rounds, medians). "none" is NNCF's own choice (every validation
image). Run it where nothing else runs; under the AVX2 stand-in set ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2. The JSON (machine, commit, command) goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from provenance import record, stamp

from resfit.data.transforms import Preprocessing
from resfit.errors import ExportError
from resfit.hardware import apply_threads, resolve_runtime
from resfit.inference.engines import OpenVinoBackend
from resfit.inference.export_cache import LoadedRun, cached_export, cached_int8_export, run_images

REPO = Path(__file__).resolve().parents[1]


def fake_quantize_count(ir: Path) -> int:
    import openvino as ov

    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(ir)).get_ops())


def throughput(engines: dict, batch: np.ndarray, repeats: int, calls: int = 4) -> dict[str, float]:
    """images/s of each engine on ``batch``, the engines taking turns in every round; medians."""
    rates = {name: [] for name in engines}
    for engine in engines.values():
        engine(batch)  # warm-up: compiled kernels, allocations
    for _ in range(repeats):
        for name, engine in engines.items():
            started = time.perf_counter()
            for _ in range(calls):
                engine(batch)
            rates[name].append(calls * len(batch) / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained resfit run folder whose data is on this machine")
    parser.add_argument("--ranking", default="none,50", help="comma-separated ranking sizes; none = NNCF's")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runtime = resolve_runtime("cpu", "fp32")
    apply_threads(runtime)
    print(f"device: {runtime.describe()}", flush=True)
    run = LoadedRun.read(args.run)
    prep = Preprocessing.from_dict(run.meta["preprocessing"]).eval_transform()
    photos = [prep(image) for _, image in run_images(run.meta, "val", args.batch, "time int8 on")]
    batch = torch.stack(photos).numpy()
    rows = []
    out = REPO / "benchmarks" / "results" / f"int8_first_load-{stamp()}.json"
    for value in args.ranking.split(","):
        ranking = None if value == "none" else int(value)
        with tempfile.TemporaryDirectory(prefix="int8-first-load-") as cache:
            started = time.perf_counter()
            try:
                int8_ir, summary = cached_int8_export(run, Path(cache), print, ranking_images=ranking)
                kept = True
            except ExportError as refused:
                int8_ir, summary, kept = None, str(refused), False
            seconds = time.perf_counter() - started
            verdict = json.loads(next(Path(cache).glob("exports/*/model-int8.json")).read_text())
            row = {
                "ranking_images": value,
                "first_load_s": round(seconds, 1),
                "quantize_s": verdict.get("quantize_seconds"),
                "kept": kept,
                "summary": summary,
                "agreement": verdict["agreement"],
                "images": verdict["images"],
            }
            if kept:
                fp32_ir = cached_export(run, "openvino", Path(cache))
                row["quantizers"] = {"int8": fake_quantize_count(int8_ir)}
                engines = {
                    "openvino fp32": OpenVinoBackend(fp32_ir, runtime.threads, "fp32"),
                    "openvino int8": OpenVinoBackend(int8_ir, runtime.threads, "int8"),
                }
                row["images_per_s"] = throughput(engines, batch, args.repeats)
                row["int8_x_fp32"] = (
                    row["images_per_s"]["openvino int8"] / row["images_per_s"]["openvino fp32"]
                )
        rows.append(row)
        print(json.dumps(row), flush=True)
        report = {
            "benchmark": "int8_first_load",
            "args": vars(args),
            "device": runtime.describe(),
            "rows": rows,
        }
        out.write_text(json.dumps(report | {"provenance": record()}, indent=2) + "\n")  # after every row
    print("\nranking images | first load s | kept | int8 quantizers | int8 / fp32 OpenVINO img/s")
    for row in rows:
        speed = f"{row['int8_x_fp32']:.2f}x" if row["kept"] else "-"
        quantizers = row.get("quantizers", {}).get("int8", "-")
        print(
            f"{row['ranking_images']:>14} | {row['first_load_s']:>12.0f} | {row['kept']!s:>4} | {quantizers:>15} | {speed}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
