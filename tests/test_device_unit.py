"""The CUDA path's logic, on CPU: device strings, torchrun's per-process GPU, bf16 refusal, the fp16 loss
scale across a resume, and --sync-bn refused off CUDA. torch.cuda is mocked where a GPU would answer;
tests/test_cuda.py runs the same paths on a real GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import resfit.distributed as distributed
from resfit.errors import ConfigError
from resfit.hardware import Runtime, default_num_workers, detect_cpu, parse_device, resolve_runtime
from resfit.train import TrainConfig, resume, train
from resfit.train.state import load_state, restore, save_state

# Two GPUs: cuda:0 an H100-like (compute capability 9.0), cuda:1 a T4-like (7.5, no native bf16).
FAKE_GPUS = {0: ("Fake H100", (9, 0)), 1: ("Fake T4", (7, 5))}


@pytest.fixture
def two_fake_gpus(monkeypatch):
    current = {"index": 0}

    def index_of(device=None) -> int:
        if device is None:
            return current["index"]
        device = torch.device(device)
        return current["index"] if device.index is None else device.index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(FAKE_GPUS))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: FAKE_GPUS[index_of(device)][0])
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: FAKE_GPUS[index_of(device)][1]
    )
    return current


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_device_strings_are_checked():
    assert parse_device("cuda:3") == "cuda:3"
    assert parse_device("cuda:03") == "cuda:3"
    for device in ("auto", "cpu", "cuda"):
        assert parse_device(device) == device
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "cuda1", "mps"):
        with pytest.raises(ConfigError, match="unknown device"):
            parse_device(bad)
    with pytest.raises(ConfigError, match="unknown device"):
        TrainConfig(data="x", device="gpu0").validate()


def test_the_gpu_asked_for_is_the_one_named_and_used(two_fake_gpus):
    runtime = resolve_runtime("cuda:1", "fp16")
    assert runtime.device == "cuda:1" and runtime.device_type == "cuda"
    assert runtime.gpu_name == "Fake T4"
    assert "cuda:1 (Fake T4)" in runtime.describe()
    # Plain "cuda" is the current GPU, written out with its index.
    two_fake_gpus["index"] = 1
    assert resolve_runtime("cuda").device == "cuda:1"
    two_fake_gpus["index"] = 0
    assert resolve_runtime("auto").device == "cuda:0"
    with pytest.raises(ConfigError, match="cuda:0..cuda:1"):
        resolve_runtime("cuda:2")


def test_bf16_only_where_the_gpu_has_it(two_fake_gpus):
    assert resolve_runtime("cuda:0").precision == "bf16"
    assert resolve_runtime("cuda:0", "bf16").precision == "bf16"
    auto = resolve_runtime("cuda:1")
    assert auto.precision == "fp16" and "7.5" in auto.reason  # not emulated bf16
    with pytest.raises(ConfigError, match="no native bf16.*--precision fp16"):
        resolve_runtime("cuda:1", "bf16")
    assert resolve_runtime("cuda:1", "fp32").precision == "fp32"


def test_cuda_asked_for_without_a_gpu_is_refused(no_gpu):
    with pytest.raises(ConfigError, match="--device cuda:0 was asked for but torch sees no CUDA"):
        resolve_runtime("cuda:0")
    assert resolve_runtime("auto", "fp32").device == "cpu"


def test_each_torchrun_process_takes_its_local_rank_gpu(two_fake_gpus):
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.process_device("cuda", env) == "cuda:1"
    assert distributed.process_device("auto", env) == "cuda:1"
    assert distributed.process_device("cpu", env) == "cpu"
    with pytest.raises(ConfigError, match="every process on one GPU"):
        distributed.process_device("cuda:0", env)
    # One process per machine (several machines): an explicit GPU is fine.
    assert (
        distributed.process_device("cuda:1", env | {"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == "cuda:1"
    )
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but only 2 CUDA devices"):
        distributed.process_device("cuda", env | {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"})
    # Without torchrun the flag is resolved as given.
    assert distributed.process_device("cuda", {}) == "cuda"


def test_torchrun_on_cpu_stays_on_cpu(no_gpu):
    assert distributed.process_device("auto", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == "cpu"


def test_loader_workers_on_a_gpu_use_the_cores():
    cpu = replace(detect_cpu(), logical_cpus=16)
    gpu = Runtime("cuda:0", "bf16", "test", 8, cpu, "Fake H100")
    assert default_num_workers(gpu) == 15
    assert default_num_workers(gpu, processes=2) == 7  # torchrun: the cores are shared
    two_cores = replace(cpu, logical_cpus=2)
    assert default_num_workers(replace(gpu, cpu=two_cores)) == 1
    # CPU training keeps its measured rule: no worker on 2 cores.
    assert default_num_workers(Runtime("cpu", "fp32", "test", 1, two_cores)) == 0
    assert default_num_workers(Runtime("cpu", "fp32", "test", 8, cpu)) == 4


def _small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))


def _scaled_step(model, optimizer, scaler) -> None:
    loss = model(torch.randn(2, 3, 8, 8)).float().pow(2).mean()
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_resume_state_keeps_the_loss_scale(tmp_path):
    torch.manual_seed(0)
    model = _small_model()
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(3):
        _scaled_step(model, optimizer, scaler)
    assert scaler.get_scale() == 8192.0
    save_state(tmp_path, 1, model, optimizer, {"history": []}, scaler=scaler)
    assert json.loads((tmp_path / "resume" / "state.json").read_text())["scaler"]["scale"] == 8192.0

    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    state, tensors = load_state(tmp_path)
    other = _small_model()
    other(torch.zeros(1, 3, 8, 8))
    restore(other, None, state, tensors, scaler=fresh)
    assert fresh.get_scale() == 8192.0
    assert fresh.state_dict() == scaler.state_dict()


def test_disabled_scaler_and_old_states_resume_as_before(tmp_path):
    model = _small_model()
    model(torch.zeros(1, 3, 8, 8))
    save_state(tmp_path, 1, model, None, {"history": []}, scaler=torch.amp.GradScaler("cpu", enabled=False))
    state, tensors = load_state(tmp_path)
    assert state["scaler"] == {}
    enabled = torch.amp.GradScaler("cpu", init_scale=512.0)
    restore(model, None, state, tensors, scaler=enabled)  # nothing saved: the scaler keeps its start
    del state["scaler"]  # a state written before the scaler was saved
    restore(model, None, state, tensors, scaler=enabled)
    assert enabled.get_scale() == 512.0


class Interrupted(Exception):
    """Raised from the progress callback: the run stops right after an epoch's state is on disk."""


