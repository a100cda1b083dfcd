"""Each setting is declared once, on its dataclass field; the CLI is generated from it and cannot drift."""

from __future__ import annotations

import dataclasses

import pytest

from resfit.audit import AuditConfig
from resfit.cli import build_parser
from resfit.compare import CompareConfig
from resfit.errors import ConfigError
from resfit.export import ExportConfig
from resfit.inference.classifier import InferenceConfig
from resfit.serve import ServeConfig
from resfit.settings import flag_of, from_args
from resfit.train.config import TrainConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("config", "argv", "not_flags"),
    [
        (TrainConfig, ["train", "DATA"], {"data"}),
        (AuditConfig, ["audit", "DATA"], {"data"}),
        (
            InferenceConfig,
            ["predict", "RUN", "a.jpg"],
            {"cache_dir", "int8", "batch_size"},
        ),
        (ExportConfig, ["export", "RUN"], {"run_dir"}),
        (ServeConfig, ["serve", "RUN"], {"max_files", "allowed_formats", "max_batch", "decode_threads"}),
        (
            CompareConfig,
            ["compare", "DATA"],
            {
                "data",
                "train",
                "inference",
                "tta_modes",
                "latency_warmup",
                "throughput_warmup",
                "throughput_repeats",
            },
        ),
    ],
)
def test_every_field_is_a_flag_whose_default_is_the_dataclass_default(config, argv, not_flags):
    """A user who gives no flags gets exactly the Python API's defaults, for every field."""
    args = parse(*argv)
    defaults = config(**({"run_dir": "RUN"} if config is ExportConfig else {}))
    checked = 0
    for field in dataclasses.fields(config):
        if field.name in not_flags:
            assert flag_of(field) is None, f"{field.name} is declared a flag but left out here"
            continue
        assert flag_of(field) is not None, f"{config.__name__}.{field.name} has no flag"
        assert flag_of(field).help, f"--{field.name} has no help text"
        assert getattr(args, field.name) == getattr(defaults, field.name), field.name
        checked += 1
    assert checked >= 3


def test_compare_passes_its_recipe_and_engine_on():
    args = parse("compare", "DATA", "--models", "resnet18,resnet34", "--epochs", "1", "--backend", "torch")
    assert args.models == ["resnet18", "resnet34"] and args.epochs == 1 and args.backend == "torch"


def test_serve_takes_megabytes_and_keeps_bytes():
    config = from_args(ServeConfig, parse("serve", "RUN", "--max-upload-mb", "2.5", "--top-k", "2"))
    assert config.max_upload_bytes == int(2.5 * 1024 * 1024) and config.top_k == 2


def test_flags_reach_the_config_with_their_types():
    args = parse(
        "train",
        "DATA",
        "--lr",
        "auto",
        "--train-sizes",
        "96,128",
        "--workers",
        "2",
        "--no-head-stage",
        "--augment",
        "--track",
        "tensorboard,mlflow",
        "--img-size",
        "160",
        "--min-crop-scale",
        "0.5",
    )
    config = from_args(TrainConfig, args)
    assert config.lr == "auto" and config.train_sizes == [96, 128] and config.num_workers == 2
    assert config.head_stage is False and config.augment == "trivialaugment"
    assert config.log == ["tensorboard", "mlflow"] and config.img_size == 160 and config.min_crop_scale == 0.5
    assert from_args(TrainConfig, parse("train", "DATA", "--lr", "0.01")).lr == 0.01


def test_the_default_reject_score_can_be_asked_for():
    """The choices are the dataclass's: the default (knn) was once missing from --reject-score's list."""
    assert parse("train", "DATA", "--reject-score", TrainConfig().reject_score).reject_score == "knn"
    with pytest.raises(SystemExit):
        parse("train", "DATA", "--reject-score", "entropy")


def test_python_callers_get_the_same_choices_checked():
    with pytest.raises(ConfigError, match="augment must be one of"):
        TrainConfig(data="x", augment="autoaugment").validate()
    with pytest.raises(ConfigError, match="precision must be one of"):
        AuditConfig(data="x", precision="int4").validate()


def test_compare_takes_the_recipe_flags_with_its_own_weights_help(capsys):
    args = parse("compare", "DATA", "--epochs", "2", "--weights", "resnet50=a.pth")
    assert args.epochs == 2 and args.weights == "resnet50=a.pth"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    assert "ARCH=FILE pairs" in capsys.readouterr().out
