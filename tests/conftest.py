"""Shared fixtures: where the real data lives, and small synthetic image trees for unit tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESFIT_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder with real data and pretrained sources; tests never write there."""
    if not (SHARED / "data").is_dir():
        pytest.fail(f"real data not found at {SHARED}: clone resfit beside ../shared or set RESFIT_SHARED")
    return SHARED


@pytest.fixture(autouse=True)
def _restore_sigchld():
    """Keep a test's DataLoader workers from leaving PyTorch's SIGCHLD handler installed in this process.

    The handler checks the (long gone) workers of every DataLoader whenever any child exits; once
    OpenVINO is loaded in the same process, a later test's subprocess exiting crashed pytest with a
    segfault. A resfit command never runs a DataLoader and then spawns processes, so this is test-only.
    """
    handler = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, handler)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's scan/feature/export caches out of the user's ~/.cache, and off the disk after it."""
    cache = tmp_path_factory.mktemp("resfit-cache")
    monkeypatch.setenv("RESFIT_CACHE", str(cache))
    yield
    shutil.rmtree(cache, ignore_errors=True)


@contextlib.contextmanager
def example_dir(tmp_path_factory, name: str):
    """A new folder for one Hypothesis example (function-scoped fixtures do not reset between examples),
    removed when the example ends: copies of a run, dozens of times over, would otherwise pile up."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Callable[[str], Path]:
    """``module_tmp(name)`` makes a new folder for one test module's shared fixtures (their runs are hundreds
    of MB); all are removed when the module ends, so the suite's disk use peaks at one module's runs rather
    than growing to every module's (about 20 GB)."""
    base = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))

    def make(name: str) -> Path:
        path = base / name
        path.mkdir()
        return path

    yield make
    shutil.rmtree(base, ignore_errors=True)


def kill_after_epoch(
    process: subprocess.Popen | list[subprocess.Popen], run_dir: Path, with_children: bool = False
) -> None:
    """SIGKILL a training run as soon as its resume state records epoch 1, then wait for it to exit.

    ``process`` may be several (the torchrun agents of a multi-node run): all are killed at the same
    moment, as a crash of the cluster would, and if one ends first the others are killed then, so a run
    that failed does not leave its peers waiting on it. ``with_children`` also kills every descendant
    (torchrun's workers are not in its process group), as a crash of the machine would.
    """
    processes = process if isinstance(process, list) else [process]
    state_file = run_dir / "resume" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= 1:
            break
        time.sleep(0.02)
    running = [p for p in processes if p.poll() is None]
    pids = [pid for p in running for pid in (_descendants(p.pid) if with_children else [])]
    for pid in [*pids, *(p.pid for p in running)]:
        with contextlib.suppress(ProcessLookupError):  # a worker that exited since the listing
            os.kill(pid, signal.SIGKILL)
    for p in processes:
        p.wait()


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _write_learnable_images(root: Path, per_class: int, size: int, seed: int) -> None:
    """Two visually distinct classes (red-ish vs blue-ish with noise): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(["blue", "red"]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            pixels[..., 2 - 2 * label] += 120
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """A synthetic ImageFolder tree (train/ and val/, 2 classes): for unit tests only."""
    root = tmp_path_factory.mktemp("tiny")
    _write_learnable_images(root / "train", per_class=12, size=40, seed=0)
    _write_learnable_images(root / "val", per_class=6, size=40, seed=1)
    return root
