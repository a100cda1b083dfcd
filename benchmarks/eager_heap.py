"""How much of eager fp32 PyTorch's inference speed depends on glibc's heap: the eager loop a user writes,
each time in a fresh process, with glibc's default malloc settings and with large buffers kept on the heap.

    python benchmarks/eager_heap.py [--processes 3] [--repeats 3] [--calls 2] [--batch 16]

Both settings take turns, one fresh process each, so a change in the machine's load falls on both alike.
The model is the shared ResNet-50 source as a 224 px run (as in inference_backends.py), the batch real
ants/bees photos spaced over the sorted list. The JSON (with provenance) goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from inference_backends import REPO, eager_in_own_process, load_photos, make_run
from provenance import record, stamp

from resfit.hardware import detect_cpu
from resfit.inference.classifier import Classifier

# glibc's own variables: allocations up to 4 GB come from the heap, and freed memory stays mapped
KEPT_ON_HEAP = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "8000000000"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per process")
    parser.add_argument("--calls", type=int, default=2, help="batches per round")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    threads = detect_cpu().physical_cores
    settings = {"glibc defaults": {}, "large buffers kept on the heap": KEPT_ON_HEAP}
    rates: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="resfit-heap-") as work:
        run = make_run("resnet50", Path(work) / "runs")
        _, photos = load_photos(Classifier.load(run, backend="torch", precision="fp32"), args.batch, 0)
        saved = Path(work) / "batch.npy"
        np.save(saved, np.ascontiguousarray(photos[: args.batch]))
        for process in range(args.processes):
            for name, variables in settings.items():
                environ = {k: v for k, v in os.environ.items() if k not in KEPT_ON_HEAP} | variables
                measured = eager_in_own_process(run, saved, args.calls, args.repeats, threads, environ)
                rates[name] += measured
                print(
                    f"process {process + 1}, {name}: {', '.join(f'{r:.1f}' for r in measured)} img/s",
                    flush=True,
                )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:<32} median {medians[name]:.1f} img/s ({min(values):.1f}-{max(values):.1f})")
    ratio = medians["large buffers kept on the heap"] / medians["glibc defaults"]
    print(f"kept on the heap / glibc defaults: {ratio:.2f}x")
    out = REPO / "benchmarks" / "results" / f"eager_heap-{stamp()}.json"
    report = {**record(), "args": vars(args), "threads": threads, "variables": KEPT_ON_HEAP}
    report |= {"images_per_second": rates, "medians": medians, "ratio": ratio}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
