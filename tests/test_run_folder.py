"""RunFolder: every file a run writes is one it names, its read/write pairs round-trip, damage is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _write_learnable_images

import resfit
from resfit.data.sources import discover
from resfit.errors import ConfigError, RunFolderError
from resfit.hardware import resolve_runtime
from resfit.run_folder import RunFolder


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, module_tmp) -> Path:
    """A tiny run that writes every kind of file: a test split, --lr auto's range test, --wise-ft's start
    weights, a fine-tuning epoch and so the resume state."""
    data = module_tmp("three-splits")
    for split, per_class, seed in (("train", 12, 0), ("val", 6, 1), ("test", 6, 2)):
        _write_learnable_images(data / split, per_class=per_class, size=40, seed=seed)
    out = tmp_path_factory.getbasetemp() / "run-folder-full"
    config = resfit.TrainConfig(
        data=str(data),
        model="resnet18",
        weights="none",
        epochs=1,
        lr="auto",
        wise_ft=0.5,
        img_size=32,
        batch_size=8,
        num_workers=0,
        quiet=True,
        out=str(out),
    )
    resfit.train(config, say=lambda _: None)
    return out


def test_every_file_a_run_writes_is_named(full_run):
    folder = RunFolder(full_run)
    written = {path.name for path in full_run.iterdir() if not path.name.startswith(".")}
    assert written <= RunFolder.named_files(), written - RunFolder.named_files()
    expected = [
        folder.weights_file,
        folder.meta_file,
        folder.train_config_file,
        folder.data_report_file,
        folder.history_file,
        folder.curves_plot,
        folder.reliability_plot,
        folder.risk_coverage_plot,
        folder.lr_find_file,
        folder.lr_find_plot,
        *(path(split) for split in ("val", "test") for path in (folder.metrics_file, folder.confusion_plot)),
        folder.misclassified_file("test"),
        folder.misclassified_plot("test"),
        folder.state_file,
        folder.start_weights_file,
    ]
    assert [path for path in expected if not path.is_file()] == []
    state, _ = folder.read_resume()
    in_resume = {path.name for path in folder.resume_dir.iterdir() if not path.name.startswith(".")}
    assert in_resume == {
        folder.state_file.name,
        folder.start_weights_file.name,
        folder.epoch_weights_file(state["epoch"]).name,
    }
    assert folder.is_started and folder.is_finished and folder.has_model


def test_evaluate_and_report_reproduces_what_training_wrote(full_run, tmp_path):
    """The one 'evaluate, then write the reports' path gives the exact metrics training stored."""
    copy = RunFolder(tmp_path / "copy")
    shutil.copytree(full_run, copy.path)
    trained = {split: copy.read_metrics(split) for split in ("val", "test")}
    for split in ("val", "test"):
        copy.metrics_file(split).unlink()
    source, _ = copy.dataset()
    val = trained["val"]
    runtime = resolve_runtime("cpu", copy.read_meta()["precision"])  # as trained: bf16 where it is native
    results = copy.evaluate_and_report(source, runtime, val["temperature_scaling"], val["rejection"])
    assert set(results) == {"val", "test"}
    for split in ("val", "test"):
        assert copy.read_metrics(split) == trained[split]


def test_json_files_round_trip(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_train_config({"data": "photos", "lr": 0.001})
    assert folder.read_train_config() == {"data": "photos", "lr": 0.001}
    folder.write_metrics({"accuracy": 0.5}, "test")
    assert folder.read_metrics("test") == {"accuracy": 0.5} and not folder.metrics_file("val").exists()
    assert folder.metrics_file("test").name == "metrics_test.json"
    folder.write_lr_find({"suggestion": 0.01})
    assert folder.read_lr_find() == {"suggestion": 0.01}
    assert folder.read_tracking() is None
    folder.write_tracking({"mlflow": {"run_id": "abc"}})
    assert folder.read_tracking() == {"mlflow": {"run_id": "abc"}}
    folder.write_data_report({"skipped": []})
    assert folder.read_data_report() == {"skipped": []}


def test_history_round_trips_and_gives_the_training_time(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_history() == [] and folder.training_seconds() is None
    rows = [
        {"epoch": 0, "stage": "head", "lr": None, "val_acc": 0.51234567, "elapsed": 1.5, "probe_c": 1.0},
        {"epoch": 1, "stage": "finetune", "lr": 0.001, "val_acc": 0.75, "elapsed": 12.25},
    ]
    folder.write_history(rows)
    read = folder.read_history()
    assert [row["stage"] for row in read] == ["head", "finetune"]
    assert read[0]["lr"] == "" and read[0]["val_acc"] == "0.512346" and "probe_c" not in read[0]
    assert folder.training_seconds() == 12.25


def test_resume_state_keeps_only_the_last_epoch(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(RunFolderError, match="before its first one was written"):
        folder.read_resume()
    for epoch in (1, 2):
        folder.write_resume(epoch, {"model.w": torch.full((2,), float(epoch))}, {"best_epoch": epoch})
    state, tensors = folder.read_resume()
    assert state["epoch"] == 2 and state["best_epoch"] == 2 and state["tensors"] == "epoch-2.safetensors"
    assert torch.equal(tensors["model.w"], torch.full((2,), 2.0))
    assert folder.epoch_weights_files() == [folder.epoch_weights_file(2)]
    with pytest.raises(RunFolderError, match="--wise-ft"):
        folder.read_start_weights()
    folder.write_start_weights({"w": torch.ones(3)})
    assert torch.equal(folder.read_start_weights()["w"], torch.ones(3))


def test_model_and_bank_round_trip(tmp_path):
    from resfit.data.transforms import Preprocessing
    from resfit.models import build_model
    from resfit.run_folder import build_model_meta

    model = build_model("resnet18", 2)
    meta = build_model_meta(
        "resnet18", ["a", "b"], Preprocessing.for_size(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), 0.0
    )
    folder = RunFolder(tmp_path)
    folder.write_model(model, meta)
    loaded, loaded_meta = folder.load_model()
    assert loaded_meta["class_names"] == ["a", "b"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert folder.reject_rule(loaded_meta) is None
    bank = np.arange(12, dtype=np.float32).reshape(3, 4)
    folder.write_bank(bank)
    assert np.array_equal(folder.read_bank(), bank)
    folder.remove_bank()
    assert not folder.bank_file.exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train_config.json", b'{"data": "pho', "not valid JSON"),
        ("train_config.json", b"[1, 2]", "expected a JSON object"),
        ("metrics.json", b"\xff\xfe", "cannot be read"),
        ("lr_find.json", b"", "not valid JSON"),
    ],
)
def test_a_damaged_json_file_is_a_run_folder_error_naming_it(tmp_path, name, content, message):
    folder = RunFolder(tmp_path)
    (tmp_path / name).write_bytes(content)
    read = {
        "train_config.json": folder.read_train_config,
        "metrics.json": folder.read_metrics,
        "lr_find.json": folder.read_lr_find,
    }[name]
    with pytest.raises(RunFolderError, match=message) as error:
        read()
    assert str(tmp_path / name) in str(error.value)


def test_damaged_tensor_files_are_run_folder_errors(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_resume(3, {"model.w": torch.ones(2)}, {})
    folder.epoch_weights_file(3).write_bytes(b"\x00" * 9)
    with pytest.raises(RunFolderError, match="not a readable safetensors file"):
        folder.read_resume()
    with pytest.raises(RunFolderError, match="not a resfit run folder"):
        RunFolder(tmp_path / "empty").read_train_config()


def test_the_run_dataset_is_split_as_the_run_split_it(tmp_path):
    flat = tmp_path / "flat"
    _write_learnable_images(flat, per_class=10, size=16, seed=0)
    assert RunFolder.split_settings({}) == {
        "val_fraction": resfit.TrainConfig.val_fraction,
        "seed": resfit.TrainConfig.seed,
    }
    meta = {"data": {"path": str(flat)}, "training_config": {"val_fraction": 0.3, "seed": 5}}
    source, _ = RunFolder(tmp_path / "run").dataset(meta=meta)
    expected = discover(flat, val_fraction=0.3, seed=5).splits["val"].items
    assert sorted(source.splits["val"].items) == sorted(expected)
    assert RunFolder.listing(flat, meta).splits["val"].items == expected
    assert set(discover(flat).splits["val"].items) != set(expected)  # the settings matter here
    with pytest.raises(ConfigError, match="does not record its data"):
        RunFolder(tmp_path / "run").dataset(meta={})


def test_train_config_file_name_is_what_resume_reads(full_run):
    """The names are the files' real names: a reader of an old run folder finds them."""
    assert json.loads((full_run / RunFolder.TRAIN_CONFIG).read_text())["lr"] != "auto"
    assert (full_run / "model.json").is_file() and (full_run / "history.csv").is_file()