def interrupt_after_epoch(epoch: int):
    def say(message: str) -> None:
        if message.startswith(f"epoch {epoch:>2} finetune"):
            raise Interrupted

    return say


def final_state(run_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    state, tensors = load_state(run_dir)
    return state, {k: v for k, v in tensors.items() if k.startswith("model.")}


TINY_RUN = dict(
    model="resnet18", weights="none", epochs=2, img_size=32, batch_size=12, num_workers=0, resume_every=0
)


def interrupt_and_resume(config: TrainConfig) -> tuple[dict, dict]:
    """Train ``config``, stopped right after epoch 1's state is written, then resume it to the end: the
    state after epoch 1 and the final one."""
    with pytest.raises(Interrupted):
        train(config, say=interrupt_after_epoch(1))
    after_one, _ = load_state(config.out)
    resume(config.out, say=lambda _: None)
    return after_one, load_state(config.out)[0]


def test_resumed_run_continues_the_loss_scale(tiny_imagefolder, tmp_path, monkeypatch):
    """A loss scale that doubles every step (fp16's grows or backs off in the same way): after a resume it
    goes on from where the interrupted run left it instead of starting again."""
    monkeypatch.setattr(
        Runtime, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    )
    config = TrainConfig(
        data=str(tiny_imagefolder), out=str(tmp_path / "run"), device="cpu", precision="fp32", **TINY_RUN
    )
    after_one, final = interrupt_and_resume(replace(config, head_stage=False, seed=5, quiet=True))
    steps_per_epoch = 24 // 12  # tiny_imagefolder: 24 training images
    assert after_one["epoch"] == 1 and after_one["scaler"]["scale"] == 1024.0 * 2**steps_per_epoch
    assert final["epoch"] == 2 and final["scaler"]["scale"] == 1024.0 * 2 ** (2 * steps_per_epoch)


def test_sync_bn_refused_off_cuda(tiny_imagefolder, tmp_path, no_gpu):
    with pytest.raises(ConfigError, match="--sync-bn is for CUDA"):
        TrainConfig(data=str(tiny_imagefolder), sync_bn=True, device="cpu").validate()
    # --device auto on a machine without a GPU: refused once the device is known, before any run folder.
    with pytest.raises(ConfigError, match="--sync-bn is for CUDA.*this run is on cpu"):
        train(TrainConfig(data=str(tiny_imagefolder), sync_bn=True, out=str(tmp_path / "run")), say=print)
    assert not (tmp_path / "run").exists()


def test_sync_bn_refused_under_cpu_torchrun_before_the_process_group(
    tiny_imagefolder, tmp_path, no_gpu, monkeypatch
):
    """Under torchrun with gloo it used to fail at the first step; now it stops before joining the group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")

    def joined(**_kwargs):
        raise AssertionError("the process group was started")

    monkeypatch.setattr(distributed.dist, "init_process_group", joined)
    with pytest.raises(ConfigError, match="--sync-bn is for CUDA"):
        train(TrainConfig(data=str(tiny_imagefolder), sync_bn=True, out=str(tmp_path / "run")), say=print)


def test_cli_refuses_sync_bn_on_cpu_in_one_line(tiny_imagefolder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "resfit", "train", str(tiny_imagefolder), "--sync-bn", "--device", "cpu"]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sync-bn is for CUDA" in lines[0], result.stderr
