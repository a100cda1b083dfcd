"""Multi-node DDP through the real torchrun: two agents, `--nnodes 2 --nproc_per_node 1`, c10d rendezvous.

The two "nodes" share this machine but nothing else a real cluster would not share: each agent is its own
torchrun process with its own `--node-rank` and its own RESFIT_CACHE (the scan, hash and decoded-image
caches are per node), they meet at node 0's `--rdzv-endpoint` on loopback, and only the run folder is
common, as a shared filesystem would be. c10d gives the global ranks, so rank 0 (the one that writes) may
be either node. The runs use the flags and the tolerance of the two-process test in test_distributed.py,
and end within 1e-4 of one process: uninterrupted, and killed after epoch 1 (every agent and worker at
once, as a power cut would) then resumed by starting both agents again with `train --resume`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import _descendants, _write_learnable_images, kill_after_epoch
from test_distributed import COMMON, WEIGHT_TOLERANCE, _last_weights, _max_weight_difference

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT_S = 300  # per run; c10d's join_timeout below makes a lost agent fail well before this
# Epochs long enough (about a second) for the kill to land between epoch 1 and epoch 2.
FLAGS = [*COMMON]  # with --resume-every 0
FLAGS[FLAGS.index("--img-size") + 1] = "64"


def _env(cache: Path) -> dict:
    """This checkout's resfit for torchrun's workers too, and a cache of this "node"'s own."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in [str(SRC), env.get("PYTHONPATH", "")] if p),
        RESFIT_CACHE=str(cache),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_nodes(tmp: Path, name: str, *train_args: str) -> list[subprocess.Popen]:
    """Start the two agents of one multi-node run; their output goes to tmp/<name>-node<k>.log."""
    endpoint, rdzv_id = f"127.0.0.1:{_free_port()}", f"resfit-test-{uuid.uuid4().hex[:12]}"
    agents = []
    for node_rank in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node-rank",
            str(node_rank),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            rdzv_id,
            # Node 0 hosts the rendezvous store (both would match 127.0.0.1 here); a missing agent fails
            # the rendezvous in a minute instead of torchrun's default ten.
            "--rdzv-conf",
            f"is_host={int(node_rank == 0)},join_timeout=60,read_timeout=60",
            "-m",
            "resfit",
            "train",
            *train_args,
        ]
        log = open(tmp / f"{name}-node{node_rank}.log", "w")  # a file: a full pipe would stall the run
        agents.append(
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp / f"cache-node{node_rank}")
            )
        )
        log.close()
    return agents


def _logs(tmp: Path, name: str) -> str:
    return "\n".join(f"--- node {k} ---\n{(tmp / f'{name}-node{k}.log').read_text()[-3000:]}" for k in (0, 1))


def _wait_nodes(agents: list[subprocess.Popen], tmp: Path, name: str) -> str:
    """Wait for both agents; both must succeed. One that fails, or a run past TIMEOUT_S, ends both at once
    (a worker whose peer died would otherwise wait out gloo's 30-minute collective timeout)."""
    deadline = time.time() + TIMEOUT_S
    running = agents
    while running and time.time() < deadline and all(agent.returncode in (None, 0) for agent in agents):
        time.sleep(0.1)
        running = [agent for agent in agents if agent.poll() is None]
    for pid in [pid for agent in running for pid in [*_descendants(agent.pid), agent.pid]]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for agent in agents:
        agent.wait()
    if running and time.time() >= deadline:
        pytest.fail(f"the two-node run did not finish in {TIMEOUT_S} s\n{_logs(tmp, name)}")
    codes = [agent.returncode for agent in agents]
    assert codes == [0, 0], f"agents exited {codes}\n{_logs(tmp, name)}"
    return _logs(tmp, name)


@pytest.fixture(scope="module")
def single_run(module_tmp) -> tuple[Path, Path]:
    """The data, and one uninterrupted single-process run of FLAGS on it: what both tests must match."""
    tmp = module_tmp("multinode")
    data = tmp / "data"
    _write_learnable_images(data / "train", per_class=48, size=72, seed=0)
    _write_learnable_images(data / "val", per_class=8, size=72, seed=1)
    single = tmp / "single"
    one = subprocess.run(
        [sys.executable, "-m", "resfit", "train", str(data), *FLAGS, "--out", str(single)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(tmp / "cache-single"),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return data, single


def _assert_matches_single(single: Path, ddp: Path) -> None:
    single_state, single_weights = _last_weights(single)
    ddp_state, ddp_weights = _last_weights(ddp)
    assert ddp_state["epoch"] == single_state["epoch"] == 2
    worst = _max_weight_difference(single_weights, ddp_weights)
    assert worst <= WEIGHT_TOLERANCE, worst
    single_metrics = json.loads((single / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp / "metrics.json").read_text())
    assert ddp_metrics["accuracy"] == single_metrics["accuracy"]
    assert ddp_metrics["num_images"] == single_metrics["num_images"]


@pytest.mark.slow
def test_two_nodes_match_one_process(single_run, tmp_path):
    data, single = single_run
    ddp = tmp_path / "shared-run"
    logs = _wait_nodes(_start_nodes(tmp_path, "run", str(data), *FLAGS, "--out", str(ddp)), tmp_path, "run")
    assert logs.count("distributed: 2 processes (gloo)") == 1, logs  # one rank 0, on either node
    assert logs.count("epoch  1 finetune") == 1, logs
    _assert_matches_single(single, ddp)
    # One run folder, written once, with the single run's shape.
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in ddp.iterdir())
    # Each node decoded the images into its own cache: nothing but the run folder is shared.
    for node in (0, 1):
        assert any((tmp_path / f"cache-node{node}" / "decoded").iterdir()), f"node {node} has no cache"


@pytest.mark.slow
def test_killed_two_node_run_resumes(single_run, tmp_path):
    data, single = single_run
    ddp = tmp_path / "shared-run"
    agents = _start_nodes(tmp_path, "killed", str(data), *FLAGS, "--out", str(ddp))
    kill_after_epoch(agents, ddp, with_children=True)
    codes = [agent.returncode for agent in agents]
    assert codes == [-signal.SIGKILL] * 2, f"not killed mid-run: {codes}\n{_logs(tmp_path, 'killed')}"
    assert not (ddp / "metrics.json").exists()

    logs = _wait_nodes(
        _start_nodes(tmp_path, "resumed", "--resume", str(ddp), "--quiet"), tmp_path, "resumed"
    )
    assert logs.count("after epoch 1") == 1 and "distributed: 2 processes (gloo)" in logs, logs
    _assert_matches_single(single, ddp)
