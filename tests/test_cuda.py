"""The CUDA path on a real GPU: a run on cuda:N trains there, fp16 resumes exactly, bf16 only where the GPU
has it, --sync-bn on CUDA. Skipped without a GPU (benchmarks/gpu_check.sh runs them on one); the same
logic is tested on CPU, with torch.cuda mocked, in tests/test_device_unit.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_device_unit import TINY_RUN, final_state, interrupt_and_resume

from resfit.errors import ConfigError
from resfit.hardware import Runtime, gpu_has_native_bf16, resolve_runtime
from resfit.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WEIGHT_TOLERANCE = 1e-4  # fp16 kernels, run twice on one GPU with deterministic cuDNN


def _config(data, out, **flags) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), seed=2, quiet=True, **(TINY_RUN | flags))


def test_a_run_on_cuda0_trains_on_cuda0(tiny_imagefolder, tmp_path):
    torch.cuda.reset_peak_memory_stats(0)
    lines: list[str] = []
    result = train(_config(tiny_imagefolder, tmp_path / "run", device="cuda:0", epochs=3), say=lines.append)
    assert torch.cuda.max_memory_allocated(0) > 0
    assert any(f"CUDA cuda:0 ({torch.cuda.get_device_name(0)})" in line for line in lines), lines[:3]
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["runtime"]["device"] == "cuda:0"
    assert meta["precision"] == ("bf16" if gpu_has_native_bf16("cuda:0") else "fp16")
    assert result.metrics["accuracy"] >= 0.75  # red vs blue: learnt in three epochs


def test_the_gpu_index_asked_for_is_used(tiny_imagefolder, tmp_path):
    last = torch.cuda.device_count() - 1
    with pytest.raises(ConfigError, match=f"cuda:0..cuda:{last}"):
        resolve_runtime(f"cuda:{last + 1}")
    if last == 0:
        pytest.skip("one GPU: cuda:1 cannot be told apart from cuda:0 here")
    for index in range(last + 1):
        torch.cuda.reset_peak_memory_stats(index)
    train(_config(tiny_imagefolder, tmp_path / "run", device=f"cuda:{last}", epochs=1), say=lambda _: None)
    assert torch.cuda.max_memory_allocated(last) > 0
    assert all(torch.cuda.max_memory_allocated(i) == 0 for i in range(last)), "another GPU was used"


def test_fp16_resume_is_the_exact_continuation(tiny_imagefolder, tmp_path, monkeypatch):
    """A scale that grows every step overflows and backs off now and then, skipping steps: the resumed run
    must skip the same ones, so it needs the interrupted run's loss scale."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(
        Runtime,
        "grad_scaler",
        lambda self: torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_interval=1),
    )
    flags = dict(device="cuda:0", precision="fp16", epochs=3, batch_size=8)
    train(_config(tiny_imagefolder, tmp_path / "whole", **flags), say=lambda _: None)
    after_one, _ = interrupt_and_resume(_config(tiny_imagefolder, tmp_path / "cut", **flags))
    assert after_one["scaler"]["scale"] != 2.0**16  # the scale moved in epoch 1: a fresh one would differ
    (whole, whole_weights), (cut, cut_weights) = (
        final_state(tmp_path / "whole"),
        final_state(tmp_path / "cut"),
    )
    assert cut["epoch"] == whole["epoch"] == 3
    assert cut["scaler"] == whole["scaler"]
    worst = max(float((cut_weights[k].double() - v.double()).abs().max()) for k, v in whole_weights.items())
    assert worst <= WEIGHT_TOLERANCE, worst
    assert cut["history"][-1]["val_acc"] == whole["history"][-1]["val_acc"]


def test_bf16_only_on_a_gpu_that_has_it():
    major, minor = torch.cuda.get_device_capability(0)
    if major >= 8:
        assert resolve_runtime("cuda:0").precision == "bf16"
        runtime = resolve_runtime("cuda:0", "bf16")
        with runtime.autocast():
            product = torch.randn(64, 64, device="cuda:0") @ torch.randn(64, 64, device="cuda:0")
        assert product.dtype == torch.bfloat16
    else:
        assert resolve_runtime("cuda:0").precision == "fp16"
        with pytest.raises(ConfigError, match=f"compute capability {major}.{minor}"):
            resolve_runtime("cuda:0", "bf16")


def test_sync_bn_in_one_cuda_process_is_accepted(tiny_imagefolder, tmp_path):
    lines: list[str] = []
    train(
        _config(tiny_imagefolder, tmp_path / "run", device="cuda:0", epochs=1, bn="train", sync_bn=True),
        say=lines.append,
    )
    assert any("--sync-bn has no effect in a single process" in line for line in lines)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_on_two_gpus_with_sync_bn(tiny_imagefolder, tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "resfit", "train", str(tiny_imagefolder), "--model", "resnet18", "--weights", "none"]
    command += ["--epochs", "1", "--img-size", "32", "--batch-size", "8", "--bn", "train", "--sync-bn"]
    command += ["--device", "cuda", "--quiet", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: 2 processes (nccl)" in result.stdout
    assert "CUDA cuda:0" in result.stdout  # rank 0 reports its own GPU
