#!/usr/bin/env bash
# The CUDA path checked and measured on one GPU, in under 8 minutes (about 4 expected):
#   1. installs resfit (pip --no-deps -e .: the machine's CUDA torch and torchvision stay) and only the
#      missing packages that training, the tests and the benchmark import;
#   2. runs tests/test_cuda.py (a run on cuda:0 end to end, the device index honoured, fp16 resume exactness,
#      bf16 only where the GPU has it, --sync-bn on CUDA) and tests/test_device_unit.py (the same logic, mocked);
#   3. runs benchmarks/gpu_check.py: training images/s (eager fp32 vs AMP + channels_last vs resfit's step,
#      synthetic tensors vs real photos through resfit's loader), inference images/s and batch-1 latency,
#      and a head stage + 2 epochs fine-tune on flowers5 with its accuracy, for ResNet-50 and ResNet-101.
# Writes gpu_check-<time>.json and the tests' log into $OUT if set, else benchmarks/results/; prints one table.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, ../shared beside it (or RESFIT_SHARED)
#   PYTHON=python3.11 bash benchmarks/gpu_check.sh
# Extra arguments go to gpu_check.py (e.g. --device cuda:1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${RESFIT_SHARED:-}" ]; then SHARED=$RESFIT_SHARED
elif [ -d ../shared/data ]; then SHARED=../shared
else SHARED=shared
fi
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
started=$SECONDS

"$PYTHON" - <<'PY'
import torch
import torchvision

print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device; this check needs a GPU")
print(f"{torch.cuda.device_count()} GPU(s); cuda:0 is {torch.cuda.get_device_name(0)}")
PY

# resfit itself, never its dependencies: pip must not replace the CUDA torch with another build.
if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    && ! "$PYTHON" -m pip install -q --no-deps -e .; then
    echo "gpu_check: editable install failed; using src/ on PYTHONPATH"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Only what is missing of what training, the tests and the benchmark import (not the export/serve extras).
missing=$("$PYTHON" - <<'PY'
import importlib.util

needed = {"numpy": "numpy", "PIL": "pillow", "safetensors": "safetensors", "sklearn": "scikit-learn",
          "matplotlib": "matplotlib", "tqdm": "tqdm", "pytest": "pytest"}
print(" ".join(package for module, package in needed.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: installing $missing"
    "$PYTHON" -m pip install -q $missing || echo "gpu_check: could not install $missing; going on"
fi
echo "gpu_check: set up in $((SECONDS - started)) s"

set +e
RESFIT_SHARED="$SHARED" timeout 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda.py tests/test_device_unit.py 2>&1 | tee "$OUT_DIR/gpu_check-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_rc after $((SECONDS - started)) s"

timeout 270 "$PYTHON" benchmarks/gpu_check.py --shared "$SHARED" --out-dir "$OUT_DIR" --budget-s 200 \
    --tests-log "$OUT_DIR/gpu_check-tests.log" --tests-rc "$tests_rc" "$@"
bench_rc=$?
set -e
echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc, $((SECONDS - started)) s in all"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
