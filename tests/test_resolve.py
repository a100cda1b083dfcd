"""The run's "chosen for you" settings come from one pure function: the caller's config is never changed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from resfit.errors import ConfigError
from resfit.hardware import CpuInfo, Runtime
from resfit.models import IMAGENET_MEAN, IMAGENET_STD, PretrainedSource
from resfit.train.config import TrainConfig
from resfit.train.resolve import DataFacts, resolve_settings

TWO_CORES = CpuInfo("test CPU", 2, 2, avx2=True, avx512=False, native_bf16=False)
CPU = Runtime("cpu", "fp32", "test", 2, TWO_CORES)
GPU = Runtime("cuda:0", "bf16", "test", 2, TWO_CORES, "test GPU")
IMAGENET = PretrainedSource("imagenet", "torchvision", crop_size=224, resize_size=232)
CARD_112 = PretrainedSource("file", "a file with a card", crop_size=112)
SCRATCH = PretrainedSource("none", "random")
EQUAL = DataFacts(np.array([50, 50]))


def test_the_callers_config_is_left_as_it_was_and_cannot_be_changed():
    config = TrainConfig(data="d")
    before = dataclasses.asdict(config)
    resolved = resolve_settings(config, CPU, IMAGENET, EQUAL)
    assert dataclasses.asdict(config) == before
    assert resolved.config is not config
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.config.lr = 1.0  # type: ignore[misc]


def test_defaults_follow_the_weights_and_the_device():
    on_cpu = resolve_settings(TrainConfig(data="d"), CPU, CARD_112, EQUAL).config
    assert (on_cpu.img_size, on_cpu.batch_size, on_cpu.frozen_blocks, on_cpu.num_workers) == (112, 32, 2, 0)
    assert on_cpu.lr == 1e-3 and on_cpu.balance == "none"
    at_224 = resolve_settings(TrainConfig(data="d", optimizer="sgd"), CPU, IMAGENET, EQUAL)
    assert (at_224.config.img_size, at_224.config.batch_size, at_224.config.lr) == (224, 16, 1e-2)
    # torchvision's weights keep their own resize (232 for a 224 crop), other sizes the 0.875 ratio
    assert at_224.preprocessing.resize_size == 232 and at_224.preprocessing.mean == tuple(IMAGENET_MEAN)
    at_160 = resolve_settings(TrainConfig(data="d", img_size=160), GPU, IMAGENET, EQUAL)
    assert at_160.preprocessing.resize_size == round(160 / 0.875) and at_160.config.batch_size == 64
    assert resolve_settings(TrainConfig(data="d"), CPU, SCRATCH, EQUAL).config.frozen_blocks == 0
    assert resolve_settings(TrainConfig(data="d"), CPU, SCRATCH, EQUAL).preprocessing.std == tuple(
        IMAGENET_STD
    )


def test_what_was_given_is_kept():
    given = TrainConfig(
        data="d", img_size=96, batch_size=5, frozen_blocks=0, num_workers=1, lr=0.3, patience=5, ema=True
    )
    resolved = resolve_settings(given, GPU, IMAGENET, EQUAL).config
    assert dataclasses.asdict(resolved) == dataclasses.asdict(given) | {"balance": "none"}


def test_early_stopping_waits_3_epochs_and_never_stops_an_ema_unless_asked():
    assert resolve_settings(TrainConfig(data="d", ema=False), CPU, CARD_112, EQUAL).config.patience == 3
    assert resolve_settings(TrainConfig(data="d"), CPU, CARD_112, EQUAL).config.patience == 0  # EMA: default
    asked = TrainConfig(data="d", ema=True, patience=2)
    assert resolve_settings(asked, CPU, CARD_112, EQUAL).config.patience == 2
    with pytest.raises(ConfigError, match="patience must be >= 0"):
        TrainConfig(data="d", patience=-1).validate()


def test_balance_is_decided_by_the_class_counts_and_said():
    unequal = DataFacts(np.array([90, 10]))
    resolved = resolve_settings(TrainConfig(data="d"), CPU, IMAGENET, unequal)
    assert resolved.config.balance == "sampler" and "9.0x" in resolved.notes[0]
    kept_off = resolve_settings(TrainConfig(data="d", balance="none"), CPU, IMAGENET, unequal)
    assert kept_off.config.balance == "none" and kept_off.notes[0].startswith("warning:")
    streamed = resolve_settings(TrainConfig(data="d"), CPU, IMAGENET, DataFacts(np.array([90, 10]), True))
    assert streamed.config.balance == "loss" and "stream" in streamed.notes[-1]
    assert resolve_settings(TrainConfig(data="d"), CPU, IMAGENET, EQUAL).notes == ()


def test_a_range_test_under_torchrun_is_refused():
    with pytest.raises(ConfigError, match="lr-find"):
        resolve_settings(TrainConfig(data="d", lr="auto"), CPU, IMAGENET, EQUAL, distributed=True)
    assert resolve_settings(TrainConfig(data="d", lr="auto"), CPU, IMAGENET, EQUAL).config.lr == "auto"
