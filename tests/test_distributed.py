"""torchrun + DDP on CPU (gloo, loopback): two processes train exactly what one process trains.

With the same global batch and seed, each process takes its half of every global batch, each image's
augmentation is tied to (seed, epoch, index), and the loss is the global-batch mean, so the two runs
differ only by floating-point summation order. The runs use SGD, whose step is proportional to the
gradient, so a summation-order difference stays that small: AdamW divides by the gradient's running RMS,
so on a weight whose gradient is ~0 a last-bit difference can flip its step's sign and move it by the lr
(1.2e-3 measured on an AMX Xeon, where oneDNN sums 4-image and 8-image batches differently). Measured:
max |w_ddp - w_single| = 1.0e-6 (SGD, Xeon) after two epochs in fp32; the test allows 1e-4. A torchrun run killed (SIGKILL, every process) after epoch 1 and
resumed with `torchrun ... train --resume` ends within the same tolerance of the single process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import _write_learnable_images, kill_after_epoch
from safetensors.numpy import load_file

WEIGHT_TOLERANCE = 1e-4
COMMON = [
    "--resume-every",
    "0",  # a state after every epoch: the kill lands after epoch 1's
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
    "--optimizer",
    "sgd",
]


def _env() -> dict:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    return env


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "resfit",
        "train",
        *args,
    ]


def _train_single(data, out, flags=COMMON):
    one = subprocess.run(
        [sys.executable, "-m", "resfit", "train", str(data), *flags, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert one.returncode == 0, one.stderr


def _max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(abs(a[k].astype("float64") - b[k]).max()) for k in a)


def _last_weights(run_dir):
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    tensors = load_file(str(run_dir / "resume" / state["tensors"]))
    return state, {k: v for k, v in tensors.items() if k.startswith("model.")}


@pytest.mark.slow
def test_two_cpu_processes_match_one(tiny_imagefolder, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train_single(tiny_imagefolder, single)
    two = subprocess.run(
        _torchrun(str(tiny_imagefolder), *COMMON, "--out", str(ddp)),
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
    worst = _max_weight_difference(single_weights, ddp_weights)
    assert worst <= WEIGHT_TOLERANCE, worst
    # The run folder has the same shape, written once.
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in ddp.iterdir())
    single_metrics = json.loads((single / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp / "metrics.json").read_text())
    assert ddp_metrics["accuracy"] == single_metrics["accuracy"]
    assert ddp_metrics["num_images"] == single_metrics["num_images"]


@pytest.mark.slow
def test_killed_torchrun_run_resumes_under_torchrun(tmp_path):
    """SIGKILL to torchrun and both workers after epoch 1, then `torchrun ... train --resume`: the run ends
    where one uninterrupted process ends."""
    # Epochs long enough (about a second) for the kill to land between epoch 1 and epoch 2.
    data = tmp_path / "data"
    _write_learnable_images(data / "train", per_class=48, size=72, seed=0)
    _write_learnable_images(data / "val", per_class=8, size=72, seed=1)
    flags = [*COMMON]
    flags[flags.index("--img-size") + 1] = "64"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train_single(data, single, flags)
    process = subprocess.Popen(
        _torchrun(str(data), *flags, "--out", str(ddp)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    kill_after_epoch(process, ddp, with_children=True)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (ddp / "metrics.json").exists()

    resumed = subprocess.run(
        _torchrun("--resume", str(ddp), "--quiet"), capture_output=True, text=True, timeout=600, env=_env()
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1" in resumed.stdout and "distributed: 2 processes (gloo)" in resumed.stdout
    single_state, single_weights = _last_weights(single)
    ddp_state, ddp_weights = _last_weights(ddp)
    assert ddp_state["epoch"] == single_state["epoch"] == 2
    worst = _max_weight_difference(single_weights, ddp_weights)
    assert worst <= WEIGHT_TOLERANCE, worst
    assert (
        json.loads((ddp / "metrics.json").read_text())["accuracy"]
        == json.loads((single / "metrics.json").read_text())["accuracy"]
    )
