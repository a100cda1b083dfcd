"""Sharded data through the real webdataset library: `resfit shard` writes, `resfit train DIR` streams."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_after_epoch

from resfit.cli import main
from resfit.data.images import open_rgb
from resfit.data.scan import load_dataset
from resfit.data.shard_stream import ShardEpoch, StreamedShards, epoch_assignment
from resfit.data.shard_writer import write_shards
from resfit.data.shards import INDEX_FILE, train_shards
from resfit.distributed import DistContext
from resfit.errors import ConfigError
from resfit.train.state import load_state

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def data_with_corrupt_file(tiny_imagefolder, module_tmp) -> Path:
    root = module_tmp("shard-src") / "data"
    shutil.copytree(tiny_imagefolder, root)
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture(scope="module")
def shard_dir(data_with_corrupt_file, module_tmp) -> Path:
    out = module_tmp("shards") / "shards"
    write_shards(data_with_corrupt_file, out, shard_samples=5)
    return out


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_shards_hold_only_accepted_files_as_their_original_bytes(data_with_corrupt_file, tmp_path):
    before = _snapshot(data_with_corrupt_file)
    out = tmp_path / "shards"
    assert main(["shard", str(data_with_corrupt_file), "--out", str(out), "--shard-samples", "5"]) == 0
    assert _snapshot(data_with_corrupt_file) == before  # nothing rewritten or added in the dataset

    index = json.loads((out / INDEX_FILE).read_text())
    assert index["class_names"] == ["blue", "red"]
    assert index["splits"]["train"]["samples"] == 24 and index["splits"]["val"]["samples"] == 12
    assert index["splits"]["train"]["class_counts"] == {"blue": 12, "red": 12}
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == [5, 5, 5, 5, 4]
    assert [s["path"] for s in index["skipped"]] == [str(data_with_corrupt_file / "train/red/broken.png")]
    assert index["skipped"][0]["reason"]

    seen = 0
    for shard in index["splits"]["train"]["shards"] + index["splits"]["val"]["shards"]:
        assert (out / shard["file"]).stat().st_size == shard["bytes"]
        with tarfile.open(out / shard["file"]) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for name, data in members.items():
            if name.endswith(".png"):
                meta = json.loads(members[name.replace(".png", ".json")])
                assert data == (data_with_corrupt_file / meta["path"]).read_bytes()
                assert int(members[name.replace(".png", ".cls")]) == ["blue", "red"].index(meta["class"])
                seen += 1
    assert seen == 36


def test_shard_refuses_to_write_inside_the_dataset_or_over_files(data_with_corrupt_file, tmp_path):
    with pytest.raises(ConfigError, match="inside the dataset"):
        write_shards(data_with_corrupt_file, data_with_corrupt_file / "shards")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_shards(data_with_corrupt_file, tmp_path / "full")


def test_a_shard_folder_is_a_dataset_read_by_position(shard_dir, data_with_corrupt_file):
    source, report = load_dataset(shard_dir)
    assert source.layout == "shards"
    assert report.class_counts["val"] == {"blue": 6, "red": 6}
    assert len(report.skipped) == 1  # the scan's verdicts travel with the shards
    for item, label in zip(source.splits["val"].items, source.splits["val"].labels, strict=True):
        original = data_with_corrupt_file / item.split("::")[-1]
        assert np.array_equal(np.asarray(source.read(item)[0]), np.asarray(open_rgb(original)[0]))
        assert original.parent.name == source.class_names[label]


class _Position:
    """A transform that ignores the pixels: the stream's order is what these tests look at."""

    def __call__(self, image):
        return torch.zeros(1)


def test_rank_and_worker_split_is_disjoint_and_covers_every_shard():
    for shards, world, workers in ((7, 2, 2), (5, 1, 3), (8, 4, 1)):
        assignment = epoch_assignment(shards, seed=3, epoch=2, world_size=world, workers=workers)
        flat = [i for rank in assignment for worker in rank for i in worker]
        assert sorted(flat) == list(range(shards))
        assert assignment == epoch_assignment(shards, seed=3, epoch=2, world_size=world, workers=workers)
    assert epoch_assignment(9, 0, 1, 2, 1) != epoch_assignment(9, 0, 2, 2, 1)  # every epoch differs
    with pytest.raises(ConfigError, match="each process needs one"):
        epoch_assignment(1, 0, 1, world_size=2, workers=1)


def test_stream_order_is_seeded_and_ranks_read_different_samples(shard_dir):
    source, _ = load_dataset(shard_dir)
    shards = train_shards(source)

    def stream(seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        plan = ShardEpoch(shards, 2, DistContext(rank=rank, world_size=world), seed, epoch, num_workers=0)
        dataset = StreamedShards(_Position(), source.max_pixels)
        dataset.start_epoch(plan)
        labelled = source.splits["train"].labels
        order = []
        for sample in dataset.samples(0):
            position = int(sample["__key__"])
            assert int(sample["cls"]) == labelled[position]
            order.append(position)
        return order

    first = stream(seed=1, epoch=1)
    assert sorted(first) == list(range(24))  # one process reads every sample once
    assert stream(seed=1, epoch=1) == first  # the order is a function of (seed, epoch)
    assert stream(seed=1, epoch=2) != first
    rank0, rank1 = stream(1, 1, rank=0, world=2), stream(1, 1, rank=1, world=2)
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == list(range(24))


def _train_cli(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "resfit",
        "train",
        str(data),
        "--resume-every",
        "0",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        str(epochs),
        "--img-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--seed",
        "5",
        "--out",
        str(out),
        "--quiet",
    ]


def test_training_from_shards_learns_and_resumes_to_the_same_weights(shard_dir, tmp_path):
    whole = subprocess.run(_train_cli(shard_dir, tmp_path / "whole", 3), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert "note: sharded data: each process streams its own train shards (5 in all)" in whole.stdout
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["accuracy"] >= 0.75

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train_cli(shard_dir, killed, 3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_after_epoch(process, killed)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(
        [sys.executable, "-m", "resfit", "train", "--resume", str(killed), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    (state, weights), (_, reference) = load_state(killed), load_state(tmp_path / "whole")
    assert state["epoch"] == 3
    trained = [name for name in reference if not name.startswith("rng.")]  # model and optimizer
    assert trained and all(torch.equal(weights[name], reference[name]) for name in trained)
