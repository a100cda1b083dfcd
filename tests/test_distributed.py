"""torchrun + DDP on CPU (gloo, loopback): two processes train exactly what one process trains.

With the same global batch and seed, each process takes its half of every global batch, each image's
augmentation is tied to (seed, epoch, index), and the loss is the global-batch mean, so the two runs
differ only by floating-point summation order. Measured here: max |w_ddp - w_single| = 6.5e-6 after two
epochs in fp32; the test allows 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

WEIGHT_TOLERANCE = 1e-4
COMMON = [
    "--model",
    "resnet18",
    "--weights",
    "none",
    "--epochs",
    "2",
    "--img-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--precision",
    "fp32",
    "--seed",
    "3",
    "--quiet",
]


def _env() -> dict:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    return env


def _last_weights(run_dir):
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    tensors = load_file(str(run_dir / "resume" / state["tensors"]))
    return state, {k: v for k, v in tensors.items() if k.startswith("model.")}


@pytest.mark.slow
def test_two_cpu_processes_match_one(tiny_imagefolder, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = subprocess.run(
        [sys.executable, "-m", "resfit", "train", str(tiny_imagefolder), *COMMON, "--out", str(single)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "resfit",
            "train",
            str(tiny_imagefolder),
            *COMMON,
            "--out",
            str(ddp),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in two.stdout
    assert two.stdout.count("epoch  1 finetune") == 1  # only rank 0 reports

    single_state, single_weights = _last_weights(single)
    ddp_state, ddp_weights = _last_weights(ddp)
    assert single_state["epoch"] == ddp_state["epoch"] == 2
    assert single_weights.keys() == ddp_weights.keys()
    worst = max(
        float(abs(single_weights[k].astype("float64") - ddp_weights[k]).max()) for k in single_weights
    )
    assert worst <= WEIGHT_TOLERANCE, worst
    # The run folder has the same shape, written once.
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in ddp.iterdir())
    single_metrics = json.loads((single / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp / "metrics.json").read_text())
    assert ddp_metrics["accuracy"] == single_metrics["accuracy"]
    assert ddp_metrics["num_images"] == single_metrics["num_images"]
